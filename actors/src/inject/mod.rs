//! Fault injection: a plan of `[[fault]]` tables (step, phase, actor, rank, kind) read from TOML,
//! and the book the actors consult so that each fault fires exactly once.
//!
//! ```toml
//! step_timeout_ms = 3000   # optional: the coordinator's step timeout (default adaptive)
//!
//! [[fault]]
//! at_step = 3              # required: 1..=steps
//! phase = "forward"        # forward | backward | weight | optimizer   (default forward)
//! actor = "stage"          # stage | expert | gpu | coordinator | dataloader | store   (required)
//! rank = 1                 # pipeline rank (default 0; must be 0 for coordinator and dataloader)
//! kind = "slow"            # panic | hang | slow | drop | corrupt | dup | loss_spike | store_outage
//! factor = 4.0             # slow only: the op takes factor× longer (default 3.0, finite, > 1)
//! ```
//!
//! A simulation scenario (`simulations/scenarios/*.toml`) with `[[fault]]` tables is a plan as
//! well: `phalanx train --inject` fires its faults on the live run and leaves its simulation
//! tables (`[cluster]`, `[run]`, `[failures]`, `[checkpoint]`, `[recovery]`, `name`,
//! `description`) to `phalanx simulate`, which replays the same faults in virtual time.
//!
//! Kinds:
//! - `panic`: the actor panics (its supervisor sees `ActorFailed`).
//! - `hang`: the actor gets stuck forever and never answers (the coordinator's step timeout
//!   catches it).
//! - `slow`: the actor is a straggler: the op takes `factor`× its normal time, then completes.
//! - `drop`: a message the actor sends (or, for the dataloader, the batch it answers with)
//!   vanishes on the way.
//! - `corrupt`: bytes of a frame are flipped on the link, so the receiver sees a damaged message.
//! - `dup`: a message is delivered twice.
//! - `loss_spike`: without `factor`, the step's batch is a pathological one (one token
//!   repeated: a bad data shard; it stands out only once the model has learned something);
//!   with `factor`, the step's learning rate is multiplied by it, so the next step's loss
//!   spikes. The run's loss monitor rejects the spiking step and rolls back (see
//!   `core::monitor`; `rollback_skip_steps = 2` also discards the damaging update). Its actor
//!   must be `dataloader`.
//! - `store_outage` (actor `store`, `duration_ms` required): from the start of the step, every
//!   request to the checkpoint store fails for that long (the run's store is wrapped in
//!   `storage::store::Faulty`); uploads are retried, missed checkpoints reported.
//!
//! Actors: `stage` (a StageActor), `expert` (an ExpertGroupActor, needs `--ep` > 1), `gpu` (the
//! rank's GpuActor), `coordinator` (the single Coordinator; any phase, rank 0) and `dataloader`
//! (the single DataLoader; it fires on the batch request, so its phase must be `forward`, rank 0).
//!
//! `phase` defaults to `forward` for every actor (for the dataloader it is the only valid one).
//! `factor` may only be written on a `slow` fault: on any other kind it is refused, naming the
//! field. Validation (`InjectPlan::validate`) also checks the step range, the rank range and that
//! expert faults have expert groups to hit; every error names the file, the fault (`[[fault]] #N`,
//! 1-based in file order) and the field.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where in a step a fault fires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The forward pass (for the dataloader: the batch request).
    #[default]
    Forward,
    Backward,
    Weight,
    Optimizer,
}

impl Phase {
    /// Every phase, in step order.
    pub const ALL: [Phase; 4] = [
        Phase::Forward,
        Phase::Backward,
        Phase::Weight,
        Phase::Optimizer,
    ];

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The TOML name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Weight => "weight",
            Phase::Optimizer => "optimizer",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
    /// The Coordinator (a single actor: rank 0; any phase).
    Coordinator,
    /// The DataLoader (a single actor: rank 0; fires on the batch request, phase `forward`).
    Dataloader,
    /// The checkpoint store (rank 0; only `store_outage`).
    Store,
}

impl Target {
    /// Every actor kind, in declaration order.
    pub const ALL: [Target; 6] = [
        Target::Stage,
        Target::Expert,
        Target::Gpu,
        Target::Coordinator,
        Target::Dataloader,
        Target::Store,
    ];

