//! Pipeline stage copies on a device (`kernels::device::model::stage`) against the CPU model's
//! stage runners: on the CPU backend a pipelined step's reduced gradients and stats equal the
//! CPU runners' bit for bit (f32 and FP8, one to three stages, MTP's shared embedding, one or
//! two copies per stage, W deferred and out of order; with the routed experts in expert groups),
//! parameters installed after a step are the ones the next step uses, and an order the device
//! cannot keep is refused by name.

use kernels::device::Device;
use kernels::device::backend::{Cpu, GemmPrecision};
use kernels::device::model::stage::{BackendStage, StagePlacement};
use kernels::model::config::RunConfig;
use kernels::model::stage::{
    DeviceStage, GradSums, Stage, StageGrads, StageRunner, StageStats, half_range, reduce,
    split_batch,
};
use kernels::model::{Batch, DeepSeekV3, Precision};
use kernels::rng::Rng;
use kernels::tensor::Tensor;

const MTP: f32 = 0.3;

/// A micro-batch's combined stats: loss and objective bits, expert loads.
type MbStats = (u64, u64, Vec<Vec<u32>>);

fn model(name: &str) -> DeepSeekV3 {
    let path = format!("{}/../configs/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let cfg = RunConfig::load(std::path::Path::new(&path)).expect("config");
    DeepSeekV3::new(&cfg.model, 0.02, 11)
}

fn batches(model: &DeepSeekV3, b: usize, t: usize, m: usize, seed: u64) -> Vec<Batch> {
    let mut rng = Rng::stream(seed, "device-stage-test");
    let v = model.cfg.vocab_size as u64;
    let w: Vec<u32> = (0..b * (t + 1))
        .map(|_| (rng.next_u64() % v) as u32)
        .collect();
    split_batch(&Batch::from_windows(&w, b, t), m).unwrap()
}

/// `lanes` copies of each of `stages` stages (lane `l` runs half `l` of the micro-batches when
/// there are two), on the CPU model or the CPU backend.
/// The stage copies (and expert groups) on the CPU backend, f32 GEMMs.
const PLACE: StagePlacement = StagePlacement::Backend {
    device: Device::Cpu,
    gemm: GemmPrecision::F32,
};

fn runners(
    model: &DeepSeekV3,
    stages: usize,
    lanes: usize,
    m: usize,
    dev: bool,
) -> Vec<Vec<StageRunner>> {
    let place = PLACE;
    (0..lanes)
        .map(|_| {
            Stage::split(model, stages)
                .into_iter()
                .enumerate()
                .map(|(rank, st)| {
                    let mut r = StageRunner::new(st, MTP, m);
                    if dev {
                        r.set_device(place.open(rank, m).unwrap().unwrap()).unwrap();
                    }
                    r
                })
                .collect()
        })
        .collect()
}

/// One step: every forward (lane by lane, micro-batches in order), then every B* and every W in
/// reverse micro-batch order (both engines make an early W wait for its half's earlier ones).
/// Returns the reduced gradients and each micro-batch's combined stats.
fn step(
    lanes: &mut [Vec<StageRunner>],
    full: &DeepSeekV3,
    mbs: &[Batch],
) -> (Vec<Tensor>, Vec<MbStats>) {
    let m = mbs.len();
    let two = lanes.len() == 2;
    let mine = |lane: usize| if two { half_range(lane, m) } else { 0..m };
    let mut stats = vec![Vec::new(); m];
    for (lane, rs) in lanes.iter_mut().enumerate() {
        for i in mine(lane) {
            let mut x = None;
            for r in rs.iter_mut() {
                let (y, st) = r.forward(i, &mbs[i], x);
                stats[i].push(st);
                x = y;
            }
        }
        for i in mine(lane).rev() {
            let mut dy = None;
            for r in rs.iter_mut().rev() {
                dy = r.backward_input(i, dy);
            }
        }
        // every B* done, every W owed: the weight gradients wait as jobs
        assert!(rs.iter().all(|r| r.pending_weight() == mine(lane).len()));
        for i in mine(lane).rev() {
            rs.iter_mut().for_each(|r| r.backward_weight(i));
        }
    }
    let sums: Vec<Vec<GradSums>> = lanes
        .iter_mut()
        .map(|rs| rs.iter_mut().map(|r| r.take_grads()).collect())
        .collect();
    let parts = lanes
        .iter()
        .zip(sums)
        .flat_map(|(rs, ss)| rs.iter().zip(ss))
        .map(|(r, sums)| StageGrads {
            stage: &r.stage,
            sums,
        })
        .collect();
    let grads = reduce(&full.params, parts, m).unwrap();
    let stats = stats
        .iter()
        .map(|s: &Vec<StageStats>| {
            let c = StageStats::combine(s);
            (c.loss.to_bits(), c.objective.to_bits(), c.loads)
        })
        .collect();
    (grads, stats)
}

fn assert_same(full: &DeepSeekV3, got: &[Tensor], want: &[Tensor], what: &str) {
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            a.data == b.data,
            "{}: {} differs ({what})",
            full.params.names[i],
            what
        );
    }
}

