//! Stragglers, store outages and loss spikes in the run-level model: what each costs under the
//! recovery policies.

use simulations::run::{Policy, simulate};
use simulations::scenario::Scenario;

/// 64 nodes for 10 days of 10 s steps, no crashes; `extra` adds keys to `[failures]` and
/// `[checkpoint]`.
fn scenario(failures: &str, checkpoint: &str) -> Scenario {
    let text = format!(
        "name = \"d\"\n[cluster]\nnodes = 64\ngpus_per_node = 8\n[run]\nduration_hours = 240.0\ntokens_per_step = 1.0\nstep_seconds = 10.0\n[failures]\nrate_per_1000_node_days = 0.0\n{failures}\n[checkpoint]\ninterval_steps = 90\nsync_write_seconds = 10.0\nasync_stall_seconds = 1.0\nrestore_seconds = 60.0\n{checkpoint}\n"
    );
    Scenario::parse(&text, "d.toml").unwrap()
}

fn run(s: &Scenario, p: Policy) -> simulations::run::Outcome {
    simulate(s, p, 3, &mut |_| {}).unwrap()
}

#[test]
fn a_straggler_slows_every_policy_alike() {
    // 64 nodes × 10 / 1,000 per day: 6.4 slow spells expected in 10 days, each 30 min at half
    // speed (seed 3 draws fewer); a step started in a spell takes twice as long
    let s = scenario("straggler_rate_per_1000_node_days = 10.0", "");
    assert_eq!(run(&scenario("", ""), Policy::ActorRestart).steps, 86_304);
    for (p, steps) in [
        (Policy::WholeJob, 85_005),
        (Policy::ActorRestart, 85_854),
        (Policy::PeerRestore, 85_854),
    ] {
        let o = run(&s, p);
        let lost = o.lost_gpu_hours_by_cause["straggler"];
        println!("{}: {} steps, straggler {lost:.3} GPU-h", p.name(), o.steps);
        // phalanx notices stragglers but does not evict them: the same cost under every
        // policy (the whole job loses more steps to its synchronous checkpoints)
        assert!((lost - 640.0).abs() < 1e-9, "{lost}");
        assert_eq!((o.steps, o.interruptions), (steps, 0));
    }
}

#[test]
fn checkpoints_due_while_the_store_is_down_are_missed() {
    let s = scenario(
        "",
        "store_outages_per_day = 4.0\nstore_outage_minutes = 60.0",
    );
    let o = run(&s, Policy::ActorRestart);
    println!(
        "committed {}, missed {}",
        o.checkpoints, o.checkpoints_missed
    );
    // ~40 outages of an hour in 10 days, a checkpoint every 15 min: about 160 missed
    assert!(
        (80..=260).contains(&o.checkpoints_missed),
        "{}",
        o.checkpoints_missed
    );
    assert_eq!(o.checkpoints + o.checkpoints_missed, o.steps / 90);
}

#[test]
fn a_loss_spike_costs_phalanx_a_step_and_a_whole_job_a_restart() {
    let s = scenario("loss_spikes_per_1000_steps = 0.5", "");
    let actor = run(&s, Policy::ActorRestart);
    let whole = run(&s, Policy::WholeJob);
    println!(
        "actor: {} rejected, ETT {:.4}; whole job: {} restarts, ETT {:.4}",
        actor.rejected_steps,
        actor.effective_training_time,
        whole.interruptions,
        whole.effective_training_time
    );
    // 86,400 steps × 0.5 / 1,000: 43 expected (3σ ≈ 20)
    assert!(
        (23..=63).contains(&actor.rejected_steps),
        "{}",
        actor.rejected_steps
    );
    assert_eq!(
        actor.interruptions, 0,
        "no restart: the step is rejected and skipped"
    );
    assert!(whole.interruptions > 0);
    assert!(actor.effective_training_time > whole.effective_training_time);
}
