//! The emulated kernel families against `kernels::ops`, on small shapes (every CUDA thread is an
//! OS thread): the same inputs and verdicts as `gpu_parity/` — RMSNorm, SwiGLU, RoPE (YaRN
//! table), cross-entropy, embedding, AdamW (F32 and BF16 moments), the grad norm, attention and
//! the row kernels of its tensor-core path.

use super::parity::{
    ADAMW_STEP, Report, adamw_case, adamw_kernel, bf16_mismatches, ce_case, indices, norm_tensors,
    normals, scaled, shape, sprinkle,
};
use super::{Emu, bits, fp8_checks, step_checks};
use half::bf16;
use kernels::ops::adamw::{Moments, global_norm, norm_from_chunk_sums};
use kernels::ops::rope::{RopeTable, Yarn};
use kernels::ops::{attention, cross_entropy, embedding, rmsnorm, rope, swiglu};

type Family = fn(&Emu, &mut Report, u64);

pub const FAMILIES: [(&str, Family); 22] = [
    ("rmsnorm", rmsnorm_rows),
    ("swiglu", swiglu_rows),
    ("rope", rope_rows),
    ("cross_entropy", ce_rows),
    ("cross_entropy_sum", ce_sum_rows),
    ("embedding", embedding_rows),
    ("adamw", adamw_rows),
    ("adamw_many", adamw_many_rows),
    ("grad_norm", norm_rows),
    ("attention", attention_rows),
    ("attention_gemm", attention_gemm_rows),
    ("heads", step_checks::heads_rows),
    ("copy_cols", step_checks::copy_rows),
    ("elementwise", step_checks::elementwise_rows),
    ("moe", step_checks::moe_rows),
    ("fp8_quant", fp8_checks::fp8_quant_rows),
    ("fp8_quant_batched", fp8_checks::fp8_quant_batched_rows),
    ("fp8_quant_segmented", fp8_checks::fp8_quant_segmented_rows),
    ("fp8_gemm", fp8_checks::fp8_gemm_rows),
    ("fp8_pack", fp8_checks::fp8_pack_rows),
    ("fp8_grouped", fp8_checks::fp8_grouped_rows),
    ("router", step_checks::router_rows),
];

/// A failed driver run as a failed row.
pub fn failed(r: &mut Report, kernel: &str, s: &str, e: String) {
    r.check(kernel, s, "driver run", e, false);
}

fn rmsnorm_rows(emu: &Emu, r: &mut Report, seed: u64) {
    // 600 rows: three of the weight gradient's 256-row chunks; 40 columns: a partial block
    for (n, d) in [(7, 300), (3, 1000), (5, 1), (600, 40)] {
        let s = shape(&[n, d]);
        let eps = 1e-6;
        let mut x = normals(seed, "rms x", n * d);
        // rows at very different magnitudes, and one all-zero row
        for (i, row) in x.chunks_mut(d).enumerate() {
            let mag = if i == 1 {
                0.0
            } else {
                10f32.powi(i as i32 % 7 - 3)
            };
            row.iter_mut().for_each(|v| *v *= mag);
        }
        let (w, dy) = (normals(seed, "rms w", d), normals(seed, "rms dy", n * d));
        let (mut y, mut rstd) = (vec![0f32; n * d], vec![0f32; n]);
        rmsnorm::forward(&mut y, &mut rstd, &x, &w, d, eps);
        let prior = normals(seed, "rms dx prior", n * d);
        let dw_prior = normals(seed, "rms dw prior", d);
        let mut dw = dw_prior.clone();
        rmsnorm::backward_weight(&mut dw, &dy, &x, &rstd, d);
        for acc in [false, true] {
            let run = emu.prepare();
            for (name, v) in [("x", &x), ("w", &w), ("dy", &dy), ("rstd", &rstd)] {
                run.put(name, v);
            }
            run.put("dx", &prior);
            run.put("dw", &dw_prior);
            let args = [n, d].map(|v| v.to_string());
            let args = [&args[..], &[bits(eps), u8::from(acc).to_string()]].concat();
            if let Err(e) = emu.exec(&run, "rmsnorm", &args) {
                failed(r, "rmsnorm", &s, e);
                continue;
            }
            let mut dx = prior.clone();
            rmsnorm::backward_input(&mut dx, &dy, &x, &rstd, &w, d, acc);
            if !acc {
                r.rel("rmsnorm_forward", &s, "y", &run.get("y"), &y);
                r.rel("rmsnorm_forward", &s, "rstd", &run.get("rstd_out"), &rstd);
                r.bits("rmsnorm_backward_weight", &s, "dw", &run.get("dw"), &dw);
            }
            let what = if acc { "dx (accumulate)" } else { "dx" };
            r.rel("rmsnorm_backward_input", &s, what, &run.get("dx"), &dx);
        }
    }
}

