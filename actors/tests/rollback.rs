//! Loss-spike rollback: an injected spike (a pathological batch) is rejected by the loss monitor
//! within its own step, without any restart; a wider rollback window goes back to an older
//! committed state from the in-memory ring or from the store (and both give the same bits);
//! a resume after a rollback reaches the uninterrupted run's weights.

mod common;

use actors::formation::{self, InjectPlan, Layout, Wire};
use actors::schedule::ScheduleKind;
use actors::trainer::{CheckpointPlan, TrainOptions, TrainSummary};

fn layout() -> Layout {
    Layout {
        pp: 2,
        ep: 1,
        schedule: ScheduleKind::OneFOneB,
        microbatches: 2,
        wire: Wire::F32,
        compute: Default::default(),
    }
}

/// A damaging update at `step` (its LR × 1000): step `step + 1`'s loss spikes.
fn spike_at(step: u64) -> InjectPlan {
    let text = format!(
        "[[fault]]\nat_step = {step}\nactor = \"dataloader\"\nkind = \"loss_spike\"\nfactor = 1000.0\n"
    );
    InjectPlan::parse(&text, "spike.toml").expect("plan parses")
}

/// Options at the peak learning rate after 5 steps, whose rollbacks also discard the damaging
/// update before the spiking step (`rollback_skip_steps = 2`, two states in memory).
fn sensitive(mut o: TrainOptions) -> TrainOptions {
    o.config.training.warmup_steps = 5;
    o.config.training.rollback_skip_steps = 2;
    o.config.training.rollback_ring = 2;
    o
}

fn train(opts: &TrainOptions, inject: Option<InjectPlan>) -> TrainSummary {
    formation::train(opts, &layout(), inject, |_, _| {}).expect("run")
}