    /// The TOML name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Stage => "stage",
            Target::Expert => "expert",
            Target::Gpu => "gpu",
            Target::Coordinator => "coordinator",
            Target::Dataloader => "dataloader",
            Target::Store => "store",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }

    /// A single actor for the whole run (not one per rank): its `rank` must be 0.
    pub fn is_singleton(self) -> bool {
        matches!(
            self,
            Target::Coordinator | Target::Dataloader | Target::Store
        )
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How it fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// The actor panics (its supervisor sees `ActorFailed`).
    #[default]
    Panic,
    /// The actor is stuck forever (the coordinator's step timeout catches it).
    Hang,
    /// A straggler: the op takes `factor`× longer, then completes.
    Slow,
    /// A message vanishes.
    Drop,
    /// Bytes of a frame are flipped on the link.
    Corrupt,
    /// A message is delivered twice.
    Dup,
    /// The step's batch is pathological (handled by the data, not by an actor).
    #[serde(rename = "loss_spike")]
    LossSpike,
    /// Every request to the checkpoint store fails for `duration_ms`.
    #[serde(rename = "store_outage")]
    StoreOutage,
}

impl FaultKind {
    /// Every kind, in declaration order.
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Panic,
        FaultKind::Hang,
        FaultKind::Slow,
        FaultKind::Drop,
        FaultKind::Corrupt,
        FaultKind::Dup,
        FaultKind::LossSpike,
        FaultKind::StoreOutage,
    ];

    /// The TOML name (also the key of `FaultBook::fired_counts`).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Panic => "panic",
            FaultKind::Hang => "hang",
            FaultKind::Slow => "slow",
            FaultKind::Drop => "drop",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Dup => "dup",
            FaultKind::LossSpike => "loss_spike",
            FaultKind::StoreOutage => "store_outage",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A slow fault's factor when the plan does not give one.
pub const DEFAULT_SLOW_FACTOR: f64 = 3.0;

/// One injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_step: u64,
    /// Default `forward`.
    #[serde(default)]
    pub phase: Phase,
    pub actor: Target,
    /// Default 0.
    #[serde(default)]
    pub rank: usize,
    /// Default `panic`.
    #[serde(default)]
    pub kind: FaultKind,
    /// The factor as written in the plan (`None`: not given); read it with [`Fault::factor`].
    #[serde(default)]
    pub factor: Option<f64>,
    /// How long a `store_outage` lasts, in milliseconds (required there, refused elsewhere).
    #[serde(default)]
    pub duration_ms: Option<u64>,
}

impl Fault {
    /// A fault with the defaults: phase forward, rank 0, kind panic, no factor.
    pub fn new(at_step: u64, actor: Target) -> Fault {
        Fault {
            at_step,
            phase: Phase::Forward,
            actor,
            rank: 0,
            kind: FaultKind::Panic,
            factor: None,
            duration_ms: None,
        }
    }

    /// How many times longer a `slow` fault makes the op (default 3.0; meaningless for the other
    /// kinds).
    pub fn factor(&self) -> f64 {
        self.factor.unwrap_or(DEFAULT_SLOW_FACTOR)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} rank {} at step {}, phase {}",
            self.kind, self.actor, self.rank, self.at_step, self.phase
        )?;
        if self.kind == FaultKind::Slow {
            write!(f, " (factor {})", self.factor())?;
        }
        Ok(())
    }
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