fn swiglu_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for n in [1000, 3] {
        let s = shape(&[n]);
        let mut a = scaled(seed, "swiglu a", n, 3.0);
        sprinkle(&mut a, seed, "swiglu a specials", n / 100 + 1);
        let (b, dh) = (normals(seed, "swiglu b", n), normals(seed, "swiglu dh", n));
        let run = emu.prepare();
        run.put("a", &a);
        run.put("b", &b);
        run.put("dh", &dh);
        if let Err(e) = emu.exec(&run, "swiglu", &[]) {
            failed(r, "swiglu", &s, e);
            continue;
        }
        let mut h = vec![0f32; n];
        swiglu::forward(&mut h, &a, &b);
        let (mut da, mut db) = (vec![0f32; n], vec![0f32; n]);
        swiglu::backward_input(&mut da, &mut db, &dh, &a, &b);
        r.rel("swiglu_forward", &s, "h", &run.get("h"), &h);
        r.rel("swiglu_backward_input", &s, "da", &run.get("da"), &da);
        r.rel("swiglu_backward_input", &s, "db", &run.get("db"), &db);
    }
}

fn rope_rows(emu: &Emu, r: &mut Report, seed: u64) {
    let yarn = Yarn {
        factor: 40.0,
        original_max_position: 4096.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
    };
    for (rows, stride, offset, half) in [(64, 192, 128, 32), (3, 2, 0, 1)] {
        let s = format!(
            "{}, rope {offset}..{}",
            shape(&[rows, stride]),
            offset + 2 * half
        );
        let table_rows = 4096;
        let table = RopeTable::new(2 * half, 10_000.0, table_rows, Some(yarn));
        let pos = indices(seed, "rope positions", rows, table_rows);
        let positions: Vec<usize> = pos.iter().map(|&p| p as usize).collect();
        let x = normals(seed, "rope x", rows * stride);
        for backward in [false, true] {
            let k = if backward {
                "rope_backward_input"
            } else {
                "rope_forward"
            };
            let run = emu.prepare();
            run.put("x", &x);
            run.put("cos", &table.cos);
            run.put("sin", &table.sin);
            run.put("pos", &pos);
            let args = [stride, offset, half, usize::from(backward)].map(|v| v.to_string());
            if let Err(e) = emu.exec(&run, "rope", &args) {
                failed(r, k, &s, e);
                continue;
            }
            let mut cpu = x.clone();
            if backward {
                rope::backward_input(&mut cpu, stride, offset, &positions, &table);
            } else {
                rope::forward(&mut cpu, stride, offset, &positions, &table);
            }
            r.bits(k, &s, "x", &run.get("x_out"), &cpu);
        }
    }
}

/// The cross-entropy total over 9,000 rows (three of its 4,096-row slices): the f64 sum in row
/// order, bit for bit.
fn ce_sum_rows(emu: &Emu, r: &mut Report, seed: u64) {
    let loss = scaled(seed, "ce sum rows", 9000, 3.0);
    let run = emu.prepare();
    run.put("loss", &loss);
    let (k, s) = ("cross_entropy_sum", "9000 rows");
    if let Err(e) = emu.exec(&run, "ce_sum", &[]) {
        return failed(r, k, s, e);
    }
    let want: f64 = loss.iter().map(|&l| l as f64).sum();
    let got = run.get::<f64>("total")[0];
    let value = format!("emulated {got:.17e}, rows in order {want:.17e}");
    r.check(k, s, "total bits", value, got.to_bits() == want.to_bits());
}

fn ce_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for (rows, v) in [(3, 1000), (9, 300)] {
        let s = shape(&[rows, v]);
        let (logits, targets, per_row, total) = ce_case(seed, rows, v);
        let scale = 1.0 / rows as f32;
        let run = emu.prepare();
        run.put("logits", &logits);
        run.put("targets", &targets);
        if let Err(e) = emu.exec(&run, "cross_entropy", &[v.to_string(), bits(scale)]) {
            failed(r, "cross_entropy", &s, e);
            continue;
        }
        let loss: Vec<f32> = run.get("loss");
        r.rel(
            "cross_entropy_forward_rows",
            &s,
            "loss per row",
            &loss,
            &per_row,
        );
        r.ce_total(&s, &loss, run.get::<f64>("total")[0], total);
        let mut d = vec![0f32; rows * v];
        cross_entropy::backward_input(&mut d, &logits, &targets, v, scale);
        let k = "cross_entropy_backward_input";
        r.rel(k, &s, "dlogits", &run.get("dlogits"), &d);
    }
}

