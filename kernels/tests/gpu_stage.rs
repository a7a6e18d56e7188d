//! Pipeline stage copies on a GPU (issue 12: the formation with each GpuActor on a device): a
//! step of micro (two MTP depths, the embedding shared by the first and last stage) cut into two
//! stages, four micro-batches, B* and W in reverse micro-batch order, run by CUDA device stages
//! and by CPU-backend device stages (which equal the CPU runners bit for bit,
//! `device_stage.rs`): every micro-batch's losses and the reduced gradients within 1e-5 normwise,
//! the same expert loads; and the GPU's staged step against the GPU's whole-model step
//! (`DeviceModel`), which must agree as closely. Fresh random inputs each run (seed printed;
//! `PHALANX_PARITY_SEED=N` repeats).
//!
//! Without a CUDA driver or device it prints `SKIPPED: <reason>` and passes. **It has never run
//! on a GPU yet.**

#![cfg(feature = "cuda")]

mod common;
#[path = "common/parity.rs"]
mod parity;

use common::{configs_dir, random_batch};
use kernels::device::backend::{Backend, Cpu, GemmPrecision};
use kernels::device::cuda::backend::CudaBackend;
use kernels::device::model::DeviceModel;
use kernels::device::model::stage::BackendStage;
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
/// Returns the reduced gradients (× 1/M, as the step scales them) and each micro-batch's stats.
fn staged(
    m: &DeepSeekV3,
    mbs: &[Batch],
    devices: Vec<Box<dyn DeviceStage>>,
) -> (Vec<Tensor>, Vec<kernels::model::StepStats>) {
    let mut rs: Vec<StageRunner> = Stage::split(m, 2)
        .into_iter()
        .zip(devices)
        .map(|(st, d)| {
            let mut r = StageRunner::new(st, MTP, M);
            r.set_device(d).expect("device stage");
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
        .map(|_| Box::new(BackendStage::new(Cpu, M, GemmPrecision::F32)) as Box<dyn DeviceStage>)
        .collect();
    let (want, want_stats) = staged(&m, &mbs, cpu);
    let gpu: Vec<Box<dyn DeviceStage>> = [g0, g1]
        .into_iter()
        .map(|b| Box::new(BackendStage::new(b, M, GemmPrecision::F32)) as Box<dyn DeviceStage>)
        .collect();
    let (got, got_stats) = staged(&m, &mbs, gpu);
    let mut r = Report::default();
    let s = format!("micro, 2 stages × {M} micro-batches, 2 MTP");
    let losses = |x: &[kernels::model::StepStats]| -> Vec<f32> {
        x.iter()
            .flat_map(|s| [s.loss as f32, s.objective as f32])
            .collect()
    };
    let e = parity::norm_rel_error(&losses(&got_stats), &losses(&want_stats));
    r.check(
        "staged forward (loss, objective)",
        &s,
        "rel ≤ 1e-5 vs cpu stages",
        format!("{e:.2e}"),
        e <= parity::REL_TOL,
    );
    let loads =
        |x: &[kernels::model::StepStats]| x.iter().map(|s| s.loads.clone()).collect::<Vec<_>>();
    r.check(
        "staged router",
        &s,
        "expert loads equal",
        format!("{} micro-batches", got_stats.len()),
        loads(&got_stats) == loads(&want_stats),
    );
    let worst = parity::worst_tensor(&m.params.names, &got, &want);
    r.check(
        "staged backward, deferred W (every gradient)",
        &s,
        "norm rel ≤ 1e-5 per tensor vs cpu stages",
        format!("worst {:.2e} ({})", worst.0, worst.1),
        worst.0 <= parity::REL_TOL,
    );
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