#[test]
fn device_stages_equal_the_cpu_runners_bitwise() {
    for (name, precision) in [("micro", Precision::F32), ("micro", Precision::Fp8)] {
        let mut full = model(name);
        full.set_precision(precision);
        let mbs = batches(&full, 4, 8, 4, 3);
        for (stages, lanes) in [(1, 1), (2, 1), (3, 1), (2, 2)] {
            let what = format!("{name} {precision:?}, {stages} stages × {lanes} copies");
            let (want, want_stats) =
                step(&mut runners(&full, stages, lanes, 4, false), &full, &mbs);
            let mut dev = runners(&full, stages, lanes, 4, true);
            assert!(dev[0][0].device().unwrap().starts_with("cpu"));
            let (got, got_stats) = step(&mut dev, &full, &mbs);
            assert_same(&full, &got, &want, &what);
            assert_eq!(got_stats, want_stats, "{what}");
            assert!(
                want.iter().any(|g| g.data.iter().any(|&v| v != 0.0)),
                "{what}: no gradient"
            );
        }
    }
}

/// New values installed after a step (as the formation installs the update) are what the next
/// step computes with: both engines' second steps agree bit for bit and differ from the first.
#[test]
fn installed_parameters_reach_the_device() {
    let full = model("micro");
    let mbs = batches(&full, 2, 8, 2, 9);
    let mut cpu = runners(&full, 2, 1, 2, false);
    let mut dev = runners(&full, 2, 1, 2, true);
    let (first, _) = step(&mut dev, &full, &mbs);
    let mut next = full.clone();
    for (t, g) in next.params.tensors.iter_mut().zip(&first) {
        t.data
            .iter_mut()
            .zip(&g.data)
            .for_each(|(p, d)| *p -= 0.5 * d);
    }
    for rs in [&mut cpu, &mut dev] {
        rs[0].iter_mut().for_each(|r| r.load_from(&next.params));
    }
    let (want, _) = step(&mut cpu, &next, &mbs);
    let (got, _) = step(&mut dev, &next, &mbs);
    assert_same(&next, &got, &want, "after install");
    assert!(got.iter().zip(&first).any(|(a, b)| a.data != b.data));
}

