//! The formation with its stage copies on a device backend (`Layout::compute`): on the CPU
//! backend (the CPU ops through the `Backend` trait, what a GPU's backend is checked against),
//! every schedule run by the thread executor and by the supervised actors (with injected panics
//! healed) ends with the single-process run's parameters bit for bit, also with expert groups
//! on the backend and every fault kind injected.

mod common;

use actors::formation::{self, InjectPlan, Layout, StagePlacement, Wire};
use actors::schedule::ScheduleKind;
use actors::trainer;
use kernels::device::Device;
use kernels::device::backend::GemmPrecision;

const ON_CPU_BACKEND: StagePlacement = StagePlacement::Backend {
    device: Device::Cpu,
    gemm: GemmPrecision::F32,
};

fn layout(schedule: ScheduleKind, pp: usize, microbatches: usize) -> Layout {
    Layout {
        pp,
        ep: 1,
        schedule,
        microbatches,
        wire: Wire::F32,
        compute: ON_CPU_BACKEND,
    }
}

#[test]
fn device_stages_match_single_process_bitwise_on_every_schedule() {
    for (kind, pp, m) in [
        (ScheduleKind::OneFOneB, 2, 4),
        (ScheduleKind::Zb1p, 3, 8),
        (ScheduleKind::DualPipe, 2, 4),
        (ScheduleKind::DualPipeV, 2, 8),
    ] {
        let name = format!("{kind}-{pp}-{m}");
        let opts = common::micro_options(&format!("dev-ref-{name}"), 4, 8, 3);
        let want = trainer::train_microbatched(&opts, m, |_, _| {}).expect("reference run");
        let opts = common::micro_options(&format!("dev-threads-{name}"), 4, 8, 3);
        let got = formation::train_threads(&opts, &layout(kind, pp, m), |_, _| {})
            .expect("device stages, thread executor");
        println!(
            "{name} threads: {} (reference {})",
            got.params_sha256, want.params_sha256
        );
        assert_eq!(got.params_sha256, want.params_sha256, "{name}, threads");
        assert_eq!(got.final_loss.to_bits(), want.final_loss.to_bits());
    }
}

/// The actor formation on device stages, clean and with stage and gpu panics in every phase:
/// a restarted stage copy opens its device again and loads the committed values.
#[test]
fn actor_formation_on_device_stages_heals_to_the_same_bits() {
    let kind = ScheduleKind::DualPipe;
    let opts = common::micro_options("dev-actors-ref", 4, 4, 6);
    let want = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("reference");
    let opts = common::micro_options("dev-actors", 4, 4, 6);
    let got = formation::train(&opts, &layout(kind, 2, 4), None, |_, _| {}).expect("formation");
    assert_eq!(got.params_sha256, want.params_sha256, "clean");
    let mut plan = String::from("step_timeout_ms = 1500\n");
    for (step, phase, actor, rank) in [
        (2, "forward", "stage", 0),
        (3, "backward", "stage", 1),
        (4, "weight", "gpu", 0),
        (5, "optimizer", "stage", 1),
    ] {
        plan.push_str(&format!(
            "\n[[fault]]\nat_step = {step}\nphase = \"{phase}\"\nactor = \"{actor}\"\nrank = {rank}\nkind = \"panic\"\n"
        ));
    }
    let plan = InjectPlan::parse(&plan, "device-faults.toml").expect("plan");
    let opts = common::micro_options("dev-actors-faults", 4, 4, 6);
    let healed =
        formation::train(&opts, &layout(kind, 2, 4), Some(plan), |_, _| {}).expect("healed");
    println!(
        "device stages, 4 panics: {} restarts, {} replayed, {} (reference {})",
        healed.restarts, healed.replayed_steps, healed.params_sha256, want.params_sha256
    );
    // every panic restarts one actor and replays its step
    assert_eq!((healed.restarts, healed.replayed_steps), (4, 4));
    assert_eq!(healed.params_sha256, want.params_sha256, "after faults");
}

/// `--ep 2` on device stages: every stage copy's routed experts in two expert groups, groups and
/// the rest of the copy's layers on the CPU backend (the groups on their copy's device). The
/// thread executor and the supervised actors (ExpertGroupActors, with a panic in an expert group
/// healed: the restarted group opens its device again) end with the CPU formation's bits under
/// the same `--ep 2`; with BF16 GEMMs on the backend the bits change and the loss stays near.
#[test]
fn expert_groups_on_device_stages_keep_the_cpu_formation_bits() {
    let kind = ScheduleKind::OneFOneB;
    let mut cpu = layout(kind, 2, 4);
    cpu.compute = StagePlacement::Model;
    cpu.ep = 2;
    let mut dev = layout(kind, 2, 4);
    dev.ep = 2;
    let opts = common::micro_options("dev-ep-cpu", 4, 8, 3);
    let want = formation::train_threads(&opts, &cpu, |_, _| {}).expect("cpu formation, --ep 2");
    let opts = common::micro_options("dev-ep-threads", 4, 8, 3);
    let threads = formation::train_threads(&opts, &dev, |_, _| {}).expect("device stages, --ep 2");
    let plan = "step_timeout_ms = 1500\n\n[[fault]]\nat_step = 2\nphase = \"forward\"\nactor = \"expert\"\nrank = 1\nkind = \"panic\"\n";
    let plan = InjectPlan::parse(plan, "device-ep-faults.toml").expect("plan");
    let opts = common::micro_options("dev-ep-actors", 4, 8, 3);
    let actors = formation::train(&opts, &dev, Some(plan), |_, _| {}).expect("actors, --ep 2");
    println!(
        "--ep 2 on device stages: threads {}, actors {} ({} restarts), cpu formation {}",
        threads.params_sha256, actors.params_sha256, actors.restarts, want.params_sha256
    );
    assert_eq!(threads.params_sha256, want.params_sha256, "threads");
    assert_eq!(actors.params_sha256, want.params_sha256, "actors");
    assert_eq!(actors.restarts, 1, "the expert group's panic was healed");
    // the stage copies really computed on the backend: with BF16 GEMMs there they leave the bits
    dev.compute = StagePlacement::Backend {
        device: Device::Cpu,
        gemm: GemmPrecision::Bf16,
    };
    let opts = common::micro_options("dev-ep-bf16", 4, 8, 3);
    let bf16 = formation::train_threads(&opts, &dev, |_, _| {}).expect("bf16 device stages");
    let rel = (bf16.final_loss - want.final_loss).abs() / want.final_loss;
    assert_ne!(
        bf16.params_sha256, want.params_sha256,
        "bf16 stages ran as f32"
    );
    assert!(
        rel < 1e-4,
        "bf16 stages with --ep 2: loss {rel:.2e} from f32"
    );
}

