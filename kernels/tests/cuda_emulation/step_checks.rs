//! The device step's own kernels (`tensor.cu`, `moe.cu`) emulated against the CPU backend
//! (`kernels::device::backend::Cpu`), whose methods they mirror: head layouts, column copies,
//! offset copies, add, the router's sigmoid and MoE dispatch and combine on a random routing.
//! Bit for bit where the kernel's header claims the CPU's bits; sigmoid (expf) within 1e-5 relative and
//! the combine's dot products (a block tree, with cancellation) within 1e-5 normwise.

use super::parity::{Report, bf16_mismatches, indices, normals, shape, sprinkle};
use super::{Emu, failed};
use kernels::device::backend::{Backend, Cpu, HostPlan};
use kernels::ops::moe_dispatch::DispatchPlan;
use kernels::ops::moe_gate::Routing;

pub fn heads_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for (b, t, nh, w) in [(2, 5, 3, 7), (1, 1, 1, 1), (3, 17, 4, 40)] {
        let s = shape(&[b, t, nh, w]);
        let x = normals(seed, "heads x", b * t * nh * w);
        let xt = normals(seed, "heads xt", b * t * w);
        let run = emu.prepare();
        run.put("x", &x);
        run.put("xt", &xt);
        let args = [b, t, nh, w].map(|v| v.to_string());
        if let Err(e) = emu.exec(&run, "heads", &args) {
            failed(r, "tensor_heads", &s, e);
            continue;
        }
        let c = Cpu::new();
        let fwd = c.heads(&x, b, t, nh, w, false).unwrap();
        let inv = c.heads(&x, b, t, nh, w, true).unwrap();
        r.bits(
            "tensor_heads",
            &s,
            "[b,t,h,w]→[b,h,t,w]",
            &run.get("fwd"),
            &fwd,
        );
        r.bits("tensor_heads", &s, "inverse", &run.get("inv"), &inv);
        let bc = c.broadcast_heads(&xt, b, t, nh, w).unwrap();
        r.bits("tensor_broadcast_heads", &s, "y", &run.get("bcast"), &bc);
        let sum = c.sum_heads(&x, b, t, nh, w).unwrap();
        r.bits("tensor_sum_heads", &s, "y", &run.get("sum"), &sum);
    }
}

pub fn copy_rows(emu: &Emu, r: &mut Report, seed: u64) {
    // (rows, dst_w, dst_off, src_w, src_off, width)
    for (rows, dw, doff, sw, soff, width) in [(9, 24, 8, 40, 32, 8), (5, 3, 0, 1, 0, 1)] {
        for acc in [false, true] {
            let s = format!("{} ← {}, acc {acc}", shape(&[rows, dw]), shape(&[rows, sw]));
            let dst = normals(seed, "copy dst", rows * dw);
            let src = normals(seed, "copy src", rows * sw);
            let run = emu.prepare();
            run.put("dst", &dst);
            run.put("src", &src);
            let args = [dw, doff, sw, soff, width, acc as usize].map(|v| v.to_string());
            if let Err(e) = emu.exec(&run, "copy_cols", &args) {
                failed(r, "tensor_copy_cols", &s, e);
                continue;
            }
            let mut want = dst.clone();
            Cpu::new()
                .copy_cols(&mut want, dw, doff, &src, sw, soff, width, acc)
                .unwrap();
            r.bits("tensor_copy_cols", &s, "dst", &run.get("dst"), &want);
        }
    }
}

