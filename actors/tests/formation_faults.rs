//! The actor formation: a clean run equals the single-process run bit for bit, and a run with
//! injected panics and hangs (stage and gpu actors, every phase) heals to the same weights.

mod common;

use actors::formation::{self, InjectPlan, Layout, Wire};
use actors::schedule::ScheduleKind;
use actors::trainer;

fn layout(schedule: ScheduleKind, pp: usize, microbatches: usize) -> Layout {
    Layout {
        pp,
        ep: 1,
        schedule,
        microbatches,
        wire: Wire::F32,
        compute: Default::default(),
    }
}

#[test]
fn actor_formation_matches_single_process_bitwise() {
    for (kind, pp, m) in [
        (ScheduleKind::OneFOneB, 2, 4),
        (ScheduleKind::Zb1p, 2, 4),
        (ScheduleKind::DualPipe, 2, 4),
        (ScheduleKind::DualPipeV, 2, 4),
    ] {
        let name = format!("{kind}-{pp}-{m}");
        let opts = common::micro_options(&format!("actors-ref-{name}"), 4, 4, 3);
        let want = trainer::train_microbatched(&opts, m, |_, _| {}).expect("reference");
        let opts = common::micro_options(&format!("actors-{name}"), 4, 4, 3);
        let got =
            formation::train(&opts, &layout(kind, pp, m), None, |_, _| {}).expect("formation");
        println!(
            "{name}: {} (reference {})",
            got.params_sha256, want.params_sha256
        );
        assert_eq!(got.params_sha256, want.params_sha256, "{name}");
        assert_eq!((got.restarts, got.replayed_steps), (0, 0));
    }
}

/// 20 faults over 40 steps: panics and hangs of stage and gpu actors in every phase.
fn plan_text() -> String {
    let mut s = String::from("step_timeout_ms = 1500\n");
    let phases = ["forward", "backward", "weight", "optimizer"];
    for i in 0..20u64 {
        let step = 2 + i * 2 - (i % 3 == 0) as u64;
        let actor = if i % 4 == 1 { "gpu" } else { "stage" };
        let kind = if i % 5 == 2 { "hang" } else { "panic" };
        s.push_str(&format!(
            "\n[[fault]]\nat_step = {step}\nphase = \"{}\"\nactor = \"{actor}\"\nrank = {}\nkind = \"{kind}\"\n",
            phases[(i as usize) % 4],
            i % 2
        ));
    }
    s
}

#[test]
fn forty_steps_with_twenty_faults_end_with_the_clean_weights() {
    let plan = InjectPlan::parse(&plan_text(), "faults.toml").expect("plan parses");
    assert_eq!(plan.faults.len(), 20);
    let opts = common::micro_options("faults-ref", 4, 4, 40);
    let clean = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("clean run");
    let opts = common::micro_options("faults", 4, 4, 40);
    let lay = layout(ScheduleKind::DualPipe, 2, 4);
    let faulty = formation::train(&opts, &lay, Some(plan), |_, _| {}).expect("faulty run heals");
    println!(
        "clean {} / with faults {}: restarts {}, replayed steps {}, final loss {} vs {}",
        clean.params_sha256,
        faulty.params_sha256,
        faulty.restarts,
        faulty.replayed_steps,
        faulty.final_loss,
        clean.final_loss
    );
    assert_eq!(faulty.params_sha256, clean.params_sha256);
    assert_eq!(
        (faulty.restarts, faulty.replayed_steps),
        (20, 20),
        "every fault restarts one actor and replays its step"
    );
}
