//! The device step (`kernels::device::model::DeviceModel`) on the CPU backend against the CPU
//! model: the same losses, expert loads and every gradient bit for bit after forward and
//! backward (main blocks, MoE with group-limited routing and a visible balance loss, two MTP
//! depths, shared head and embedding), and the same parameters and moments after several AdamW
//! steps with clipping and the bias update. The composition the CUDA backend runs is this one;
//! its primitives are compared with their CPU twins by `gpu_parity.rs` and `cuda_emulation.rs`.

mod common;
#[path = "common/parity.rs"]
mod parity;

use common::{configs_dir, random_batch as batch, separate_routing};
use kernels::device::backend::Cpu;
use kernels::device::model::DeviceModel;
use kernels::model::{Batch, DeepSeekV3, Precision, RunConfig};
use kernels::ops::adamw::{self, AdamW, Moments};
use kernels::ops::balance;
use kernels::rng::Rng;

fn model(config: &str, depths: usize, seed: u64) -> (DeepSeekV3, Rng) {
    model_with_std(config, depths, seed, 0.2)
}

/// `config`'s model with `depths` MTP depths, matrices ~ N(0, std), norms 1 ± 0.2 and small
/// random routing biases; and the rng for its batches.
fn model_with_std(config: &str, depths: usize, seed: u64, std: f32) -> (DeepSeekV3, Rng) {
    let mut cfg = RunConfig::load(&configs_dir().join(config)).unwrap().model;
    cfg.aux_loss_alpha = 0.05;
    cfg.num_nextn_predict_layers = depths;
    let mut m = DeepSeekV3::new(&cfg, std, seed);
    let mut rng = Rng::new(seed + 1);
    for (i, name) in m.params.names.clone().iter().enumerate() {
        if name.contains("norm") {
            m.params.tensors[i]
                .data
                .iter_mut()
                .for_each(|v| *v = 1.0 + 0.2 * rng.normal());
        }
        if name.ends_with("e_score_correction_bias") {
            m.params.tensors[i]
                .data
                .iter_mut()
                .for_each(|v| *v = 0.05 * rng.normal());
        }
    }
    (m, rng)
}

fn same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}[{i}]: device {} vs cpu {}", a[i], b[i]);
    }
}

/// `nonzero`: the trainable tensors that receive a gradient, of all trainable (the rest are the
/// three tensors of each expert no token chose).
fn forward_backward_matches(
    config: &str,
    depths: usize,
    b: usize,
    t: usize,
    nonzero_want: (usize, usize),
) {
    let (cpu, mut rng) = model(config, depths, 5);
    let batch = batch(&mut rng, cpu.cfg.vocab_size, b, t);
    let lambda = 0.3;
    let mut want = cpu.params.zeros_like();
    let ws = cpu.forward_backward(&batch, lambda, &mut want);
    assert!(ws.mtp_loss > 0.0 && ws.balance_loss > 0.0, "{ws:?}");
    let mut dev = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
    let gs = dev.forward_backward(&batch, lambda).unwrap();
    assert_eq!(gs, ws, "{config}: losses and loads");
    let got = dev.grads().unwrap();
    let mut nonzero = 0;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        same_bits(&cpu.params.names[i], &g.data, &w.data);
        nonzero += g.data.iter().any(|&v| v != 0.0) as usize;
    }
    // every trainable tensor received a gradient (an expert no token chose excepted)
    let trainable = cpu.params.trainable.iter().filter(|&&t| t).count();
    println!(
        "{config}: {} tensors bit-identical, {nonzero} of {trainable} trainable non-zero, loss {:.6}",
        got.len(),
        gs.loss
    );
    assert_eq!(
        (nonzero, trainable),
        nonzero_want,
        "non-zero of trainable tensors"
    );
    // a second forward-backward accumulates into the same buffers, as on the CPU
    let ws2 = cpu.forward_backward(&batch, lambda, &mut want);
    let gs2 = dev.forward_backward(&batch, lambda).unwrap();
    assert_eq!(gs2, ws2);
    for (i, (g, w)) in dev.grads().unwrap().iter().zip(&want).enumerate() {
        same_bits(&cpu.params.names[i], &g.data, &w.data);
    }
}

#[test]
fn micro_step_matches_the_cpu_model_bitwise() {
    forward_backward_matches("micro.toml", 2, 3, 8, (125, 134));
}