pub fn elementwise_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for (m, d, doff, soff, n, acc) in [(1000, 10, 300, 500, 400, true), (3, 1, 0, 2, 1, false)] {
        let s = format!("{}, copy {n} at {doff} ← {soff}", shape(&[m]));
        let mut a = normals(seed, "ew a", m);
        a.iter_mut().step_by(7).for_each(|v| *v *= 12.0);
        // ±0, subnormals, huge values; exact BF16 ties (to even), the largest finite (to inf), NaNs
        // (kept quiet with their payload's top bits), −inf
        sprinkle(&mut a, seed, "ew a specials", m / 50 + 1);
        for (i, bits) in [
            0x3f80_8000u32,
            0x3f81_8000,
            0x7f7f_ffff,
            0x0000_8000,
            0x8001_8000,
            0x7f80_0001,
            0xffc1_2345,
            0xff80_0000,
        ]
        .into_iter()
        .enumerate()
        {
            a[(i * 97) % m] = f32::from_bits(bits);
        }
        let b = normals(seed, "ew b", m);
        let c = Cpu::new();
        let sig = c.sigmoid_forward(&a).unwrap();
        let run = emu.prepare();
        run.put("a", &a);
        run.put("b", &b);
        run.put("s", &sig);
        let args = [doff, soff, n, acc as usize].map(|v| v.to_string());
        if let Err(e) = emu.exec(&run, "elementwise", &args) {
            failed(r, "tensor_add", &s, e);
            continue;
        }
        let want16: Vec<u16> = a
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let (bad, first) = bf16_mismatches(&run.get::<u16>("bf16"), &want16);
        let at = first.map(|i| format!(", first at {i}")).unwrap_or_default();
        let what = "bits (half::bf16::from_f32)";
        r.check(
            "tensor_to_bf16",
            &s,
            what,
            format!("{bad}/{m} differ{at}"),
            bad == 0,
        );
        // the batched kernel read a's halves in reverse order: the same bits, swapped
        let half = m / 2;
        let swapped = [&want16[half..2 * half], &want16[..half]].concat();
        let (bad, first) = bf16_mismatches(&run.get::<u16>("bf16_batched"), &swapped);
        let at = first.map(|i| format!(", first at {i}")).unwrap_or_default();
        r.check(
            "tensor_to_bf16_batched",
            &s,
            "bits, 2 buffers by address",
            format!("{bad}/{} differ{at}", 2 * half),
            bad == 0,
        );
        let mut scaled = a.clone();
        c.scale(&mut scaled, 0.37).unwrap();
        r.bits("tensor_scale", &s, "a × 0.37", &run.get("scaled"), &scaled);
        let sum = c.add(&a, &b).unwrap();
        r.bits("tensor_add", &s, "a + b", &run.get("sum"), &sum);
        r.rel("sigmoid_forward", &s, "s", &run.get("sig"), &sig);
        let dsig = c.sigmoid_backward_input(&b, &sig).unwrap();
        r.bits("sigmoid_backward_input", &s, "d", &run.get("dsig"), &dsig);
        // tensor_copy as put_rows with rows of d: rows(b, soff/d..) into a at doff/d
        let (rows, at) = (n / d, doff / d);
        let mut want = a.clone();
        let block = c.rows(&b, soff / d, soff / d + rows, d).unwrap();
        c.put_rows(&mut want, at, &block, d, acc).unwrap();
        r.bits("tensor_copy", &s, "dst", &run.get("copy"), &want);
    }
}

/// A random routing of `tokens` tokens to `k` distinct experts of `e`, with its host plan.
fn routing(seed: u64, tokens: usize, e: usize, k: usize) -> HostPlan {
    let mut experts = Vec::with_capacity(tokens * k);
    let picks = indices(seed, "moe picks", tokens * e, e);
    for t in 0..tokens {
        let mut chosen: Vec<u32> = Vec::new();
        for &p in &picks[t * e..(t + 1) * e] {
            let mut p = p;
            while chosen.contains(&p) {
                p = (p + 1) % e as u32;
            }
            chosen.push(p);
            if chosen.len() == k {
                break;
            }
        }
        experts.extend(chosen);
    }
    let weights: Vec<f32> = normals(seed, "moe weights", tokens * k)
        .iter()
        .map(|v| v.abs() + 0.1)
        .collect();
    let routing = Routing {
        k,
        experts,
        weights: weights.clone(),
    };
    HostPlan::new(DispatchPlan::new(&routing, e), k, weights)
}

