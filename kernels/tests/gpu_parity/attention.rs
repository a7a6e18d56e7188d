//! Parity of the fused causal attention (`attention.cu`) against `ops::attention::forward` and
//! `backward_input` on fresh random q, k, v and dO: o, dq, dk and dv within 1e-5 **normwise**
//! relative error (‖gpu − cpu‖₂ / ‖cpu‖₂), with the element-wise floored error of the other
//! families printed beside it but not judged. Why: each output is a sum over up to t keys with
//! cancellation, so single elements near zero carry the whole sum's rounding. On the host (a
//! C++ emulation of attention.cu, 256 threads per block with real barriers and shuffles, against
//! an f64 reference: the prototype of `cuda_emulation.rs`) the CPU-style f32 computation itself was 5e-5 to 3e-4 off
//! the f64 result element-wise with the 1e-3 floor, and the emulated kernel 2e-7 to 7e-7
//! normwise. The GPU backward takes the GPU forward's own o and lse (the CPU keeps P instead,
//! which the GPU never stores), so a backward row judges forward and backward together; a
//! second run must give the same bits (no atomics). Shapes: the tiny config's head dims,
//! DeepSeek-V3's (192, 128) at t = 1024 and 4096 (bh = 1 there: the CPU reference holds a t²
//! matrix per bh), a t that is not a multiple of the 64-row tile and the largest head dims.
//! Forward and backward are timed as TFLOP/s of the causal FLOP count (informative, never
//! asserted).

use super::report::{Report, normals, scaled};
use kernels::device::cuda::launch::{AttentionShape, CudaSlice, Gpu, GpuError};
use kernels::ops::attention;

pub fn run(gpu: &Gpu, r: &mut Report, seed: u64) {
    let shapes = [
        (2, 128, 48, 32, false),
        (4, 1024, 192, 128, true),
        (1, 4096, 192, 128, true),
        (3, 300, 192, 128, false),
        (2, 65, 256, 256, false),
    ];
    for (bh, t, dqk, dv, timed) in shapes {
        let scale = 1.0 / (dqk as f32).sqrt();
        let s = AttentionShape {
            bh,
            t,
            dqk,
            dv,
            scale,
        };
        if let Err(e) = check(gpu, r, seed, s, timed) {
            r.error("attention", &label(s), &e);
        }
    }
}

fn label(s: AttentionShape) -> String {
    format!("bh {} t {} d {}/{}", s.bh, s.t, s.dqk, s.dv)
}

fn check(
    gpu: &Gpu,
    r: &mut Report,
    seed: u64,
    s: AttentionShape,
    timed: bool,
) -> Result<(), GpuError> {
    let AttentionShape {
        bh,
        t,
        dqk,
        dv,
        scale,
    } = s;
    let name = label(s);
    let (nqk, nv) = (bh * t * dqk, bh * t * dv);
    // scores of a few units: softmax rows neither flat nor one-hot
    let q = scaled(seed, "att q", nqk, 1.5);
    let k = normals(seed, "att k", nqk);
    let v = normals(seed, "att v", nv);
    let d_o = normals(seed, "att do", nv);

    let (mut o, mut p) = (vec![0f32; nv], vec![0f32; bh * t * t]);
    attention::forward(&mut o, &mut p, &q, &k, &v, t, dqk, dv, scale);
    let (mut dq, mut dk, mut dvv) = (vec![0f32; nqk], vec![0f32; nqk], vec![0f32; nv]);
    attention::backward_input(
        &mut dq, &mut dk, &mut dvv, &d_o, &p, &q, &k, &v, t, dqk, dv, scale,
    );
    drop(p);

    let mut g = Dev {
        q: gpu.upload(&q)?,
        k: gpu.upload(&k)?,
        v: gpu.upload(&v)?,
        d_o: gpu.upload(&d_o)?,
        o: gpu.zeros(nv)?,
        lse: gpu.zeros(bh * t)?,
        dq: gpu.zeros(nqk)?,
        dk: gpu.zeros(nqk)?,
        dv: gpu.zeros(nv)?,
        delta: gpu.zeros(bh * t)?,
    };
    g.forward(gpu, s)?;
    r.norm_rel("attention_forward", &name, "o", &gpu.download(&g.o)?, &o);
    let lse = gpu.download(&g.lse)?;
    let finite = lse.iter().all(|x| x.is_finite());
    let value = format!("{} rows", lse.len());
    r.check("attention_forward", &name, "lse finite", value, finite);

    g.backward(gpu, s)?;
    let kb = "attention_backward_input";
    r.norm_rel(kb, &name, "dq", &gpu.download(&g.dq)?, &dq);
    r.norm_rel(kb, &name, "dk", &gpu.download(&g.dk)?, &dk);
    r.norm_rel(kb, &name, "dv", &gpu.download(&g.dv)?, &dvv);
    // determinism: a second forward and backward give the same bits
    let (o1, dk1) = (gpu.download(&g.o)?, gpu.download(&g.dk)?);
    g.forward(gpu, s)?;
    g.backward(gpu, s)?;
    r.bits(
        "attention_forward",
        &name,
        "o rerun",
        &gpu.download(&g.o)?,
        &o1,
    );
    r.bits(kb, &name, "dk rerun", &gpu.download(&g.dk)?, &dk1);

    if timed {
        // causal: half of the t² scores, each a dqk-long dot and a dv-long row of P·v, at 2 FLOP
        // per multiply-add; the backward's four products are twice that (recomputation of P not
        // counted)
        let forward_flops = (bh * t * t) as f64 * (dqk + dv) as f64;
        let ms = gpu.time_ms(20, || g.forward(gpu, s));
        r.timing_flops("attention_forward", &name, ms, forward_flops);
        let ms = gpu.time_ms(20, || g.backward(gpu, s));
        r.timing_flops(kb, &name, ms, 2.0 * forward_flops);
    }
    Ok(())
}

/// The device buffers of one shape: inputs, the forward's outputs, the gradients and scratch.
struct Dev {
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    d_o: CudaSlice<f32>,
    o: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    dq: CudaSlice<f32>,
    dk: CudaSlice<f32>,
    dv: CudaSlice<f32>,
    delta: CudaSlice<f32>,
}

impl Dev {
    fn forward(&mut self, gpu: &Gpu, s: AttentionShape) -> Result<(), GpuError> {
        gpu.attention_forward(&mut self.o, &mut self.lse, &self.q, &self.k, &self.v, s)
    }

    fn backward(&mut self, gpu: &Gpu, s: AttentionShape) -> Result<(), GpuError> {
        gpu.attention_backward_input(
            &mut self.dq,
            &mut self.dk,
            &mut self.dv,
            &mut self.delta,
            &self.d_o,
            &self.o,
            &self.lse,
            &self.q,
            &self.k,
            &self.v,
            s,
        )
    }
}