/// The device stages really run: with BF16 GEMMs on the CPU backend (which rounds the operands as
/// a GPU's mixed precision does) both engines leave the f32 run's bits and stay near its loss.
#[test]
fn bf16_device_stages_leave_the_f32_bits_in_both_engines() {
    let mut l = layout(ScheduleKind::OneFOneB, 2, 4);
    l.compute = StagePlacement::Backend {
        device: Device::Cpu,
        gemm: GemmPrecision::Bf16,
    };
    let opts = common::micro_options("dev-bf16-ref", 4, 8, 3);
    let want = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("reference");
    let opts = common::micro_options("dev-bf16-threads", 4, 8, 3);
    let threads = formation::train_threads(&opts, &l, |_, _| {}).expect("threads");
    let opts = common::micro_options("dev-bf16-actors", 4, 8, 3);
    let actors = formation::train(&opts, &l, None, |_, _| {}).expect("actors");
    for (engine, got) in [("threads", &threads), ("actors", &actors)] {
        let rel = (got.final_loss - want.final_loss).abs() / want.final_loss;
        println!(
            "bf16 device stages, {engine}: loss {} vs f32 {} (relative {rel:.2e})",
            got.final_loss, want.final_loss
        );
        assert_ne!(
            got.params_sha256, want.params_sha256,
            "{engine}: BF16 ran as f32"
        );
        assert!(rel < 1e-4, "{engine}: BF16 loss {rel:.2e} from f32");
    }
    assert_eq!(
        threads.params_sha256, actors.params_sha256,
        "threads and actors agree"
    );
}

/// `--precision fp8` with formation flags on a device: the stage copies run the FP8 Linears over
/// the BF16 baseline the single-process device run uses (`GemmPrecision::device_baseline`), and
/// the formation ends with that run's bits (the CPU backend).
#[test]
fn fp8_device_stages_are_the_single_process_device_run() {
    let precision = kernels::model::Precision::Fp8;
    let mut l = layout(ScheduleKind::Zb1p, 2, 4);
    l.compute = StagePlacement::Backend {
        device: Device::Cpu,
        gemm: GemmPrecision::device_baseline(precision),
    };
    let mut opts = common::micro_options("dev-fp8-single", 4, 8, 3);
    opts.precision = precision;
    let want =
        actors::engine::train_on_device(&opts, kernels::device::backend::Cpu::new(), 4, |_, _| {})
            .expect("single-process device run");
    let mut opts = common::micro_options("dev-fp8-threads", 4, 8, 3);
    opts.precision = precision;
    let got = formation::train_threads(&opts, &l, |_, _| {}).expect("fp8 device stages");
    println!(
        "fp8 over bf16, zb1p pp2: {} (single-process device run {})",
        got.params_sha256, want.params_sha256
    );
    assert_eq!(got.params_sha256, want.params_sha256);
    assert_eq!(got.final_loss.to_bits(), want.final_loss.to_bits());
}

/// Every fault kind (panic, hang, slow, drop, corrupt, dup) on every actor type, as
/// `fault_kinds.rs` injects them into the CPU formation, with the stage copies and their expert
/// groups (`--ep 2`) on the CPU backend: the run heals to the clean run's weights with the same
/// counts (10 restarts, 14 replayed steps, 2 coordinator replacements, each kind fired 5 times);
/// a restarted stage copy or expert group opens its device again when it starts.
#[test]
fn every_fault_kind_heals_on_device_stages_and_expert_groups() {
    let plan = InjectPlan::parse(&common::every_kind_plan(), "every-kind.toml").expect("plan");
    let steps = 34;
    let opts = common::micro_options("dev-kinds-ref", 2, 4, steps);
    let clean = trainer::train_microbatched(&opts, 4, |_, _| {}).expect("clean run");
    let mut l = layout(ScheduleKind::DualPipe, 2, 4);
    l.ep = 2;
    let opts = common::micro_options("dev-kinds", 2, 4, steps);
    let faulty = formation::train(&opts, &l, Some(plan), |_, _| {}).expect("heals");
    println!(
        "device stages and groups, every kind: {} (clean {}): restarts {}, replayed {}, coordinator restarts {}, fired {:?}",
        faulty.params_sha256,
        clean.params_sha256,
        faulty.restarts,
        faulty.replayed_steps,
        faulty.coordinator_restarts,
        faulty.faults_fired
    );
    assert_eq!(faulty.params_sha256, clean.params_sha256);
    for kind in common::KINDS {
        assert_eq!(faulty.faults_fired.get(kind), Some(&5), "{kind}");
    }
    assert_eq!(faulty.coordinator_restarts, 2);
    assert_eq!((faulty.restarts, faulty.replayed_steps), (10, 14));
}
