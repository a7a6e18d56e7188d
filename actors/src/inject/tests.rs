//! Tests of the fault-injection plan: parsing, validation errors naming file, fault and field,
//! and the book that fires each fault once.
use super::*;

fn one(body: &str) -> Result<InjectPlan, String> {
    InjectPlan::parse(&format!("[[fault]]\n{body}"), "plan.toml")
}

/// Parses one fault and validates it on 10 steps, 2 ranks, ep 2.
fn check(body: &str) -> Result<Fault, String> {
    let p = one(body)?;
    p.validate(10, 2, 2)?;
    Ok(p.faults[0])
}

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
            kind: FaultKind::Hang,
            factor: None,
            duration_ms: None,
        }]
    );
    p.validate(10, 2, 1).unwrap();
    let book = FaultBook::new(&p);
    assert_eq!(book.take(3, Phase::Weight, Target::Gpu, 0), None);
    let f = book.take(3, Phase::Weight, Target::Gpu, 1).unwrap();
    assert_eq!(f.kind, FaultKind::Hang);
    assert_eq!(
        book.take(3, Phase::Weight, Target::Gpu, 1),
        None,
        "fires once"
    );
    assert!(book.unfired().is_empty());
}

#[test]
fn parses_every_kind() {
    for k in FaultKind::ALL {
        let (actor, extra) = match k {
            FaultKind::LossSpike => ("dataloader", ""),
            FaultKind::StoreOutage => ("store", "duration_ms = 300\n"),
            _ => ("stage", ""),
        };
        let f = check(&format!(
            "at_step = 2\nactor = \"{actor}\"\nkind = \"{k}\"\n{extra}"
        ))
        .unwrap();
        assert_eq!(f.kind, k);
        assert_eq!(FaultKind::parse(k.name()), Some(k));
    }
    let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(
        names,
        [
            "panic",
            "hang",
            "slow",
            "drop",
            "corrupt",
            "dup",
            "loss_spike",
            "store_outage"
        ]
    );
    for (text, field) in [
        (
            "actor = \"store\"\nkind = \"store_outage\"\n",
            "duration_ms",
        ),
        (
            "actor = \"gpu\"\nkind = \"store_outage\"\nduration_ms = 5\n",
            "actor",
        ),
        ("actor = \"store\"\n", "kind"),
        ("actor = \"gpu\"\nduration_ms = 5\n", "duration_ms"),
    ] {
        let e = check(&format!("at_step = 2\n{text}")).unwrap_err();
        assert!(e.contains(&format!("field `{field}`")), "{text}: {e}");
    }
    // a loss spike is made by the data: any other actor is refused by name
    let e = check("at_step = 2\nactor = \"stage\"\nkind = \"loss_spike\"\n").unwrap_err();
    assert!(
        e.contains("field `actor`") && e.contains("dataloader"),
        "{e}"
    );
    let e = check("at_step = 2\nactor = \"dataloader\"\nkind = \"loss_spike\"\nfactor = 0.5\n")
        .unwrap_err();
    assert!(e.contains("field `factor`"), "{e}");
    assert_eq!(FaultKind::parse("nope"), None);
}

#[test]
fn parses_every_actor() {
    for t in Target::ALL {
        let kind = if t == Target::Store {
            "kind = \"store_outage\"\nduration_ms = 10\n"
        } else {
            ""
        };
        let f = check(&format!("at_step = 2\nactor = \"{t}\"\n{kind}")).unwrap();
        assert_eq!(f.actor, t);
        assert_eq!(Target::parse(t.name()), Some(t));
    }
    // Message kinds on the dataloader are allowed.
    for k in [FaultKind::Drop, FaultKind::Corrupt, FaultKind::Dup] {
        let f = check(&format!(
            "at_step = 2\nactor = \"dataloader\"\nphase = \"forward\"\nkind = \"{k}\"\n"
        ))
        .unwrap();
        assert_eq!((f.actor, f.kind), (Target::Dataloader, k));
    }
    // The coordinator takes any phase.
    for p in Phase::ALL {
        let f = check(&format!(
            "at_step = 2\nactor = \"coordinator\"\nphase = \"{p}\"\n"
        ))
        .unwrap();
        assert_eq!(f.phase, p);
    }
}