#[test]
fn tiny_step_matches_the_cpu_model_bitwise() {
    forward_backward_matches("tiny.toml", 1, 2, 16, (263, 263));
}

/// Zero AdamW moments for every trainable tensor of `m` (a fresh `TrainState`'s).
fn host_moments(m: &DeepSeekV3) -> Vec<Option<Moments>> {
    m.params
        .tensors
        .iter()
        .zip(&m.params.trainable)
        .map(|(t, &tr)| tr.then(|| Moments::zeros(t.numel())))
        .collect()
}

/// The host rule (`TrainState::apply`): the norm over trainable tensors, clip, AdamW, the bias
/// update; returns the pre-clip norm.
#[allow(clippy::too_many_arguments)]
fn host_update(
    m: &mut DeepSeekV3,
    moments: &mut [Option<Moments>],
    g: &mut [kernels::Tensor],
    opt: &AdamW,
    (lr, clip, gamma): (f32, f32, f32),
    step: u64,
    loads: &[Vec<u32>],
) -> f64 {
    let tr = m.params.trainable.clone();
    let norm = adamw::global_norm(
        g.iter()
            .zip(&tr)
            .filter(|(_, t)| **t)
            .map(|(g, _)| g.data.as_slice()),
    );
    let factor = adamw::clip_factor(norm, clip);
    for (i, mo) in moments.iter_mut().enumerate() {
        match mo {
            Some(mo) => {
                let t = &mut m.params.tensors[i];
                let decay = t.shape.len() >= 2;
                opt.step(&mut t.data, &mut g[i].data, factor, mo, lr, step, decay);
            }
            None => g[i].zero_(),
        }
    }
    for (bias, l) in m.moe_biases().into_iter().zip(loads) {
        balance::bias_update(&mut m.params.tensors[bias.0].data, l, gamma);
    }
    norm
}

#[test]
fn adamw_steps_match_the_host_update_bitwise() {
    let (mut cpu, mut rng) = model("micro.toml", 1, 9);
    let opt = AdamW::deepseek_v3(false);
    let (lr, clip, gamma) = (3e-3, 0.5, 1e-3);
    let mut dev = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
    let mut moments = host_moments(&cpu);
    let mut clipped = 0;
    for step in 1..=4u64 {
        let batch = batch(&mut rng, cpu.cfg.vocab_size, 2, 8);
        let mut g = cpu.params.zeros_like();
        let ws = cpu.forward_backward(&batch, 0.3, &mut g);
        let hp = (lr, clip, gamma);
        let norm = host_update(&mut cpu, &mut moments, &mut g, &opt, hp, step, &ws.loads);
        let gs = dev.forward_backward(&batch, 0.3).unwrap();
        assert_eq!(gs, ws, "step {step}");
        let u = dev.apply(&opt, lr, clip, gamma, &gs.loads, step).unwrap();
        assert_eq!(u.norm.to_bits(), norm.to_bits(), "step {step} norm");
        clipped += (u.clip_factor < 1.0) as usize;
    }
    // clip 0.5 engages on every step of this run (the clipped path is the one compared)
    assert_eq!(clipped, 4, "steps whose update the clip scaled");
    let host = dev.to_host().unwrap();
    assert_eq!(host.params.sha256(), cpu.params.sha256());
    for (i, m) in moments.iter().enumerate() {
        if let Some(m) = m {
            let (hm, hv) = m.to_f32();
            let (dm, dv) = dev
                .moments(i)
                .unwrap()
                .expect("moments after a step")
                .to_f32();
            same_bits("m", &dm, &hm);
            same_bits("v", &dv, &hv);
        }
    }
    println!("4 AdamW steps: params sha256 {}", host.params.sha256());
}

#[test]
fn eval_loss_matches_and_a_bad_batch_is_refused() {
    let (cpu, mut rng) = model("micro.toml", 1, 3);
    let batch = batch(&mut rng, cpu.cfg.vocab_size, 2, 8);
    let mut dev = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
    assert_eq!(
        dev.eval_loss(&batch).unwrap().to_bits(),
        cpu.eval_loss(&batch).to_bits()
    );
    let bad = Batch {
        batch: 2,
        seq: 8,
        inputs: vec![cpu.cfg.vocab_size as u32; 16],
        targets: vec![0; 16],
    };
    let e = dev.forward_backward(&bad, 0.0).unwrap_err();
    assert!(e.0.contains("is not below 64"), "{e}");
}