pub fn moe_rows(emu: &Emu, r: &mut Report, seed: u64) {
    for (tokens, e, k, d) in [(37, 8, 3, 20), (1, 2, 1, 1), (16, 16, 6, 300)] {
        let s = format!("{tokens} tokens, {e} experts, top-{k}, d {d}");
        let hp = routing(seed, tokens, e, k);
        let rows = hp.plan.rows();
        let x = normals(seed, "moe x", tokens * d);
        let ye = normals(seed, "moe ye", rows * d);
        let dout = normals(seed, "moe dout", tokens * d);
        let dx = normals(seed, "moe dx prior", tokens * d);
        let dxe = normals(seed, "moe dxe", rows * d);
        let out = normals(seed, "moe out prior", tokens * d);
        let run = emu.prepare();
        for (name, v) in [
            ("x", &x),
            ("ye", &ye),
            ("dout", &dout),
            ("dx", &dx),
            ("dxe", &dxe),
            ("out", &out),
            ("weights", &hp.weights),
        ] {
            run.put(name, v);
        }
        run.put("token", &hp.plan.token);
        run.put("slot", &hp.plan.slot);
        run.put("rows_of_token", &hp.rows_of_token);
        if let Err(er) = emu.exec(&run, "moe", &[k.to_string(), d.to_string()]) {
            failed(r, "moe_dispatch_forward", &s, er);
            continue;
        }
        let c = Cpu::new();
        let xe = c.dispatch_forward(&x, &hp, d).unwrap();
        r.bits("moe_dispatch_forward", &s, "xe", &run.get("xe"), &xe);
        let mut want_dx = dx.clone();
        c.dispatch_backward_input(&mut want_dx, &dxe, &hp, d)
            .unwrap();
        r.bits(
            "moe_dispatch_backward_input",
            &s,
            "dx",
            &run.get("dx"),
            &want_dx,
        );
        let mut want_out = out.clone();
        c.combine_forward(&mut want_out, &ye, &hp, d).unwrap();
        r.bits("moe_combine_forward", &s, "out", &run.get("out"), &want_out);
        let (dye, dw) = c.combine_backward_input(&dout, &ye, &hp, d).unwrap();
        r.bits(
            "moe_combine_backward_input",
            &s,
            "dye",
            &run.get("dye"),
            &dye,
        );
        // each weight gradient is a d-term dot product with cancellation: judged normwise, as attention
        r.norm_rel(
            "moe_combine_backward_input",
            &s,
            "dweights",
            &run.get("dweights"),
            &dw,
        );
    }
}