#[test]
fn defaults() {
    let f = check("at_step = 4\nactor = \"coordinator\"\n").unwrap();
    assert_eq!(f, Fault::new(4, Target::Coordinator));
    assert_eq!(f.kind, FaultKind::Panic);
    assert_eq!(f.phase, Phase::Forward);
    assert_eq!(f.rank, 0);
    assert_eq!(f.factor, None);
    assert_eq!(f.factor(), 3.0);
    let f = check("at_step = 4\nactor = \"stage\"\nkind = \"slow\"\n").unwrap();
    assert_eq!(f.factor(), 3.0);
    let f = check("at_step = 4\nactor = \"stage\"\nkind = \"slow\"\nfactor = 7.5\n").unwrap();
    assert_eq!(f.factor(), 7.5);
    // An integer factor is accepted too.
    let f = check("at_step = 4\nactor = \"gpu\"\nkind = \"slow\"\nfactor = 4\n").unwrap();
    assert_eq!(f.factor(), 4.0);
    assert_eq!(
        f.to_string(),
        "slow on gpu rank 0 at step 4, phase forward (factor 4)"
    );
}

#[test]
fn errors_name_the_file_and_the_field() {
    let e = one("at_step = 3\nphase = \"fwd\"\nactor = \"gpu\"\nrank = 1\nkind = \"hang\"\n")
        .unwrap_err();
    assert!(
        e.starts_with("plan.toml: [[fault]] #1: field `phase`: unknown variant `fwd`"),
        "{e}"
    );
    assert!(e.contains("forward"), "{e}");
    let e = one("at_step = 3\n").unwrap_err();
    assert!(e.contains("missing field `actor`"), "{e}");
    let e = one("phase = \"forward\"\nactor = \"gpu\"\n").unwrap_err();
    assert!(e.contains("missing field `at_step`"), "{e}");
    let e = one(
        "at_step = 3\nphase = \"forward\"\nactor = \"stage\"\nrank = 4\nkind = \"panic\"\nextra = 1\n",
    )
    .unwrap_err();
    assert!(e.contains("unknown field `extra`"), "{e}");
    let p =
        one("at_step = 3\nphase = \"forward\"\nactor = \"stage\"\nrank = 4\nkind = \"panic\"\n")
            .unwrap();
    let e = p.validate(10, 2, 1).unwrap_err();
    assert_eq!(
        e,
        "plan.toml: [[fault]] #1: field `rank` = 4: the layout has 2 pipeline rank(s) (0..2)"
    );
    let e = p.validate(2, 8, 1).unwrap_err();
    assert!(e.contains("field `at_step` = 3"), "{e}");
}

#[test]
fn refuses_unknown_kind_and_actor() {
    let e = one("at_step = 3\nactor = \"stage\"\nkind = \"explode\"\n").unwrap_err();
    assert!(
        e.starts_with("plan.toml: [[fault]] #1: field `kind`: unknown variant `explode`"),
        "{e}"
    );
    for k in FaultKind::ALL {
        assert!(e.contains(&format!("`{k}`")), "{e}");
    }
    let e = one("at_step = 3\nactor = \"scheduler\"\n").unwrap_err();
    assert!(
        e.starts_with("plan.toml: [[fault]] #1: field `actor`: unknown variant `scheduler`"),
        "{e}"
    );
    for t in Target::ALL {
        assert!(e.contains(&format!("`{t}`")), "{e}");
    }
}

#[test]
fn refuses_bad_targets() {
    let e = check("at_step = 3\nactor = \"dataloader\"\nphase = \"backward\"\n").unwrap_err();
    assert_eq!(
        e,
        "plan.toml: [[fault]] #1: field `phase` = \"backward\": a dataloader fault fires on the batch request, its phase must be \"forward\""
    );
    let e = check("at_step = 3\nactor = \"coordinator\"\nrank = 1\n").unwrap_err();
    assert_eq!(
        e,
        "plan.toml: [[fault]] #1: field `rank` = 1: the coordinator is a single actor, its rank must be 0"
    );
    let e = check("at_step = 3\nactor = \"dataloader\"\nrank = 5\n").unwrap_err();
    assert!(
        e.contains("field `rank` = 5: the dataloader is a single actor"),
        "{e}"
    );
    // Fault numbers count in file order.
    let p = InjectPlan::parse(
        "[[fault]]\nat_step = 1\nactor = \"stage\"\n[[fault]]\nat_step = 11\nactor = \"gpu\"\n",
        "p.toml",
    )
    .unwrap();
    let e = p.validate(10, 2, 1).unwrap_err();
    assert_eq!(
        e,
        "p.toml: [[fault]] #2: field `at_step` = 11: the run has steps 1..=10"
    );
}