/// A W before its B*, a B* before its forward and a second B* of a micro-batch are refused by
/// name; a W still owed reaches the reduce as a refusal; an aborted step's reset clears the
/// stashes and owed W.
#[test]
fn out_of_place_calls_are_refused_by_name() {
    let full = model("micro");
    let mbs = batches(&full, 4, 8, 4, 5);
    let stage = Stage::split(&full, 1).remove(0);
    let mut d = BackendStage::new(Cpu::new(), 4, GemmPrecision::F32);
    d.load(&stage).unwrap();
    for (i, b) in mbs.iter().enumerate().take(2) {
        d.forward(&stage, i, b, None, MTP, None).unwrap();
    }
    let e = d.backward_weight(&stage, 0).unwrap_err();
    assert!(e.contains("W of micro-batch 0 before its backward"), "{e}");
    let e = d.backward_input(&stage, 2, None, None).unwrap_err();
    assert!(e.contains("micro-batch 2 before its forward"), "{e}");
    d.backward_input(&stage, 1, None, None).unwrap();
    let e = d.backward_input(&stage, 1, None, None).unwrap_err();
    assert!(e.contains("micro-batch 1 ran twice"), "{e}");
    assert_eq!((d.stashed(), d.pending_weight()), (1, 1));
    // micro-batch 1's W comes before micro-batch 0's: it waits, nothing owed any more
    d.backward_weight(&stage, 1).unwrap();
    assert_eq!((d.stashed(), d.pending_weight()), (1, 0));
    // a W still owed at the reduce: refused there
    let sums = d.take_grads(&stage).unwrap();
    let err = reduce(
        &full.params,
        vec![StageGrads {
            stage: &stage,
            sums,
        }],
        4,
    )
    .err()
    .unwrap();
    assert!(err.contains("no gradients from stage 0"), "{err}");
    d.reset();
    assert_eq!((d.stashed(), d.pending_weight()), (0, 0));
}