fn embedding_rows(emu: &Emu, r: &mut Report, seed: u64) {
    // 300 ids of 17: every id many times, its rows far apart; 260 columns: two column blocks
    for (n, vocab, d) in [(5, 9, 7), (40, 100, 300), (300, 17, 260)] {
        let s = format!("{n} ids, {}", shape(&[vocab, d]));
        let table = normals(seed, "emb table", vocab * d);
        let ids = indices(seed, "emb ids", n, vocab);
        let dout = normals(seed, "emb dout", n * d);
        let prior = scaled(seed, "emb dtable prior", vocab * d, 1e-3);
        let run = emu.prepare();
        run.put("table", &table);
        run.put("ids", &ids);
        run.put("dout", &dout);
        run.put("dtable", &prior);
        let (order, starts, seg_ids) = embedding::rows_by_id(&ids);
        run.put("order", &order);
        run.put("starts", &starts);
        run.put("seg_ids", &seg_ids);
        if let Err(e) = emu.exec(&run, "embedding", &[d.to_string()]) {
            failed(r, "embedding", &s, e);
            continue;
        }
        let mut out = vec![0f32; n * d];
        embedding::forward(&mut out, &ids, &table, d);
        let mut dtable = prior;
        embedding::backward_weight(&mut dtable, &ids, &dout, d);
        r.bits("embedding_forward", &s, "out", &run.get("out"), &out);
        let k = "embedding_backward_weight";
        r.bits(k, &s, "dtable", &run.get("dtable_out"), &dtable);
    }
}

fn adamw_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for bf16_moments in [false, true] {
        for n in [3000, 7] {
            adamw_one(emu, r, seed, n, bf16_moments);
        }
    }
}

fn adamw_one(emu: &Emu, r: &mut Report, seed: u64, n: usize, bf16_moments: bool) {
    let s = shape(&[n]);
    let k = adamw_kernel(bf16_moments);
    let (opt, param, grad, moments) = adamw_case(seed, n, bf16_moments);
    let (lr, t, scale) = ADAMW_STEP;
    let c = opt.consts(lr, t, true);
    let run = emu.prepare();
    run.put("p", &param);
    run.put("g", &grad);
    let to_bits = |x: &[bf16]| x.iter().map(|b| b.to_bits()).collect::<Vec<u16>>();
    match &moments {
        Moments::F32 { m, v } => {
            run.put("m", m);
            run.put("v", v);
        }
        Moments::Bf16 { m, v } => {
            run.put("m", &to_bits(m));
            run.put("v", &to_bits(v));
        }
    }
    let consts = [scale, c.b1, c.b2, c.bc1, c.bc2, c.eps, c.lr, c.wd].map(bits);
    let args = [&[u8::from(bf16_moments).to_string()][..], &consts[..]].concat();
    if let Err(e) = emu.exec(&run, "adamw", &args) {
        return failed(r, k, &s, e);
    }
    let (mut cp, mut cg, mut cst) = (param, grad, moments);
    opt.step(&mut cp, &mut cg, scale, &mut cst, lr, t, true);
    r.bits(k, &s, "param", &run.get("p_out"), &cp);
    r.bits(k, &s, "grad (zeroed)", &run.get("g_out"), &cg);
    match &cst {
        Moments::F32 { m, v } => {
            r.bits(k, &s, "m", &run.get("m_out"), m);
            r.bits(k, &s, "v", &run.get("v_out"), v);
        }
        Moments::Bf16 { m, v } => {
            for (what, cpu) in [("m", m), ("v", v)] {
                let (bad, _) = bf16_mismatches(&run.get(&format!("{what}_out")), &to_bits(cpu));
                let value = format!("{bad}/{n} differ");
                r.check(k, &s, &format!("{what} bf16 bits"), value, bad == 0);
            }
        }
    }
}

