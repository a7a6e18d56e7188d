//! Parity of the optimizer's kernels against `kernels::ops::adamw`: one AdamW step with F32 and
//! with BF16 moments (parameters, zeroed gradients and both moments bit for bit; adversarial
//! gradients: zeros, huge, subnormal, one NaN), and the global gradient norm over tensors of
//! awkward lengths (bit for bit in f64).

use super::report::{
    ADAMW_STEP, Report, adamw_case, adamw_kernel, bf16_mismatches, norm_tensors, shape,
};
use half::bf16;
use kernels::device::cuda::launch::{Gpu, GpuError};
use kernels::ops::adamw::{Moments, global_norm};

pub fn run(gpu: &Gpu, r: &mut Report, seed: u64) {
    for bf16_moments in [false, true] {
        for (n, timed) in [(4 * 1024 * 1024 + 5, true), (7, false)] {
            let s = shape(&[n]);
            let k = adamw_kernel(bf16_moments);
            if let Err(e) = adamw_rows(gpu, r, seed, n, bf16_moments, timed) {
                r.error(k, &s, &e);
            }
        }
    }
    let lens = [4_000_003, 1, 16_384, 16_385, 7, 1 << 20, 0];
    let s = format!(
        "{} tensors, {} values",
        lens.len(),
        lens.iter().sum::<usize>()
    );
    if let Err(e) = norm_rows(gpu, r, seed, &lens, &s) {
        r.error("grad_norm", &s, &e);
    }
}

fn adamw_rows(
    gpu: &Gpu,
    r: &mut Report,
    seed: u64,
    n: usize,
    bf16_moments: bool,
    timed: bool,
) -> Result<(), GpuError> {
    let s = shape(&[n]);
    let k = adamw_kernel(bf16_moments);
    let (opt, param, grad, moments) = adamw_case(seed, n, bf16_moments);
    let (lr, t, scale) = ADAMW_STEP;
    let (mut cp, mut cg, mut cst) = (param.clone(), grad.clone(), moments.clone());
    opt.step(&mut cp, &mut cg, scale, &mut cst, lr, t, true);
    let (mut gp, mut gg, mut gst) = (param.clone(), grad.clone(), moments.clone());
    gpu.adamw_step(&opt, &mut gp, &mut gg, scale, &mut gst, lr, t, true)?;
    r.bits(k, &s, "param", &gp, &cp);
    r.bits(k, &s, "grad (zeroed)", &gg, &cg);
    match (&gst, &cst) {
        (Moments::F32 { m: gm, v: gv }, Moments::F32 { m: cm, v: cv }) => {
            r.bits(k, &s, "m", gm, cm);
            r.bits(k, &s, "v", gv, cv);
        }
        (Moments::Bf16 { m: gm, v: gv }, Moments::Bf16 { m: cm, v: cv }) => {
            let bits = |x: &[bf16]| x.iter().map(|b| b.to_bits()).collect::<Vec<u16>>();
            for (what, g, c) in [("m", gm, cm), ("v", gv, cv)] {
                let (bad, _) = bf16_mismatches(&bits(g), &bits(c));
                let value = format!("{bad}/{n} differ");
                r.check(k, &s, &format!("{what} bf16 bits"), value, bad == 0);
            }
        }
        _ => r.check(
            k,
            &s,
            "moment kind",
            "GPU and CPU moments differ in kind".into(),
            false,
        ),
    }
    if timed {
        let c = opt.consts(lr, t, true);
        let (mut dp, mut dg) = (gpu.upload(&param)?, gpu.upload(&grad)?);
        let ms = if bf16_moments {
            let (mut dm, mut dv) = (gpu.zeros::<u16>(n)?, gpu.zeros::<u16>(n)?);
            gpu.time_ms(20, || {
                gpu.adamw_step_dev(&mut dp, &mut dg, &mut dm, &mut dv, scale, &c)
            })
        } else {
            let (mut dm, mut dv) = (gpu.zeros::<f32>(n)?, gpu.zeros::<f32>(n)?);
            gpu.time_ms(20, || {
                gpu.adamw_step_dev(&mut dp, &mut dg, &mut dm, &mut dv, scale, &c)
            })
        };
        let moment_bytes = if bf16_moments { 2 } else { 4 };
        r.timing(k, &s, ms, (n * 2 * (8 + 2 * moment_bytes)) as f64);
    }
    Ok(())
}

fn norm_rows(
    gpu: &Gpu,
    r: &mut Report,
    seed: u64,
    lens: &[usize],
    s: &str,
) -> Result<(), GpuError> {
    let tensors = norm_tensors(seed, lens);
    let refs: Vec<&[f32]> = tensors.iter().map(|t| t.as_slice()).collect();
    let cpu = global_norm(refs.iter().copied());
    let dev = gpu.global_norm(&refs)?;
    let value = format!("gpu {dev:.17e}, cpu {cpu:.17e}");
    let k = "grad_norm_chunks + the host's finish";
    r.check(
        k,
        s,
        "norm bits (f64)",
        value,
        dev.to_bits() == cpu.to_bits(),
    );
    let dev_bufs: Vec<_> = refs
        .iter()
        .filter(|t| !t.is_empty())
        .map(|t| gpu.upload(t))
        .collect::<Result<_, _>>()?;
    let bufs: Vec<_> = dev_bufs.iter().collect();
    let ms = gpu.time_ms(20, || gpu.grad_norm_dev(&bufs).map(|_| ()));
    r.timing(k, s, ms, (lens.iter().sum::<usize>() * 4) as f64);
    Ok(())
}