/// The metrics lines of a run, as JSON.
fn metrics(opts: &TrainOptions) -> Vec<serde_json::Value> {
    std::fs::read_to_string(opts.out_dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn line(m: &[serde_json::Value], step: u64) -> &serde_json::Value {
    m.iter()
        .find(|l| l["step"] == step)
        .unwrap_or_else(|| panic!("no metrics line for step {step}"))
}

#[test]
fn a_spike_is_rolled_back_within_its_step_without_a_restart() {
    let steps = 40;
    let clean = train(&sensitive(common::tiny_options("spike-clean", steps)), None);
    let opts = sensitive(common::tiny_options("spike", steps));
    let spiked = train(&opts, Some(spike_at(30)));
    let m = metrics(&opts);
    let at = line(&m, 31);
    println!(
        "clean eval {:.4}, spiked eval {:.4}; step 30 loss {}, step 31 loss {} ({}), rolled back to {}",
        clean.eval_loss,
        spiked.eval_loss,
        line(&m, 30)["loss"],
        at["loss"],
        at["rejected"],
        at["rolled_back_to"]
    );
    assert_eq!((spiked.rollbacks, spiked.skipped_steps), (1, 2));
    assert_eq!((spiked.restarts, spiked.replayed_steps), (0, 0));
    assert_eq!(spiked.faults_fired.get("loss_spike"), Some(&1));
    assert!(at["rejected"].as_str().unwrap().contains("loss"), "{at}");
    assert_eq!(at["rolled_back_to"], 29);
    assert!(
        line(&m, 30)["rejected"].is_null(),
        "the damaging step itself looked normal"
    );
    assert_eq!((clean.rollbacks, clean.skipped_steps), (0, 0));
    let rel = (spiked.eval_loss - clean.eval_loss).abs() / clean.eval_loss;
    assert!(
        rel <= 0.02,
        "eval loss {} vs clean {}",
        spiked.eval_loss,
        clean.eval_loss
    );
    // only the spike step's update is missing: the weights differ from the clean run's
    assert_ne!(spiked.params_sha256, clean.params_sha256);
}

/// `rollback_skip_steps = 3`: the spike at step 31 goes back to step 28. From the ring when it
/// holds step 28, else from the store (checkpoints every step here): the same bits either way;
/// with checkpoints every 5 steps the store's newest at or before 28 is 25.
#[test]
fn a_wider_rollback_reads_the_ring_or_the_store_with_the_same_result() {
    let steps = 34;
    let with = |name: &str, ring: usize, ckpt: Option<u64>| {
        let mut o = sensitive(common::tiny_options(name, steps));
        o.config.training.rollback_skip_steps = 3;
        o.config.training.rollback_ring = ring;
        o.checkpoints = ckpt.map(|every| CheckpointPlan {
            store: o.out_dir.join("store").display().to_string(),
            every,
            resume: false,
            run: None,
        });
        o
    };
    let ring_opts = with("ring", 4, None);
    let from_ring = train(&ring_opts, Some(spike_at(30)));
    let store_opts = with("store", 0, Some(1));
    let from_store = train(&store_opts, Some(spike_at(30)));
    let coarse_opts = with("store-coarse", 0, Some(5));
    let coarse = train(&coarse_opts, Some(spike_at(30)));
    let back = |o: &TrainOptions| line(&metrics(o), 31)["rolled_back_to"].clone();
    println!(
        "ring {} (back to {}), store {} (back to {}), coarse store {} (back to {})",
        from_ring.params_sha256,
        back(&ring_opts),
        from_store.params_sha256,
        back(&store_opts),
        coarse.params_sha256,
        back(&coarse_opts)
    );
    assert_eq!(back(&ring_opts), 28);
    assert_eq!(back(&store_opts), 28);
    assert_eq!(back(&coarse_opts), 25);
    assert_eq!(from_ring.params_sha256, from_store.params_sha256);
    assert_ne!(from_store.params_sha256, coarse.params_sha256);
    for s in [&from_ring, &from_store, &coarse] {
        assert_eq!((s.rollbacks, s.skipped_steps, s.restarts), (1, 3, 0));
    }
}

/// A run with a spike at step 16 and the LR lowered for 10 steps after it, checkpointed every
/// 10 steps; its step-30 checkpoint is lost; the resume from step 20 (inside the lowered-LR
/// window, with the monitor's memory from the manifest) ends with the uninterrupted weights.
#[test]
fn a_resume_after_a_rollback_reaches_the_uninterrupted_weights() {
    let mut opts = sensitive(common::micro_options("spike-resume", 2, 4, 30));
    opts.config.training.rollback_lr_factor = 0.5;
    opts.config.training.rollback_lr_steps = 10;
    opts.checkpoints = Some(CheckpointPlan {
        store: opts.out_dir.join("store").display().to_string(),
        every: 10,
        resume: false,
        run: None,
    });
    let full = train(&opts, Some(spike_at(15)));
    assert_eq!(full.rollbacks, 1);
    let store = opts.out_dir.join("store");
    let run = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("checkpoints").is_dir())
        .expect("a run in the store");
    std::fs::remove_file(run.join("checkpoints/step-0000000030/manifest.json")).unwrap();
    let mut again = opts.clone();
    again.checkpoints.as_mut().unwrap().resume = true;
    let resumed = train(&again, Some(spike_at(15)));
    println!(
        "uninterrupted {} / resumed from {:?}: {}",
        full.params_sha256, resumed.resumed_from, resumed.params_sha256
    );
    assert_eq!(resumed.resumed_from, Some(20));
    assert_eq!(resumed.rollbacks, 1, "the count travels in the manifest");
    assert_eq!(resumed.params_sha256, full.params_sha256);
}

/// A rollback past the step before the spike must put the older state back on every rank
/// (`StepEngine::reload`): the formation's run with such a rollback ends with the bits of the
/// plain loop's run with the same rollback (same micro-batches).
#[test]
fn a_rollback_reloads_the_ranks_the_formation_equals_the_plain_loop() {
    use actors::rollback::LrSpikes;
    use actors::trainer::{self, Sequential};
    let steps = 34;
    let with = |name: &str| {
        let mut o = sensitive(common::tiny_options(name, steps));
        o.config.training.rollback_skip_steps = 3;
        o.config.training.rollback_ring = 4;
        o
    };
    let formation_opts = with("reload-formation");
    let formation = train(&formation_opts, Some(spike_at(30)));
    let plain_opts = with("reload-plain");
    let t = &plain_opts.config.training;
    let data = std::sync::Arc::new(trainer::open_data(&plain_opts).unwrap());
    let state = trainer::build_state(&plain_opts).unwrap();
    let mut seq = Sequential {
        data: data.clone(),
        seed: plain_opts.seed,
        batch: t.batch_size,
        seq: t.seq_len,
        microbatches: 2,
    };
    let mut spiking = LrSpikes {
        inner: &mut seq,
        at: [(30u64, 1000.0f32)].into_iter().collect(),
    };
    let plain = trainer::run(&plain_opts, &data, state, &mut spiking, |_, _| {}).unwrap();
    println!(
        "formation {} (rollbacks {}), plain loop {} (rollbacks {})",
        formation.params_sha256, formation.rollbacks, plain.params_sha256, plain.rollbacks
    );
    assert_eq!((formation.rollbacks, plain.rollbacks), (1, 1));
    assert_eq!(line(&metrics(&plain_opts), 31)["rolled_back_to"], 28);
    assert_eq!(formation.params_sha256, plain.params_sha256);
}
