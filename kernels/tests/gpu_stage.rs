//! Pipeline stage copies on a GPU (issue 12: the formation with each GpuActor on a device): a
//! step of micro (two MTP depths, the embedding shared by the first and last stage) cut into two
//! stages, four micro-batches, B* and W in reverse micro-batch order, run by CUDA device stages
//! and by CPU-backend device stages (which equal the CPU runners bit for bit,
//! `device_stage.rs`): every micro-batch's losses and the reduced gradients within 1e-5 normwise,
//! the same expert loads; and the GPU's staged step against the GPU's whole-model step
//! (`DeviceModel`), which must agree as closely; and the same stages with their routed experts in
//! expert groups on the GPU (`--ep 2`) against CPU-backend stages with CPU groups. Fresh random
//! inputs each run (seed printed; `PHALANX_PARITY_SEED=N` repeats).
//!
//! Without a CUDA driver or device it prints `SKIPPED: <reason>` and passes. **It has never run
//! on a GPU yet.**

#![cfg(feature = "cuda")]

mod common;
#[path = "common/parity.rs"]
mod parity;

use common::{configs_dir, random_batch};
use kernels::device::Device;
use kernels::device::backend::{Backend, Cpu, GemmPrecision};
use kernels::device::cuda::backend::CudaBackend;
use kernels::device::model::DeviceModel;
use kernels::device::model::stage::BackendStage;
use kernels::device::model::stage::StagePlacement;
use kernels::model::experts::{DeviceExperts, LocalExpertGroups};
use kernels::model::stage::{
    DeviceStage, Stage, StageGrads, StageRunner, StageStats, reduce, scale_for_microbatches,
    split_batch,
};
use kernels::model::{Batch, DeepSeekV3, RunConfig};
use kernels::rng::Rng;
use kernels::tensor::Tensor;
use parity::Report;

const MTP: f32 = 0.3;
const M: usize = 4;

/// cuda:`PHALANX_PARITY_DEVICE` (default 0) twice (one backend per stage, as the formation opens
/// them), or None (and why) without a device.
fn open_two() -> Option<([CudaBackend; 2], usize)> {
    let ordinal = parity::cuda_ordinal()?;
    let open = || CudaBackend::open(ordinal).unwrap_or_else(|e| panic!("cuda:{ordinal}: {e}"));
    Some(([open(), open()], ordinal))
}

/// Two stages of `m` on the given device stages; every forward, then B* and W in reverse order.
/// `groups`: each stage's routed experts in two expert groups (`--ep 2`), on the CPU model or, if
/// it gives one, on the device `groups` opens for each. Returns the reduced gradients (× 1/M, as
/// the step scales them) and each micro-batch's stats.
fn staged(
    m: &DeepSeekV3,
    mbs: &[Batch],
    devices: Vec<Box<dyn DeviceStage>>,
    groups: Option<&dyn Fn() -> Option<Box<dyn DeviceExperts>>>,
) -> (Vec<Tensor>, Vec<kernels::model::StepStats>) {
    let mut rs: Vec<StageRunner> = Stage::split(m, 2)
        .into_iter()
        .zip(devices)
        .map(|(st, d)| {
            let layers = st.layers.clone();
            let mut r = StageRunner::new(st, MTP, M);
            r.set_device(d).expect("device stage");
            if let Some(open) = groups {
                let mut g = LocalExpertGroups::new(m, layers, 2);
                for group in &mut g.groups {
                    if let Some(d) = open() {
                        group.set_device(d).expect("expert group device");
                    }
                }
                r.set_experts(Box::new(g));
            }
            r
        })
        .collect();
    let mut stats = Vec::new();
    for (i, b) in mbs.iter().enumerate() {
        let mut x = None;
        let mut per = Vec::new();
        for r in rs.iter_mut() {
            let (y, st) = r.forward(i, b, x);
            per.push(st);
            x = y;
        }
        stats.push(StageStats::combine(&per));
    }
    for i in (0..M).rev() {
        let mut dy = None;
        for r in rs.iter_mut().rev() {
            dy = r.backward_input(i, dy);
        }
    }
    for i in (0..M).rev() {
        rs.iter_mut().for_each(|r| r.backward_weight(i));
    }
    let sums: Vec<_> = rs.iter_mut().map(|r| r.take_grads()).collect();
    let parts = rs
        .iter()
        .zip(sums)
        .map(|(r, sums)| StageGrads {
            stage: &r.stage,
            sums,
        })
        .collect();
    let mut g = reduce(&m.params, parts, M).expect("reduce");
    scale_for_microbatches(&mut g, M);
    (g, stats)
}

/// A step's outputs: the reduced gradients and each micro-batch's stats.
type Staged = (Vec<Tensor>, Vec<kernels::model::StepStats>);

/// The rows comparing the GPU's staged step `got` with the CPU backend's `want` (shape `s`,
/// `what` naming the variant): losses and objectives within 1e-5, the same expert loads, every
/// reduced gradient within 1e-5 normwise.
fn compare(r: &mut Report, m: &DeepSeekV3, s: &str, what: &str, got: &Staged, want: &Staged) {
    let losses = |x: &[kernels::model::StepStats]| -> Vec<f32> {
        x.iter()
            .flat_map(|s| [s.loss as f32, s.objective as f32])
            .collect()
    };
    let e = parity::norm_rel_error(&losses(&got.1), &losses(&want.1));
    r.check(
        &format!("staged forward{what} (loss, objective)"),
        s,
        "rel ≤ 1e-5 vs cpu",
        format!("{e:.2e}"),
        e <= parity::REL_TOL,
    );
    let loads =
        |x: &[kernels::model::StepStats]| x.iter().map(|s| s.loads.clone()).collect::<Vec<_>>();
    r.check(
        &format!("staged router{what}"),
        s,
        "expert loads equal",
        format!("{} micro-batches", got.1.len()),
        loads(&got.1) == loads(&want.1),
    );
    let worst = parity::worst_tensor(&m.params.names, &got.0, &want.0);
    r.check(
        &format!("staged backward, deferred W{what} (every gradient)"),
        s,
        "norm rel ≤ 1e-5 per tensor vs cpu",
        format!("worst {:.2e} ({})", worst.0, worst.1),
        worst.0 <= parity::REL_TOL,
    );
}

