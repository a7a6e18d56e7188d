//! Fault injection: a plan of `[[fault]]` tables (step, phase, actor, rank, panic or hang) read
//! from TOML, and the book the actors consult so that each fault fires exactly once.
//!
//! ```toml
//! step_timeout_ms = 3000   # optional: the coordinator's step timeout (default adaptive)
//!
//! [[fault]]
//! at_step = 3
//! phase = "forward"        # forward | backward | weight | optimizer
//! actor = "stage"          # stage | expert | gpu
//! rank = 1
//! kind = "panic"           # panic | hang
//! ```

use serde::Deserialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where in a step a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Forward,
    Backward,
    Weight,
    Optimizer,
}

impl Phase {
    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "forward" => Some(Phase::Forward),
            "backward" => Some(Phase::Backward),
            "weight" => Some(Phase::Weight),
            "optimizer" => Some(Phase::Optimizer),
            _ => None,
        }
    }
}

/// Which actor fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// A StageActor on the rank (the first of its copies to reach the phase).
    Stage,
    /// An ExpertGroupActor (needs `--ep` > 1).
    Expert,
    /// The rank's GpuActor (its stage actors go down with it).
    Gpu,
}

/// How it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// The actor panics (its supervisor sees `ActorFailed`).
    Panic,
    /// The actor stops answering (the coordinator's step timeout catches it).
    Hang,
}

/// One injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_step: u64,
    pub phase: Phase,
    pub actor: Target,
    pub rank: usize,
    pub kind: FaultKind,
}

/// A whole plan.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectPlan {
    /// The coordinator's step timeout in milliseconds (default: adaptive, see the formation).
    #[serde(default)]
    pub step_timeout_ms: Option<u64>,
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
    /// The file it came from (for error messages).
    #[serde(skip)]
    pub source: String,
}

impl InjectPlan {
    /// Reads a plan from a TOML file.
    pub fn load(path: &Path) -> Result<InjectPlan, String> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
        InjectPlan::parse(&text, &file)
    }

    /// Parses TOML text; `file` names the source in errors, which also name the field.
    pub fn parse(text: &str, file: &str) -> Result<InjectPlan, String> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| format!("{file}: not valid TOML: {}", e.message()))?;
        let mut plan: InjectPlan = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                let msg = e.inner().to_string();
                let msg = msg.lines().next().unwrap_or("").to_string();
                format!("{file}: {}: {msg}", name_path(&path))
            })?;
        plan.source = file.to_string();
        Ok(plan)
    }

    /// Checks the plan against a run of `steps` steps on `ranks` pipeline ranks and `ep` expert
    /// groups; errors name the file, the fault (1-based, in file order) and the field.
    pub fn validate(&self, steps: u64, ranks: usize, ep: usize) -> Result<(), String> {
        let file = &self.source;
        if self.step_timeout_ms == Some(0) {
            return Err(format!(
                "{file}: field `step_timeout_ms`: must be at least 1"
            ));
        }
        for (i, f) in self.faults.iter().enumerate() {
            let at = format!("{file}: [[fault]] #{}", i + 1);
            if f.at_step == 0 || f.at_step > steps {
                return Err(format!(
                    "{at}: field `at_step` = {}: the run has steps 1..={steps}",
                    f.at_step
                ));
            }
            if f.rank >= ranks {
                return Err(format!(
                    "{at}: field `rank` = {}: the layout has {ranks} pipeline rank(s) (0..{ranks})",
                    f.rank
                ));
            }
            if f.actor == Target::Expert && ep <= 1 {
                return Err(format!(
                    "{at}: field `actor` = \"expert\": there are no expert-group actors (needs --ep > 1, the layout has --ep {ep})"
                ));
            }
        }
        Ok(())
    }
}

/// `fault[2].phase` → "[[fault]] #3: field `phase`" (1-based, as in `validate`).
fn name_path(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("fault[")
        && let Some((idx, field)) = rest.split_once(']')
        && let Ok(i) = idx.parse::<usize>()
    {
        let field = field.trim_start_matches('.');
        return if field.is_empty() {
            format!("[[fault]] #{}", i + 1)
        } else {
            format!("[[fault]] #{}: field `{field}`", i + 1)
        };
    }
    format!("field `{path}`")
}

