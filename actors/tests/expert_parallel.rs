//! Expert parallelism (`--ep`): the routed experts in expert groups (ExpertGroupActors in the
//! actor formation, in-process groups behind the wire in the thread executor). With the f32 wire
//! a run equals the single-process run bit for bit; the fp8 wire (FP8 dispatch, BF16 combine)
//! trains close to it; expert-group faults heal to the clean weights.

mod common;

use actors::formation::{self, InjectPlan, Layout, Wire};
use actors::schedule::ScheduleKind;
use actors::trainer;

fn layout(schedule: ScheduleKind, pp: usize, ep: usize, microbatches: usize, wire: Wire) -> Layout {
    Layout {
        pp,
        ep,
        schedule,
        microbatches,
        wire,
        compute: Default::default(),
    }
}

#[test]
fn expert_groups_match_single_process_bitwise() {
    for kind in [ScheduleKind::OneFOneB, ScheduleKind::DualPipe] {
        let name = format!("ep2-{kind}");
        let opts = common::micro_options(&format!("ref-{name}"), 4, 4, 3);
        let want = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("reference");
        let lay = layout(kind, 2, 2, 4, Wire::F32);
        let opts = common::micro_options(&format!("threads-{name}"), 4, 4, 3);
        let threads = formation::train_threads(&opts, &lay, |_, _| {}).expect("threads");
        let opts = common::micro_options(&format!("actors-{name}"), 4, 4, 3);
        let actors = formation::train(&opts, &lay, None, |_, _| {}).expect("actors");
        println!(
            "{kind} --pp 2 --ep 2: actors {} threads {} reference {}",
            actors.params_sha256, threads.params_sha256, want.params_sha256
        );
        assert_eq!(threads.params_sha256, want.params_sha256, "{name} threads");
        assert_eq!(actors.params_sha256, want.params_sha256, "{name} actors");
        assert_eq!(actors.final_loss.to_bits(), want.final_loss.to_bits());
        assert_eq!((actors.restarts, actors.replayed_steps), (0, 0));
    }
}

#[test]
fn fp8_dispatch_trains_close_to_f32() {
    let opts = common::micro_options("ep-wire-ref", 4, 4, 3);
    let want = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("reference");
    let lay = layout(ScheduleKind::DualPipe, 2, 2, 4, Wire::Fp8);
    let opts = common::micro_options("ep-wire-fp8", 4, 4, 3);
    let got = formation::train(&opts, &lay, None, |_, _| {}).expect("fp8 ep run");
    let rel = (got.final_loss - want.final_loss).abs() / want.final_loss.abs();
    println!(
        "--ep 2 --wire fp8: loss {} vs f32 {} (relative {rel:.2e})",
        got.final_loss, want.final_loss
    );
    assert!(rel < 1e-2, "relative loss difference {rel}");
    assert_ne!(
        got.params_sha256, want.params_sha256,
        "fp8 rounds something"
    );
}

#[test]
fn ep_flag_is_validated() {
    let opts = common::micro_options("ep-validate", 4, 4, 1);
    // micro: 8 routed experts in n_group = 4 groups
    for (ep, want) in [
        (0, "--ep must be at least 1"),
        (
            3,
            "--ep 3: the expert groups must split the 8 routed experts",
        ),
        (8, "--ep 8: must equal or divide n_group = 4"),
    ] {
        let lay = layout(ScheduleKind::OneFOneB, 1, ep, 1, Wire::F32);
        let e = lay.validate(&opts).unwrap_err().to_string();
        assert!(e.contains(want), "--ep {ep}: {e}");
    }
    for ep in [1, 2, 4] {
        let lay = layout(ScheduleKind::OneFOneB, 1, ep, 1, Wire::F32);
        lay.validate(&opts).expect("valid --ep");
    }
    let plan = InjectPlan::parse(
        "[[fault]]\nat_step = 1\nphase = \"forward\"\nactor = \"expert\"\nrank = 0\nkind = \"panic\"\n",
        "f.toml",
    )
    .unwrap();
    assert!(plan.validate(1, 1, 1).unwrap_err().contains("--ep > 1"));
    plan.validate(1, 1, 2).expect("expert faults with --ep 2");
}

/// 8 expert-group faults over 16 steps (panics and hangs, every phase, both ranks).
fn plan_text() -> String {
    let mut s = String::from("step_timeout_ms = 1500\n");
    let phases = ["forward", "backward", "weight", "optimizer"];
    for i in 0..8u64 {
        let kind = if i % 4 == 2 { "hang" } else { "panic" };
        s.push_str(&format!(
            "\n[[fault]]\nat_step = {}\nphase = \"{}\"\nactor = \"expert\"\nrank = {}\nkind = \"{kind}\"\n",
            2 + i * 2,
            phases[(i as usize) % 4],
            i % 2
        ));
    }
    s
}

#[test]
fn expert_group_faults_heal_to_the_clean_weights() {
    let plan = InjectPlan::parse(&plan_text(), "faults.toml").expect("plan parses");
    let opts = common::micro_options("ep-faults-ref", 4, 4, 18);
    let clean = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("clean run");
    let opts = common::micro_options("ep-faults", 4, 4, 18);
    let lay = layout(ScheduleKind::DualPipe, 2, 2, 4, Wire::F32);
    let faulty = formation::train(&opts, &lay, Some(plan), |_, _| {}).expect("faulty run heals");
    println!(
        "clean {} / with expert faults {}: restarts {}, replayed steps {}",
        clean.params_sha256, faulty.params_sha256, faulty.restarts, faulty.replayed_steps
    );
    assert_eq!(faulty.params_sha256, clean.params_sha256);
    assert_eq!(
        (faulty.restarts, faulty.replayed_steps),
        (8, 8),
        "every fault restarts one actor and replays its step"
    );
}