/// DeepSeek-V3's FP8 recipe on the device step (the CPU backend): the CPU model with FP8 Linears
/// (`set_precision(Fp8)`) reproduced bit for bit, losses, loads and every gradient, then four
/// AdamW steps with BF16 moments (the recipe's) to the same parameters and moments.
#[test]
fn fp8_recipe_matches_the_cpu_model_bitwise() {
    let (mut cpu, mut rng) = model("micro.toml", 1, 13);
    cpu.set_precision(Precision::Fp8);
    let opt = AdamW::deepseek_v3(true);
    let mut dev = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
    let mut moments = host_moments(&cpu);
    let mut f32_run = cpu.clone();
    f32_run.set_precision(Precision::F32);
    for step in 1..=4u64 {
        let batch = batch(&mut rng, cpu.cfg.vocab_size, 2, 16);
        let mut g = cpu.params.zeros_like();
        let ws = cpu.forward_backward(&batch, 0.3, &mut g);
        let gs = dev.forward_backward(&batch, 0.3).unwrap();
        assert_eq!(gs, ws, "step {step}");
        for (i, (a, w)) in dev.grads().unwrap().iter().zip(&g).enumerate() {
            same_bits(&cpu.params.names[i], &a.data, &w.data);
        }
        if step == 1 {
            // the recipe took effect: an f32 step from the same weights differs
            let mut g32 = f32_run.params.zeros_like();
            let w32 = f32_run.forward_backward(&batch, 0.3, &mut g32);
            assert_ne!(w32.loss.to_bits(), ws.loss.to_bits());
        }
        let hp = (1e-3, 1.0, 1e-3);
        host_update(&mut cpu, &mut moments, &mut g, &opt, hp, step, &ws.loads);
        dev.apply(&opt, 1e-3, 1.0, 1e-3, &gs.loads, step).unwrap();
    }
    let host = dev.to_host().unwrap();
    assert_eq!(host.params.sha256(), cpu.params.sha256());
    for (i, m) in moments.iter().enumerate() {
        if let Some(m) = m {
            let d = dev.moments(i).unwrap().expect("moments after a step");
            assert!(
                matches!(d, Moments::Bf16 { .. }),
                "BF16 moments on the device"
            );
            assert_eq!(&d, m, "{}", cpu.params.names[i]);
        }
    }
    println!(
        "fp8 recipe, 4 steps: params sha256 {}",
        host.params.sha256()
    );
}

/// BF16 mixed precision on the CPU backend (the operands of every Linear GEMM but the MoE gate
/// rounded to BF16, f32 sums), from the configs' own initialisation (std 0.02): the losses within
/// issue 12's BF16 bound (2e-2) of the f32 CPU model and really different from it (the rounding
/// took effect); whenever both route alike (always with the routing held apart), every gradient
/// within 2e-2 normwise too. (From std 0.2 the worst gradient reaches 6e-2 on tiny: BF16's error
/// grows with the activations' size.)
#[test]
fn bf16_step_is_within_2e_2_of_the_f32_model() {
    use kernels::device::backend::GemmPrecision;
    for (config, b, t) in [("micro.toml", 3, 8), ("tiny.toml", 2, 16)] {
        for separated in [false, true] {
            // the configs' own initialisation (std 0.02), as a run starts
            let (mut cpu, mut rng) = model_with_std(config, 1, 5, 0.02);
            if separated {
                separate_routing(&mut cpu);
            }
            let batch = batch(&mut rng, cpu.cfg.vocab_size, b, t);
            let mut want = cpu.params.zeros_like();
            let ws = cpu.forward_backward(&batch, 0.3, &mut want);
            let mut dev = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
            dev.set_gemm_precision(GemmPrecision::Bf16);
            let gs = dev.forward_backward(&batch, 0.3).unwrap();
            assert_ne!(gs.loss.to_bits(), ws.loss.to_bits(), "bf16 changed nothing");
            let rel = (gs.loss - ws.loss).abs() / ws.loss;
            // measured ≤ 3.4e-4 (issue 12's bound is 2e-2)
            assert!(rel < 1e-3, "{config}: loss {} vs {}", gs.loss, ws.loss);
            let got = dev.grads().unwrap();
            let worst = parity::worst_tensor(&cpu.params.names, &got, &want);
            println!(
                "{config} bf16, routing {}: loss {:.6} vs f32 {:.6} (rel {rel:.1e}), loads equal {}, worst gradient {:.2e} ({})",
                if separated { "held apart" } else { "natural" },
                gs.loss,
                ws.loss,
                gs.loads == ws.loads,
                worst.0,
                worst.1
            );
            if separated {
                assert_eq!(gs.loads, ws.loads, "routing held apart must not change");
            }
            if gs.loads == ws.loads {
                assert!(worst.0 < 2e-2, "{}: {:.3e}", worst.1, worst.0);
            }
        }
    }
}

