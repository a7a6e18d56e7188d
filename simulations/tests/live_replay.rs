//! A scenario with `[[fault]]` tables is one file for a live run (`phalanx train --inject`) and
//! for the simulator: both read the same faults, and the simulator charges each what its model
//! of the formation says (checked against live runs by `scripts/live_vs_sim.sh`).

use actors::inject::{FaultKind, InjectPlan};
use simulations::run::{EventLine, Policy, simulate};
use simulations::scenario::Scenario;

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/live-tiny.toml")
}

#[test]
fn the_live_scenario_is_an_inject_plan_with_the_same_faults() {
    let plan = InjectPlan::load(&path()).unwrap();
    let scenario = Scenario::load(&path()).unwrap();
    assert_eq!(plan.faults, scenario.faults);
    assert_eq!(plan.faults.len(), 8);
    assert_eq!(plan.step_timeout_ms, scenario.step_timeout_ms);
    plan.validate(40, 2, 1).unwrap();
}

#[test]
fn scripted_faults_cost_what_the_formation_takes_to_see_and_replay_them() {
    let mut s = Scenario::load(&path()).unwrap();
    s.run.step_seconds = Some(0.4);
    let mut lines: Vec<EventLine> = Vec::new();
    let o = simulate(&s, Policy::ActorRestart, 1, &mut |e| lines.push(e.clone())).unwrap();
    assert_eq!((o.steps, o.interruptions), (40, 8));
    let failures: Vec<&EventLine> = lines.iter().filter(|e| e.event == "failure").collect();
    let by_step = |step: u64| {
        failures
            .iter()
            .find(|e| e.step + 1 == step)
            .unwrap_or_else(|| panic!("no failure in step {step}: {lines:?}"))
    };
    // a stage hang in step 5's forward pass (at 0.15 of the step): the failure detector's
    // verdict (1.8 s bound, heartbeats every 100 ms: 1.9 s) comes before the 3 s step timeout;
    // then the Supervisor's first backoff (5 ms) and the restart (10 ms)
    let h = by_step(5);
    assert!((h.lost_work_s.unwrap() - 0.06).abs() < 1e-9, "{h:?}");
    assert!((h.detect_s.unwrap() - 1.9).abs() < 1e-9, "{h:?}");
    assert!((h.downtime_s.unwrap() - 1.915).abs() < 1e-9, "{h:?}");
    // a GpuActor hang: the failure detector's verdict again (the probe would come later)
    let g = by_step(21);
    assert!((g.detect_s.unwrap() - 1.9).abs() < 1e-9, "{g:?}");
    // a panic in step 29's optimizer phase: seen at once, 95% of the step thrown away
    let p = by_step(29);
    assert_eq!(p.detect_s, Some(0.0));
    assert!((p.lost_work_s.unwrap() - 0.38).abs() < 1e-9, "{p:?}");
    // wall time: the steps, plus every fault's detection, backoff, restart and thrown-away work
    let lost: f64 = failures
        .iter()
        .map(|e| e.downtime_s.unwrap() + e.lost_work_s.unwrap())
        .sum();
    let wall = o.wall_hours * 3600.0;
    assert!(
        (wall - (40.0 * 0.4 + lost)).abs() < 1e-6,
        "{wall} vs {lost}"
    );
    // the kinds the file holds, as the live plan names them
    let hangs = s
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::Hang)
        .count();
    assert_eq!(hangs, 4);
}