/// The faults of a plan with a fired flag each: every fault fires at most once, even when its
/// step is replayed.
#[derive(Debug, Default)]
pub struct FaultBook {
    faults: Vec<(Fault, AtomicBool)>,
}

impl FaultBook {
    pub fn new(plan: &InjectPlan) -> FaultBook {
        FaultBook {
            faults: plan
                .faults
                .iter()
                .map(|f| (*f, AtomicBool::new(false)))
                .collect(),
        }
    }

    /// The first unfired fault for this (step, phase, actor, rank), now marked fired.
    pub fn take(&self, step: u64, phase: Phase, actor: Target, rank: usize) -> Option<FaultKind> {
        self.faults.iter().find_map(|(f, fired)| {
            let hit = f.at_step == step && f.phase == phase && f.actor == actor && f.rank == rank;
            (hit && !fired.swap(true, Ordering::SeqCst)).then_some(f.kind)
        })
    }

    /// Faults that never fired (their step, phase or rank was never reached).
    pub fn unfired(&self) -> Vec<Fault> {
        self.faults
            .iter()
            .filter(|(_, fired)| !fired.load(Ordering::SeqCst))
            .map(|(f, _)| *f)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_plan() {
        let p = InjectPlan::parse(
            "step_timeout_ms = 500\n[[fault]]\nat_step = 3\nphase = \"weight\"\nactor = \"gpu\"\nrank = 1\nkind = \"hang\"\n",
            "plan.toml",
        )
        .unwrap();
        assert_eq!(p.step_timeout_ms, Some(500));
        assert_eq!(
            p.faults,
            vec![Fault {
                at_step: 3,
                phase: Phase::Weight,
                actor: Target::Gpu,
                rank: 1,
                kind: FaultKind::Hang
            }]
        );
        p.validate(10, 2, 1).unwrap();
        let book = FaultBook::new(&p);
        assert_eq!(book.take(3, Phase::Weight, Target::Gpu, 0), None);
        assert_eq!(
            book.take(3, Phase::Weight, Target::Gpu, 1),
            Some(FaultKind::Hang)
        );
        assert_eq!(
            book.take(3, Phase::Weight, Target::Gpu, 1),
            None,
            "fires once"
        );
        assert!(book.unfired().is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_field() {
        let e = InjectPlan::parse(
            "[[fault]]\nat_step = 3\nphase = \"fwd\"\nactor = \"gpu\"\nrank = 1\nkind = \"hang\"\n",
            "plan.toml",
        )
        .unwrap_err();
        assert!(
            e.starts_with("plan.toml: [[fault]] #1: field `phase`: unknown variant `fwd`"),
            "{e}"
        );
        assert!(e.contains("forward"), "{e}");
        let e = InjectPlan::parse("[[fault]]\nat_step = 3\n", "plan.toml").unwrap_err();
        assert!(e.contains("missing field `phase`"), "{e}");
        let e = InjectPlan::parse(
            "[[fault]]\nat_step = 3\nphase = \"forward\"\nactor = \"stage\"\nrank = 4\nkind = \"panic\"\nextra = 1\n",
            "plan.toml",
        )
        .unwrap_err();
        assert!(e.contains("unknown field `extra`"), "{e}");
        let p = InjectPlan::parse(
            "[[fault]]\nat_step = 3\nphase = \"forward\"\nactor = \"stage\"\nrank = 4\nkind = \"panic\"\n",
            "plan.toml",
        )
        .unwrap();
        let e = p.validate(10, 2, 1).unwrap_err();
        assert_eq!(
            e,
            "plan.toml: [[fault]] #1: field `rank` = 4: the layout has 2 pipeline rank(s) (0..2)"
        );
        let e = p.validate(2, 8, 1).unwrap_err();
        assert!(e.contains("field `at_step` = 3"), "{e}");
    }
}