#[test]
fn gpu_stages_match_the_cpu_stages_and_the_gpu_step() {
    let Some(([g0, g1], ordinal)) = open_two() else {
        return;
    };
    let describe = g0.describe();
    println!("device {describe}");
    let seed = parity::seed();
    let mut cfg = RunConfig::load(&configs_dir().join("micro.toml"))
        .unwrap()
        .model;
    cfg.num_nextn_predict_layers = 2;
    cfg.aux_loss_alpha = 0.05;
    let m = DeepSeekV3::new(&cfg, 0.2, seed);
    let mut rng = Rng::new(seed + 1);
    let full = random_batch(&mut rng, cfg.vocab_size, 8, 16);
    let mbs = split_batch(&full, M).unwrap();
    let cpu: Vec<Box<dyn DeviceStage>> = (0..2)
        .map(|_| {
            Box::new(BackendStage::new(Cpu::new(), M, GemmPrecision::F32)) as Box<dyn DeviceStage>
        })
        .collect();
    let want = staged(&m, &mbs, cpu, None);
    let gpu: Vec<Box<dyn DeviceStage>> = [g0, g1]
        .into_iter()
        .map(|b| Box::new(BackendStage::new(b, M, GemmPrecision::F32)) as Box<dyn DeviceStage>)
        .collect();
    let got = staged(&m, &mbs, gpu, None);
    let mut r = Report::default();
    let s = format!("micro, 2 stages × {M} micro-batches, 2 MTP");
    compare(&mut r, &m, &s, "", &got, &want);
    let got = got.0;
    // the GPU's whole-model step over the same micro-batches
    let mut whole = DeviceModel::new(
        CudaBackend::open(ordinal).expect("a third backend"),
        m.clone(),
    )
    .unwrap();
    whole.forward_backward_microbatches(&mbs, MTP).unwrap();
    let gw = whole.grads().unwrap();
    let worst = parity::worst_tensor(&m.params.names, &got, &gw);
    let same = got.iter().zip(&gw).all(|(a, b)| a.data == b.data);
    r.check(
        "staged vs whole-model step on the gpu",
        &s,
        "norm rel ≤ 1e-5 per tensor (bits reported)",
        format!(
            "worst {:.2e} ({}); same bits: {}",
            worst.0,
            worst.1,
            if same { "yes" } else { "no" }
        ),
        worst.0 <= parity::REL_TOL,
    );
    r.print();
    assert_eq!(r.failures(), 0, "the GPU's stages differ (table above)");
}

/// `--ep 2` on the GPU: both stages on the GPU with their routed experts in two expert groups
/// each on the GPU too (`BackendExperts`: the blocks as one batch through the grouped GEMMs),
/// against CPU-backend stages with CPU expert groups (which equal the CPU runners bit for bit,
/// `device_stage.rs`): losses and every reduced gradient within 1e-5, the same expert loads.
#[test]
fn gpu_stages_with_gpu_expert_groups_match_the_cpu_stages() {
    let Some(([g0, g1], ordinal)) = open_two() else {
        return;
    };
    let seed = parity::seed();
    let mut cfg = RunConfig::load(&configs_dir().join("micro.toml"))
        .unwrap()
        .model;
    cfg.num_nextn_predict_layers = 2;
    let m = DeepSeekV3::new(&cfg, 0.2, seed);
    let mut rng = Rng::new(seed + 2);
    let mbs = split_batch(&random_batch(&mut rng, cfg.vocab_size, 8, 16), M).unwrap();
    let stages = |b: [Box<dyn DeviceStage>; 2]| b.into_iter().collect::<Vec<_>>();
    let cpu = stages([
        Box::new(BackendStage::new(Cpu::new(), M, GemmPrecision::F32)),
        Box::new(BackendStage::new(Cpu::new(), M, GemmPrecision::F32)),
    ]);
    let on_cpu_model = || None;
    let want = staged(&m, &mbs, cpu, Some(&on_cpu_model));
    let gpu = stages([
        Box::new(BackendStage::new(g0, M, GemmPrecision::F32)),
        Box::new(BackendStage::new(g1, M, GemmPrecision::F32)),
    ]);
    let place = StagePlacement::Backend {
        device: Device::Cuda(ordinal),
        gemm: GemmPrecision::F32,
    };
    let on_gpu = || {
        Some(
            place
                .open_experts(0)
                .expect("an expert group on the gpu")
                .unwrap(),
        )
    };
    let got = staged(&m, &mbs, gpu, Some(&on_gpu));
    let mut r = Report::default();
    let s = format!("micro, 2 stages × {M} micro-batches, --ep 2 on the gpu");
    compare(&mut r, &m, &s, " with expert groups", &got, &want);
    r.print();
    assert_eq!(
        r.failures(),
        0,
        "the GPU's stages with expert groups differ (table above)"
    );
}