/// `adamw_many_*`: three tensors (two of them over several 4,096-element blocks, one with weight
/// decay off) in one launch, each bit for bit the CPU's `AdamW::step` with its own constants.
fn adamw_many_rows(emu: &Emu, r: &mut Report, seed: u64) {
    let lens = [5000, 3, 9000];
    for bf16_moments in [false, true] {
        let k = if bf16_moments {
            "adamw_many_bf16"
        } else {
            "adamw_many_f32"
        };
        let s = format!(
            "{} tensors, {} values",
            lens.len(),
            lens.iter().sum::<usize>()
        );
        let (lr, t, scale) = ADAMW_STEP;
        let run = emu.prepare();
        let to_bits = |x: &[bf16]| x.iter().map(|b| b.to_bits()).collect::<Vec<u16>>();
        let mut cases = Vec::new();
        let mut consts = Vec::new();
        for (i, &n) in lens.iter().enumerate() {
            let (opt, param, grad, moments) = adamw_case(seed + i as u64, n, bf16_moments);
            let decay = i != 1;
            let c = opt.consts(lr, t, decay);
            consts.extend([c.b1, c.b2, c.bc1, c.bc2, c.eps, c.lr, c.wd]);
            run.put(&format!("p{i}"), &param);
            run.put(&format!("g{i}"), &grad);
            match &moments {
                Moments::F32 { m, v } => {
                    run.put(&format!("m{i}"), m);
                    run.put(&format!("v{i}"), v);
                }
                Moments::Bf16 { m, v } => {
                    run.put(&format!("m{i}"), &to_bits(m));
                    run.put(&format!("v{i}"), &to_bits(v));
                }
            }
            cases.push((opt, param, grad, moments, decay));
        }
        run.put("consts", &consts);
        let args = [
            u8::from(bf16_moments).to_string(),
            bits(scale),
            lens.len().to_string(),
        ];
        if let Err(e) = emu.exec(&run, "adamw_many", &args) {
            failed(r, k, &s, e);
            continue;
        }
        let mut bad = 0usize;
        for (i, (opt, mut p, mut g, mut st, decay)) in cases.into_iter().enumerate() {
            opt.step(&mut p, &mut g, scale, &mut st, lr, t, decay);
            let differ = |got: Vec<u32>, want: Vec<u32>| {
                got.iter().zip(&want).filter(|(a, b)| a != b).count()
            };
            let f = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            bad += differ(f(&run.get::<f32>(&format!("p_out{i}"))), f(&p));
            bad += differ(f(&run.get::<f32>(&format!("g_out{i}"))), f(&g));
            match &st {
                Moments::F32 { m, v } => {
                    bad += differ(f(&run.get::<f32>(&format!("m_out{i}"))), f(m));
                    bad += differ(f(&run.get::<f32>(&format!("v_out{i}"))), f(v));
                }
                Moments::Bf16 { m, v } => {
                    for (what, cpu) in [("m", m), ("v", v)] {
                        let got = run.get::<u16>(&format!("{what}_out{i}"));
                        bad += bf16_mismatches(&got, &to_bits(cpu)).0;
                    }
                }
            }
        }
        let value = format!("{bad} values differ (params, zeroed grads, moments)");
        r.check(k, &s, "every tensor's bits", value, bad == 0);
    }
}

fn norm_rows(emu: &Emu, r: &mut Report, seed: u64) {
    let lens = [40_003, 1, 16_384, 16_385, 7, 0];
    let s = format!(
        "{} tensors, {} values",
        lens.len(),
        lens.iter().sum::<usize>()
    );
    let k = "grad_norm_chunks + the host's finish";
    let tensors = norm_tensors(seed, &lens);
    let run = emu.prepare();
    tensors
        .iter()
        .enumerate()
        .for_each(|(i, t)| run.put(&format!("x{i}"), t));
    if let Err(e) = emu.exec(&run, "grad_norm", &[tensors.len().to_string()]) {
        return failed(r, k, &s, e);
    }
    let cpu = global_norm(tensors.iter().map(|t| t.as_slice()));
    let ends: Vec<usize> = lens
        .iter()
        .scan(0, |acc, n| {
            *acc += n.div_ceil(1 << 14);
            Some(*acc)
        })
        .collect();
    let emulated = norm_from_chunk_sums(&run.get::<f64>("chunk_sums"), &ends);
    let value = format!("emulated {emulated:.17e}, cpu {cpu:.17e}");
    let same = emulated.to_bits() == cpu.to_bits();
    r.check(k, &s, "norm bits (f64)", value, same);
}