/// Expert groups that count the blocks they answer.
#[derive(Debug)]
struct Counted {
    groups: kernels::model::experts::LocalExpertGroups,
    blocks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl kernels::model::layers::ExpertCompute for Counted {
    fn forward(
        &mut self,
        site: kernels::model::layers::ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> Vec<Vec<f32>> {
        let n = blocks.len();
        self.blocks
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        self.groups.forward(site, blocks)
    }

    fn backward(
        &mut self,
        site: kernels::model::layers::ExpertSite,
        blocks: Vec<(usize, Vec<f32>)>,
    ) -> Vec<kernels::model::layers::ExpertGrads> {
        self.groups.backward(site, blocks)
    }
}

/// Expert parallelism beside device stages: each runner's routed experts in two in-process
/// expert groups (`LocalExpertGroups`, on the CPU model), its other layers on the CPU backend;
/// the dispatched rows cross to the groups and back, and every expert's weight gradients come
/// back as dense jobs. With the groups on the CPU model and with the groups on the CPU backend
/// too (`BackendExperts`), the step equals the CPU runners with CPU groups bit for bit (f32 and
/// FP8, the MTP module's MoE layer included), and the device stages really sent their experts'
/// rows to the groups (as many blocks as the CPU runners sent).
#[test]
fn device_stages_with_expert_groups_equal_the_cpu_runners_bitwise() {
    use kernels::model::experts::LocalExpertGroups;
    use std::sync::atomic::{AtomicUsize, Ordering};
    for precision in [Precision::F32, Precision::Fp8] {
        let mut full = model("micro");
        full.set_precision(precision);
        let mbs = batches(&full, 4, 8, 4, 21);
        for stages in [1, 2] {
            let what = format!("micro {precision:?}, {stages} stages, --ep 2");
            // the stages on the device or not, and the groups on the device or not
            let with_groups =
                |dev: bool, dev_groups: bool, blocks: &std::sync::Arc<AtomicUsize>| {
                    let mut rs = runners(&full, stages, 1, 4, dev);
                    for (rank, r) in rs[0].iter_mut().enumerate() {
                        let layers = r.stage.layers.clone();
                        let mut groups = LocalExpertGroups::new(&full, layers, 2);
                        if dev_groups {
                            for g in &mut groups.groups {
                                let d = PLACE.open_experts(rank).unwrap().unwrap();
                                g.set_device(d).unwrap();
                                assert!(g.device().unwrap().starts_with("cpu"));
                            }
                        }
                        r.set_experts(Box::new(Counted {
                            groups,
                            blocks: blocks.clone(),
                        }));
                    }
                    rs
                };
            let cpu_blocks = Default::default();
            let (want, want_stats) = step(&mut with_groups(false, false, &cpu_blocks), &full, &mbs);
            for dev_groups in [false, true] {
                let what = format!("{what}, groups on the device: {dev_groups}");
                let dev_blocks = Default::default();
                let mut rs = with_groups(true, dev_groups, &dev_blocks);
                let (got, got_stats) = step(&mut rs, &full, &mbs);
                assert_same(&full, &got, &want, &what);
                assert_eq!(got_stats, want_stats, "{what}");
                let sent = dev_blocks.load(Ordering::Relaxed);
                assert!(sent > 0, "{what}: the device stages sent no block");
                assert_eq!(
                    sent,
                    cpu_blocks.load(Ordering::Relaxed),
                    "{what}: blocks sent"
                );
            }
            let expert = full
                .params
                .names
                .iter()
                .position(|n| n.contains(".experts.0.down_proj"))
                .expect("micro has routed experts");
            assert!(
                want[expert].data.iter().any(|&v| v != 0.0),
                "{what}: no expert gradient"
            );
        }
    }
}

/// The staged step (two stages, reduced and scaled by 1/micro-batches) equals the whole-model
/// device step over the same micro-batches (`DeviceModel::forward_backward_microbatches`) bit for
/// bit on the CPU backend: the relation `gpu_stage.rs` checks on a GPU.
#[test]
fn staged_step_equals_the_whole_device_step() {
    let full = model("micro");
    let mbs = batches(&full, 4, 8, 4, 13);
    let (mut got, _) = step(&mut runners(&full, 2, 1, 4, true), &full, &mbs);
    kernels::model::stage::scale_for_microbatches(&mut got, 4);
    let mut whole = kernels::device::model::DeviceModel::new(Cpu::new(), full.clone()).unwrap();
    whole.forward_backward_microbatches(&mbs, MTP).unwrap();
    assert_same(&full, &got, &whole.grads().unwrap(), "staged vs whole");
}

/// An expert group on a device refuses, by name, a backward before its forward, a second
/// forward of a site, a backward of other experts than its forward's and a block that is not
/// whole rows; a site without blocks runs nothing.
#[test]
fn expert_group_on_a_device_refuses_out_of_place_calls() {
    use kernels::device::model::experts::BackendExperts;
    use kernels::model::experts::{DeviceExperts, ExpertGroup};
    use kernels::model::layers::{ExpertSite, Ffn};
    let full = model("micro");
    let layer = full
        .blocks
        .iter()
        .position(|b| matches!(b.ffn, Ffn::Moe(_)))
        .expect("micro has a MoE layer");
    let g = ExpertGroup::new(&full, 0..full.cfg.num_hidden_layers, 0, 2);
    let mut d = BackendExperts::new(Cpu::new(), GemmPrecision::F32);
    d.load(&g).unwrap();
    let (site, dm) = (ExpertSite { layer, mb: 0 }, full.cfg.hidden_size);
    assert!(d.forward(&g, site, Vec::new()).unwrap().is_empty());
    assert!(d.backward(&g, site, Vec::new()).unwrap().is_empty());
    let e = d.backward(&g, site, vec![(0, vec![0.0; dm])]).unwrap_err();
    assert!(e.contains("backward before its forward"), "{e}");
    let e = d.forward(&g, site, vec![(0, vec![0.5; 3])]).unwrap_err();
    assert!(e.contains("not rows of"), "{e}");
    let ys = d.forward(&g, site, vec![(0, vec![0.5; 2 * dm])]).unwrap();
    assert_eq!((ys.len(), ys[0].len(), d.stashed()), (1, 2 * dm, 1));
    let e = d
        .forward(&g, site, vec![(0, vec![0.5; 2 * dm])])
        .unwrap_err();
    assert!(e.contains("forward ran twice"), "{e}");
    let e = d
        .backward(&g, site, vec![(1, vec![0.0; 2 * dm])])
        .unwrap_err();
    assert!(e.contains("backward of experts [1]"), "{e}");
}