/// The tables of a simulation scenario (`simulations/scenarios/*.toml`) that a plan leaves to
/// `phalanx simulate`.
pub const SIMULATION_KEYS: [&str; 7] = [
    "name",
    "description",
    "cluster",
    "run",
    "failures",
    "checkpoint",
    "recovery",
];

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
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| format!("{file}: not valid TOML: {}", e.message()))?;
        // a simulation scenario with `[[fault]]` tables is a plan too: its other tables are the
        // simulator's (checked by `phalanx simulate`)
        for key in SIMULATION_KEYS {
            table.remove(key);
        }
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

    /// The `store_outage` faults as (step, milliseconds), and the plan without them.
    pub fn split_store_outages(mut self) -> (Vec<(u64, u64)>, InjectPlan) {
        let outages = self
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::StoreOutage)
            .map(|f| (f.at_step, f.duration_ms.unwrap_or(0)))
            .collect();
        self.faults.retain(|f| f.kind != FaultKind::StoreOutage);
        (outages, self)
    }

    /// The `loss_spike` faults as (step, LR factor: None for a pathological batch), and the
    /// plan without them (what the actors consult).
    pub fn split_loss_spikes(mut self) -> (Vec<(u64, Option<f64>)>, InjectPlan) {
        let steps = self
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::LossSpike)
            .map(|f| (f.at_step, f.factor))
            .collect();
        self.faults.retain(|f| f.kind != FaultKind::LossSpike);
        (steps, self)
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
            if f.actor.is_singleton() && f.rank != 0 {
                return Err(format!(
                    "{at}: field `rank` = {}: the {} is a single actor, its rank must be 0",
                    f.rank, f.actor
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
            if f.actor == Target::Dataloader && f.phase != Phase::Forward {
                return Err(format!(
                    "{at}: field `phase` = \"{}\": a dataloader fault fires on the batch request, its phase must be \"forward\"",
                    f.phase
                ));
            }
            match (f.kind == FaultKind::StoreOutage, f.actor == Target::Store) {
                (true, false) => {
                    return Err(format!(
                        "{at}: field `actor` = \"{}\": a store outage hits the checkpoint store, its actor must be \"store\"",
                        f.actor
                    ));
                }
                (false, true) => {
                    return Err(format!(
                        "{at}: field `kind` = \"{}\": the store only takes kind \"store_outage\"",
                        f.kind
                    ));
                }
                _ => {}
            }
            match (f.kind, f.duration_ms) {
                (FaultKind::StoreOutage, None | Some(0)) => {
                    return Err(format!(
                        "{at}: field `duration_ms`: a store outage needs a duration of at least 1 ms"
                    ));
                }
                (FaultKind::StoreOutage, _) | (_, None) => {}
                (kind, Some(_)) => {
                    return Err(format!(
                        "{at}: field `duration_ms`: only a \"store_outage\" fault takes a duration (this one is \"{kind}\")"
                    ));
                }
            }
            if f.kind == FaultKind::LossSpike && f.actor != Target::Dataloader {
                return Err(format!(
                    "{at}: field `actor` = \"{}\": a loss spike is a pathological batch, its actor must be \"dataloader\"",
                    f.actor
                ));
            }
            match (f.kind, f.factor) {
                (FaultKind::Slow, Some(x)) if !(x.is_finite() && x > 1.0) => {
                    return Err(format!(
                        "{at}: field `factor` = {x}: a slow fault's factor must be finite and > 1"
                    ));
                }
                (FaultKind::LossSpike, Some(x)) if !(x.is_finite() && x > 1.0) => {
                    return Err(format!(
                        "{at}: field `factor` = {x}: a loss spike's LR factor must be finite and > 1"
                    ));
                }
                (FaultKind::Slow | FaultKind::LossSpike, _) | (_, None) => {}
                (kind, Some(x)) => {
                    return Err(format!(
                        "{at}: field `factor` = {x}: only a \"slow\" or \"loss_spike\" fault takes a factor (this one is \"{kind}\")"
                    ));
                }
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

/// Kind name → count, with every kind present.
fn count_kinds(kinds: impl Iterator<Item = FaultKind>) -> BTreeMap<String, u64> {
    let mut m: BTreeMap<String, u64> = FaultKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), 0))
        .collect();
    for k in kinds {
        *m.entry(k.name().to_string()).or_default() += 1;
    }
    m
}

/// The faults of a plan with a fired flag each: every fault fires at most once, even when its
/// step is replayed. Shared between threads (`&self` everywhere).
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
    pub fn take(&self, step: u64, phase: Phase, actor: Target, rank: usize) -> Option<Fault> {
        self.faults.iter().find_map(|(f, fired)| {
            let hit = f.at_step == step && f.phase == phase && f.actor == actor && f.rank == rank;
            (hit && !fired.swap(true, Ordering::SeqCst)).then_some(*f)
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

    /// Kind name → how many faults of that kind have fired; every kind is present (0 if none).
    pub fn fired_counts(&self) -> BTreeMap<String, u64> {
        count_kinds(
            self.faults
                .iter()
                .filter(|(_, fired)| fired.load(Ordering::SeqCst))
                .map(|(f, _)| f.kind),
        )
    }

    /// Kind name → how many faults of that kind the plan holds; every kind is present.
    pub fn scheduled_counts(&self) -> BTreeMap<String, u64> {
        count_kinds(self.faults.iter().map(|(f, _)| f.kind))
    }
}

#[cfg(test)]
mod tests;