fn attention_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for (bh, t, dqk, dv) in [(2, 128, 48, 32), (1, 77, 192, 128), (1, 65, 256, 256)] {
        let s = format!("bh {bh} t {t} d {dqk}/{dv}");
        let scale = 1.0 / (dqk as f32).sqrt();
        let (nqk, nv) = (bh * t * dqk, bh * t * dv);
        let q = scaled(seed, "att q", nqk, 1.5);
        let (k, v) = (normals(seed, "att k", nqk), normals(seed, "att v", nv));
        let d_o = normals(seed, "att do", nv);
        let run = emu.prepare();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v), ("do", &d_o)] {
            run.put(name, x);
        }
        let args = [bh, t, dqk, dv].map(|x| x.to_string());
        if let Err(e) = emu.exec(&run, "attention", &[&args[..], &[bits(scale)]].concat()) {
            failed(r, "attention", &s, e);
            continue;
        }
        let (mut o, mut p) = (vec![0f32; nv], vec![0f32; bh * t * t]);
        attention::forward(&mut o, &mut p, &q, &k, &v, t, dqk, dv, scale);
        let (mut dq, mut dk, mut dvv) = (vec![0f32; nqk], vec![0f32; nqk], vec![0f32; nv]);
        attention::backward_input(
            &mut dq, &mut dk, &mut dvv, &d_o, &p, &q, &k, &v, t, dqk, dv, scale,
        );
        r.norm_rel("attention_forward", &s, "o", &run.get("o"), &o);
        let lse: Vec<f32> = run.get("lse");
        let finite = lse.iter().all(|x| x.is_finite());
        r.check(
            "attention_forward",
            &s,
            "lse finite",
            format!("{} rows", lse.len()),
            finite,
        );
        let kb = "attention_backward_input";
        r.norm_rel(kb, &s, "dq", &run.get("dq"), &dq);
        r.norm_rel(kb, &s, "dk", &run.get("dk"), &dk);
        r.norm_rel(kb, &s, "dv", &run.get("dv"), &dvv);
    }
}

/// `attention_gemm.cu`'s row kernels (between the tensor-core path's GEMMs) against
/// `ops::attention`'s: the causal softmax of raw scores, then its backward from the kernel's own
/// probabilities; t past 256 takes the threads' column loop more than once.
fn attention_gemm_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for (bh, t, scale) in [(3, 100, 0.125f32), (1, 300, 0.3), (2, 1, 1.0)] {
        let s = format!("bh {bh} t {t}");
        let n = bh * t * t;
        let scores = scaled(seed, "att rows s", n, 4.0);
        let dp = normals(seed, "att rows dp", n);
        let run = emu.prepare();
        run.put("s", &scores);
        run.put("dp", &dp);
        let args = [bh.to_string(), t.to_string(), bits(scale)];
        if let Err(e) = emu.exec(&run, "attention_rows", &args) {
            failed(r, "attention_gemm", &s, e);
            continue;
        }
        let got_p: Vec<f32> = run.get("p");
        let mut p = scores.clone();
        p.chunks_exact_mut(t * t)
            .for_each(|b| attention::softmax_causal_rows(b, t, scale));
        r.norm_rel("attention_softmax_rows", &s, "p", &got_p, &p);
        let upper_zero = got_p
            .chunks_exact(t)
            .enumerate()
            .all(|(row, x)| x[row % t + 1..].iter().all(|&v| v == 0.0));
        r.check(
            "attention_softmax_rows",
            &s,
            "zeros past the diagonal",
            format!("{} rows", bh * t),
            upper_zero,
        );
        // the BF16 copy is the f32 output rounded (half's bf16::from_f32), bit for bit
        let want16: Vec<u16> = got_p.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let (bad, first) = bf16_mismatches(&run.get::<u16>("p16"), &want16);
        r.check(
            "attention_softmax_rows",
            &s,
            "p16 = bf16(p) bits",
            format!("{bad} mismatches (first at {first:?})"),
            bad == 0,
        );
        let mut ds = dp.clone();
        ds.chunks_exact_mut(t * t)
            .zip(got_p.chunks_exact(t * t))
            .for_each(|(d, p)| attention::softmax_backward_rows(d, p, t, scale));
        let ds16: Vec<f32> = run
            .get::<u16>("ds16")
            .into_iter()
            .map(|b| bf16::from_bits(b).to_f32())
            .collect();
        // BF16's rounding (unit roundoff 2^-8 = 3.9e-3; measured 1.6e-3 to 1.7e-3) on top of the
        // f32 rows' agreement (1e-7)
        let e = kernels::device::norm_rel_error(&ds16, &ds);
        r.check(
            "attention_softmax_backward_rows",
            &s,
            "ds16 norm rel ≤ 3.9e-3 (BF16)",
            format!("{e:.2e}"),
            e <= 3.9e-3,
        );
    }
}