/// Bad state for a device model is refused with the tensor or the mismatch named: moments of the
/// wrong length, a replacement model of another structure; the model is left as it was.
#[test]
fn bad_moments_and_a_foreign_model_are_refused_by_name() {
    let (cpu, mut rng) = model("micro.toml", 1, 21);
    let mut dev = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
    let e = dev
        .load_moments(
            1,
            &Moments::F32 {
                m: vec![0.0; 3],
                v: vec![0.0; 3],
            },
        )
        .unwrap_err();
    assert!(
        e.0.contains(&format!("moments of {}", cpu.params.names[1]))
            && e.0.contains("have 3 / 3 values"),
        "{e}"
    );
    let (other, _) = model("tiny.toml", 1, 21);
    let e = dev.replace(other).unwrap_err();
    assert!(e.0.contains("another structure"), "{e}");
    // still the micro model, and it still steps as the CPU model does
    let batch = batch(&mut rng, cpu.cfg.vocab_size, 2, 8);
    let mut want = cpu.params.zeros_like();
    let ws = cpu.forward_backward(&batch, 0.3, &mut want);
    assert_eq!(dev.forward_backward(&batch, 0.3).unwrap(), ws);
}

/// Profiling (`DeviceModel::set_profiling`) only times: two profiled steps end with the
/// unprofiled run's bits, and every region is counted once per block (the MTP modules' blocks
/// inside the tail's region) and per step.
#[test]
fn profiled_steps_keep_the_bits_and_count_every_region() {
    use kernels::model::layers::Ffn;
    let (cpu, mut rng) = model("micro.toml", 2, 13);
    let opt = AdamW::deepseek_v3(false);
    let mut plain = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
    let mut profiled = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
    profiled.set_profiling(true);
    let steps = 2u64;
    let started = std::time::Instant::now();
    for step in 1..=steps {
        let batch = batch(&mut rng, cpu.cfg.vocab_size, 2, 8);
        let a = plain.forward_backward(&batch, 0.3).unwrap();
        let b = profiled.forward_backward(&batch, 0.3).unwrap();
        assert_eq!(a, b, "step {step}");
        plain.apply(&opt, 1e-3, 1.0, 1e-3, &a.loads, step).unwrap();
        profiled
            .apply(&opt, 1e-3, 1.0, 1e-3, &b.loads, step)
            .unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let sha = |m: &DeviceModel<Cpu>| m.to_host().unwrap().params.sha256();
    assert_eq!(sha(&profiled), sha(&plain));
    let prof = profiled.profile().expect("profiling is on");
    let totals = prof.totals();
    let blocks = cpu
        .blocks
        .iter()
        .chain(cpu.tail.mtp.iter().map(|m| &m.block));
    let moe = blocks
        .clone()
        .filter(|b| matches!(b.ffn, Ffn::Moe(_)))
        .count() as u64;
    let all = blocks.count() as u64;
    let dense = all - moe;
    assert!(
        moe > 0 && dense > 0,
        "micro has both kinds: {moe} moe, {dense} dense"
    );
    let mut want = vec![
        ("forward: embedding", 1),
        ("backward: embedding", 1),
        ("forward: head, loss, mtp", 1),
        ("backward: head, loss, mtp", 1),
        ("forward: attention (norm, mla, residual)", all),
        ("backward: attention (norm, mla, residual)", all),
        ("forward: dense mlp (norm, swiglu, residual)", dense),
        ("backward: dense mlp (norm, swiglu, residual)", dense),
        ("optimizer: grad norm", 1),
        ("optimizer: clip, adamw, bias update", 1),
    ];
    for label in [
        "forward: moe layer (norm, residual, stats)",
        "forward: moe gate, routing, dispatch",
        "forward: moe shared experts",
        "forward: moe routed experts",
        "forward: moe combine, balance",
        "backward: moe layer (norm, residual)",
        "backward: moe combine, shared experts",
        "backward: moe routed experts",
        "backward: moe dispatch, routing, gate",
    ] {
        want.push((label, moe));
    }
    let got: Vec<(&str, u64)> = totals.iter().map(|(l, t)| (*l, t.calls)).collect();
    let mut want: Vec<(&str, u64)> = want.into_iter().map(|(l, n)| (l, n * steps)).collect();
    want.sort();
    assert_eq!(got, want, "regions and their calls");
    // self times: each region's own, adding up to at most the wall time of the two steps
    let sum = prof.profiled_s();
    assert!(sum > 0.0 && sum <= wall, "profiled {sum} s of {wall} s");
    assert!(totals.values().all(|t| t.self_s >= 0.0));
    println!("{}", prof.table(wall));
}

/// The step holds its weights (`Backend::hold_weights`): each W's BF16 rounding or FP8
/// quantisation is made in the forward and reused by its input gradient and the step's later
/// micro-batches. Against a model that prepares every W at every use: the same bits (losses,
/// every gradient, the parameters after AdamW), and on a step of one batch without MTP exactly
/// one reuse per weight prepared (each W is read by its forward and its input gradient once).
/// A weight kept past an update would show here: the steps after the first read updated weights.
#[test]
fn weights_prepared_once_per_step_keep_the_bits() {
    use kernels::device::backend::{Backend, GemmPrecision};
    for (label, precision, gemm) in [
        ("bf16", Precision::F32, GemmPrecision::Bf16),
        ("fp8", Precision::Fp8, GemmPrecision::F32),
    ] {
        for depths in [0, 1] {
            let (mut cpu, mut rng) = model("micro.toml", depths, 17);
            cpu.set_precision(precision);
            let opt = AdamW::deepseek_v3(precision == Precision::Fp8);
            let mut devs = [true, false].map(|reuse| {
                let mut d = DeviceModel::new(Cpu::new(), cpu.clone()).unwrap();
                d.set_gemm_precision(gemm);
                d.set_weight_reuse(reuse);
                d
            });
            let lambda = if depths == 0 { 0.0 } else { 0.3 };
            for step in 1..=3u64 {
                let (v, what) = (
                    cpu.cfg.vocab_size,
                    format!("{label}, mtp {depths}, step {step}"),
                );
                let before = devs[0].backend.weight_reuse();
                let stats = if step == 2 {
                    let mbs = [batch(&mut rng, v, 2, 8), batch(&mut rng, v, 1, 8)];
                    devs.each_mut()
                        .map(|d| d.forward_backward_microbatches(&mbs, lambda).unwrap())
                        .map(|s| s.last().cloned().unwrap())
                } else {
                    let b = batch(&mut rng, v, 2, 8);
                    devs.each_mut()
                        .map(|d| d.forward_backward(&b, lambda).unwrap())
                };
                assert_eq!(stats[0], stats[1], "{what}");
                let (on, off) = (devs[0].grads().unwrap(), devs[1].grads().unwrap());
                for (i, (a, b)) in on.iter().zip(&off).enumerate() {
                    same_bits(
                        &format!("{what}: {}", cpu.params.names[i]),
                        &a.data,
                        &b.data,
                    );
                }
                let after = devs[0].backend.weight_reuse();
                let (hits, made) = (after.0 - before.0, after.1 - before.1);
                println!("{what}: {made} weights prepared, {hits} reuses");
                assert!(made > 0 && hits > 0, "{what}: nothing was kept");
                if step != 2 && depths == 0 {
                    assert_eq!(hits, made, "{what}: reuses per weight prepared");
                }
                if step == 2 {
                    // the second micro-batch reads the first's weights: more reuses than weights
                    assert!(hits > made, "{what}: {hits} reuses of {made}");
                }
                assert_eq!(
                    devs[1].backend.weight_reuse(),
                    (0, 0),
                    "reuse off keeps nothing"
                );
                for d in &mut devs {
                    d.apply(&opt, 1e-2, 1.0, 1e-3, &stats[0].loads, step)
                        .unwrap();
                }
            }
            let sums = devs
                .each_ref()
                .map(|d| d.to_host().unwrap().params.sha256());
            assert_eq!(
                sums[0], sums[1],
                "{label}, mtp {depths}: parameters after 3 steps"
            );
        }
    }
}