#[test]
fn refuses_bad_factors() {
    let e = check("at_step = 3\nactor = \"stage\"\nkind = \"slow\"\nfactor = 0.5\n").unwrap_err();
    assert_eq!(
        e,
        "plan.toml: [[fault]] #1: field `factor` = 0.5: a slow fault's factor must be finite and > 1"
    );
    for bad in ["1.0", "-2.0", "nan", "inf", "0"] {
        let e = check(&format!(
            "at_step = 3\nactor = \"stage\"\nkind = \"slow\"\nfactor = {bad}\n"
        ))
        .unwrap_err();
        assert!(e.contains("field `factor`"), "{bad}: {e}");
    }
    let e = check("at_step = 3\nactor = \"gpu\"\nkind = \"panic\"\nfactor = 2.0\n").unwrap_err();
    assert_eq!(
        e,
        "plan.toml: [[fault]] #1: field `factor` = 2: only a \"slow\" or \"loss_spike\" fault takes a factor (this one is \"panic\")"
    );
    // Also when the kind is left to its default.
    let e = check("at_step = 3\nactor = \"gpu\"\nfactor = 2.0\n").unwrap_err();
    assert!(
        e.contains("field `factor`") && e.contains("\"panic\""),
        "{e}"
    );
    let e = one("at_step = 3\nactor = \"gpu\"\nkind = \"slow\"\nfactor = \"fast\"\n").unwrap_err();
    assert!(
        e.starts_with("plan.toml: [[fault]] #1: field `factor`: "),
        "{e}"
    );
}

#[test]
fn refuses_step_beyond_steps() {
    let e = check("at_step = 11\nactor = \"stage\"\n").unwrap_err();
    assert_eq!(
        e,
        "plan.toml: [[fault]] #1: field `at_step` = 11: the run has steps 1..=10"
    );
    let e = check("at_step = 0\nactor = \"stage\"\n").unwrap_err();
    assert!(e.contains("field `at_step` = 0"), "{e}");
}

#[test]
fn counts_fired_and_scheduled_faults() {
    let p = InjectPlan::parse(
        "[[fault]]\nat_step = 1\nactor = \"stage\"\nkind = \"slow\"\nfactor = 2.0\n\
         [[fault]]\nat_step = 2\nactor = \"dataloader\"\nkind = \"drop\"\n\
         [[fault]]\nat_step = 2\nactor = \"dataloader\"\nkind = \"drop\"\n\
         [[fault]]\nat_step = 3\nactor = \"coordinator\"\nphase = \"optimizer\"\nkind = \"dup\"\n\
         [[fault]]\nat_step = 4\nactor = \"gpu\"\nrank = 1\nkind = \"corrupt\"\n",
        "plan.toml",
    )
    .unwrap();
    p.validate(10, 2, 1).unwrap();
    let book = FaultBook::new(&p);
    let zero: BTreeMap<String, u64> = FaultKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), 0))
        .collect();
    assert_eq!(book.fired_counts(), zero);
    let sched = book.scheduled_counts();
    assert_eq!(sched.len(), FaultKind::ALL.len());
    assert_eq!(
        (
            sched["panic"],
            sched["hang"],
            sched["slow"],
            sched["drop"],
            sched["corrupt"],
            sched["dup"]
        ),
        (0, 0, 1, 2, 1, 1)
    );

    let f = book.take(1, Phase::Forward, Target::Stage, 0).unwrap();
    assert_eq!((f.kind, f.factor()), (FaultKind::Slow, 2.0));
    assert_eq!(book.take(1, Phase::Forward, Target::Stage, 0), None);
    // Two identical faults: each fires once.
    assert!(
        book.take(2, Phase::Forward, Target::Dataloader, 0)
            .is_some()
    );
    assert!(
        book.take(2, Phase::Forward, Target::Dataloader, 0)
            .is_some()
    );
    assert_eq!(book.take(2, Phase::Forward, Target::Dataloader, 0), None);
    assert_eq!(book.take(3, Phase::Forward, Target::Coordinator, 0), None);
    let f = book
        .take(3, Phase::Optimizer, Target::Coordinator, 0)
        .unwrap();
    assert_eq!(f.kind, FaultKind::Dup);

    let fired = book.fired_counts();
    assert_eq!(fired.len(), FaultKind::ALL.len());
    assert_eq!(
        (
            fired["panic"],
            fired["hang"],
            fired["slow"],
            fired["drop"],
            fired["corrupt"],
            fired["dup"]
        ),
        (0, 0, 1, 2, 0, 1)
    );
    let unfired = book.unfired();
    assert_eq!(unfired.len(), 1);
    assert_eq!(unfired[0].kind, FaultKind::Corrupt);
    assert_eq!(
        book.scheduled_counts(),
        sched,
        "scheduled counts do not move"
    );
}

#[test]
fn fires_once_across_threads() {
    let p = InjectPlan::parse("[[fault]]\nat_step = 1\nactor = \"stage\"\n", "plan.toml").unwrap();
    let book = FaultBook::new(&p);
    let hits: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| book.take(1, Phase::Forward, Target::Stage, 0).is_some() as usize))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(hits, 1);
    assert_eq!(book.fired_counts()["panic"], 1);
}