/// The router on the device (`router.cu`) against `ops::moe_gate`, `DispatchPlan`, `HostPlan`
/// and `ops::balance`, bit for bit: experts and weights, the plan (offsets, token, slot, each
/// token's rows), the gate's and the balance loss's gradient, each sequence's balance loss (f64).
/// Affinities rounded to 1/16 make ties, so the lower-index rule is exercised.
pub fn router_rows(emu: &Emu, r: &mut Report, seed: u64) {
    use kernels::ops::balance;
    use kernels::ops::moe_gate::{self, RouteRule};
    let rules = [
        (32, 8, 4, 4, true, 2.5),
        (16, 1, 1, 2, false, 1.0),
        (64, 8, 3, 6, true, 1.5),
        (8, 4, 2, 2, true, 2.5),
    ];
    for (case, &(e, n_group, topk_group, k, normalize, scale)) in rules.iter().enumerate() {
        // the first rule over long sequences: 4,400 entries (two of the balance kernels' 4,096
        // entry slices) and 1,100 tokens (eighteen 64-token tiles of P's terms at 32 experts)
        let (batch, seq) = if case == 0 { (2, 1100) } else { (3, 37) };
        let n = batch * seq;
        let s_name = shape(&[n, e]);
        let s = format!("{s_name}, {n_group} groups top-{topk_group}, k {k}");
        let ties = case % 2 == 0;
        let aff: Vec<f32> = normals(seed + case as u64, "route s", n * e)
            .into_iter()
            .map(|v| {
                let p = 1.0 / (1.0 + (-v).exp());
                if ties { (p * 16.0).round() / 16.0 } else { p }
            })
            .collect();
        let bias: Vec<f32> = normals(seed + case as u64, "route bias", e)
            .into_iter()
            .map(|v| if ties { 0.0 } else { v * 0.05 })
            .collect();
        let dweights = normals(seed + case as u64, "route dw", n * k);
        let rule = RouteRule {
            n_group,
            topk_group,
            k,
            scale,
            normalize,
        };
        let alpha = 1e-3f32;
        let alpha_seq = alpha / batch as f32;
        let run = emu.prepare();
        run.put("s", &aff);
        run.put("bias", &bias);
        run.put("dweights", &dweights);
        let args = [
            n.to_string(),
            e.to_string(),
            n_group.to_string(),
            topk_group.to_string(),
            k.to_string(),
            scale.to_bits().to_string(),
            u8::from(normalize).to_string(),
            seq.to_string(),
            alpha.to_bits().to_string(),
            alpha_seq.to_bits().to_string(),
        ];
        if let Err(err) = emu.exec(&run, "route", &args) {
            failed(r, "moe_route", &s, err);
            continue;
        }
        let routing = moe_gate::forward(&aff, &bias, &rule);
        let plan = HostPlan::new(DispatchPlan::new(&routing, e), k, routing.weights.clone());
        let same = |got: Vec<u32>, want: &[u32]| {
            let bad = got.len().abs_diff(want.len())
                + got.iter().zip(want).filter(|(a, b)| a != b).count();
            (format!("{bad}/{} differ", want.len()), bad == 0)
        };
        let (v, ok) = same(run.get("experts"), &routing.experts);
        r.check("moe_route", &s, "experts", v, ok);
        r.bits(
            "moe_route",
            &s,
            "weights",
            &run.get("weights"),
            &routing.weights,
        );
        let offsets: Vec<u32> = plan.plan.offsets.iter().map(|&o| o as u32).collect();
        let (v, ok) = same(run.get("offsets"), &offsets);
        r.check("moe_plan_count/fill", &s, "offsets", v, ok);
        let (v, ok) = same(run.get("token"), &plan.plan.token);
        r.check("moe_plan_fill", &s, "token", v, ok);
        let (v, ok) = same(run.get("slot"), &plan.plan.slot);
        r.check("moe_plan_fill", &s, "slot", v, ok);
        let (v, ok) = same(run.get("rows_of_token"), &plan.rows_of_token);
        r.check("moe_plan_rows", &s, "rows_of_token", v, ok);
        let mut ds = vec![0f32; n * e];
        moe_gate::backward_input(&mut ds, &dweights, &aff, &routing, &rule);
        balance::batch_loss_backward_input(&mut ds, &aff, &routing.experts, seq, batch, k, alpha);
        r.bits(
            "moe_route_backward + balance",
            &s,
            "ds",
            &run.get("ds"),
            &ds,
        );
        let loss: Vec<f64> = run.get("loss");
        let want: Vec<f64> = (0..batch)
            .map(|b| {
                let sq = &aff[b * seq * e..(b + 1) * seq * e];
                let ex = &routing.experts[b * seq * k..(b + 1) * seq * k];
                balance::sequence_loss_forward(sq, ex, k, e, alpha)
            })
            .collect();
        let bad = loss.len().abs_diff(want.len())
            + loss
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
        let v = format!(
            "{bad}/{batch} differ (first {:e} vs {:e})",
            loss.first().copied().unwrap_or(f64::NAN),
            want[0]
        );
        r.check(
            "moe_balance_forward",
            &s,
            "per-sequence loss bits",
            v,
            bad == 0,
        );
    }
}
