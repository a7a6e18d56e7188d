//! FP8 parity: the three E4M3 quantisers and the dequantiser against `kernels::fp8::quant`, on
//! adversarial inputs (per-128 groups of Gaussians at magnitudes 1e-6..1e4, zeros and −0.0,
//! subnormals, exact round-to-nearest-even ties, huge values, one NaN and one infinity), for a
//! DeepSeek-sized activation and shapes that are not multiples of 128, and the batched 128×128
//! quantiser of the experts' weights. Codes and scales must be bit-identical; a NaN code or scale
//! matches any NaN (the GPU writes canonical NaNs).

pub use super::report::adversarial;
use super::report::{
    Report, code_mismatches, f32_mismatches, quantize_each_128x128, quantize_segments, shape,
};
use kernels::device::cuda::launch::Gpu;
use kernels::fp8::{ScaleFormat, ScaleLayout, dequantize, quantize};

const BIG: (usize, usize) = (4096, 7168);
const EDGES: [(usize, usize); 5] = [(1, 1), (3, 385), (129, 127), (257, 1000), (130, 4097)];
const LAYOUTS: [(ScaleLayout, &str); 3] = [
    (ScaleLayout::Tile1x128, "1x128"),
    (ScaleLayout::Tile128x1, "128x1"),
    (ScaleLayout::Block128x128, "128x128"),
];
const FORMATS: [(ScaleFormat, &str); 2] =
    [(ScaleFormat::F32, "f32"), (ScaleFormat::Ue8m0, "ue8m0")];

/// Mismatch counts of one shape, added into `acc` (codes, scales, dequantised values, elements,
/// scale count, NaN scales).
#[derive(Default)]
struct Tally {
    codes: usize,
    scales: usize,
    deq: usize,
    elems: usize,
    nscales: usize,
    nan_scales: usize,
    first: Option<String>,
}

fn compare_shape(
    gpu: &Gpu,
    x: &[f32],
    (rows, cols): (usize, usize),
    layout: ScaleLayout,
    fmt: ScaleFormat,
    t: &mut Tally,
) -> Result<(), kernels::device::cuda::launch::GpuError> {
    let cpu = quantize(x, rows, cols, layout, fmt);
    let dev = gpu.quantize(x, rows, cols, layout, fmt)?;
    let (c, ci) = code_mismatches(&dev.codes, &cpu.codes);
    let (s, si) = f32_mismatches(&dev.scales, &cpu.scales);
    // the dequantiser on the CPU's own codes and scales, so its row isolates that kernel
    let deq_cpu = dequantize(&cpu);
    let deq_gpu = gpu.dequantize(&cpu)?;
    let (d, _) = f32_mismatches(&deq_gpu, &deq_cpu);
    if t.first.is_none() {
        t.first = match (ci, si) {
            (Some(i), _) => Some(format!(
                "{rows}×{cols} code[{i}] x {:e}: gpu {:#04x} cpu {:#04x}",
                x[i], dev.codes[i], cpu.codes[i]
            )),
            (None, Some(i)) => Some(format!(
                "{rows}×{cols} scale[{i}]: gpu {:e} cpu {:e}",
                dev.scales[i], cpu.scales[i]
            )),
            _ => None,
        };
    }
    t.codes += c;
    t.scales += s;
    t.deq += d;
    t.elems += x.len();
    t.nscales += cpu.scales.len();
    t.nan_scales += cpu.scales.iter().filter(|s| s.is_nan()).count();
    Ok(())
}

fn report_tally(r: &mut Report, kernel: &str, shapes: &str, fmt: &str, t: &Tally) {
    let mut value = format!(
        "codes {}/{}, scales {}/{} differ ({} NaN scales)",
        t.codes, t.elems, t.scales, t.nscales, t.nan_scales
    );
    if let Some(f) = &t.first {
        value.push_str("; first: ");
        value.push_str(f);
    }
    let metric = format!("{fmt} codes+scales bits");
    r.check(
        kernel,
        shapes,
        &metric,
        value,
        t.codes == 0 && t.scales == 0,
    );
}

pub fn run(gpu: &Gpu, r: &mut Report, seed: u64) {
    let big = adversarial(seed, BIG.0, BIG.1);
    let edges: Vec<Vec<f32>> = EDGES
        .iter()
        .enumerate()
        .map(|(i, &(rows, cols))| adversarial(seed.wrapping_add(i as u64 + 1), rows, cols))
        .collect();
    let edge_names = EDGES
        .iter()
        .map(|&(a, b)| shape(&[a, b]))
        .collect::<Vec<_>>()
        .join(",");
    for (layout, lname) in LAYOUTS {
        let kernel = format!("fp8_quantize_{lname}");
        let mut deq_big = (0, 0);
        let mut deq_edges = (0, 0);
        for (fmt, fname) in FORMATS {
            let mut t = Tally::default();
            match compare_shape(gpu, &big, BIG, layout, fmt, &mut t) {
                Ok(()) => report_tally(r, &kernel, &shape(&[BIG.0, BIG.1]), fname, &t),
                Err(e) => r.error(&kernel, &shape(&[BIG.0, BIG.1]), &e),
            }
            deq_big = (deq_big.0 + t.deq, deq_big.1 + t.elems);
            let mut t = Tally::default();
            let res = EDGES
                .iter()
                .zip(&edges)
                .try_for_each(|(&s, x)| compare_shape(gpu, x, s, layout, fmt, &mut t));
            match res {
                Ok(()) => report_tally(r, &kernel, &edge_names, fname, &t),
                Err(e) => r.error(&kernel, &edge_names, &e),
            }
            deq_edges = (deq_edges.0 + t.deq, deq_edges.1 + t.elems);
        }
        let deq = format!("fp8_dequantize ({lname})");
        for (name, (bad, n)) in [
            (shape(&[BIG.0, BIG.1]), deq_big),
            (edge_names.clone(), deq_edges),
        ] {
            let value = format!("{bad}/{n} differ (f32 and ue8m0 scales)");
            r.check(&deq, &name, "values bits", value, bad == 0);
        }
        time(gpu, r, &big, layout, &kernel);
    }
    batched(gpu, r, seed);
}

/// The one-launch quantisers of the experts against the CPU's quantiser, codes and scales bit for
/// bit, both scale formats: every expert's weight 128×128 (`fp8_quantize_128x128_batched`), and
/// Wgrad's operands 128×1 segment by segment (`fp8_quantize_128x1_segmented`).
fn batched(gpu: &Gpu, r: &mut Report, seed: u64) {
    use cudarc::driver::DevicePtr;
    use kernels::device::cuda::launch::GpuError;
    let (rows, cols, mats) = (257, 1000, 3);
    let xs: Vec<Vec<f32>> = (0..mats)
        .map(|z| adversarial(seed.wrapping_add(100 + z as u64), rows, cols))
        .collect();
    let (offsets, seg_cols) = ([0usize, 130, 130, 131, 700], 1000);
    let x = adversarial(seed.wrapping_add(200), offsets[offsets.len() - 1], seg_cols);
    let (bands, _) = kernels::fp8::grouped::row_bands(&offsets);
    for (fmt, fname) in FORMATS {
        let note = format!("{fname} scales");
        let kernel = "fp8_quantize_128x128_batched";
        let name = format!("{mats} × {}", shape(&[rows, cols]));
        let run = || -> Result<(Vec<u8>, Vec<f32>), GpuError> {
            let bufs = xs
                .iter()
                .map(|x| gpu.upload(x))
                .collect::<Result<Vec<_>, _>>()?;
            let ptrs: Vec<u64> = bufs.iter().map(|b| b.device_ptr(gpu.stream()).0).collect();
            let per = ScaleLayout::Block128x128.num_scales(rows, cols);
            let mut codes = gpu.zeros::<u8>(mats * rows * cols)?;
            let mut scales = gpu.zeros::<f32>(mats * per)?;
            gpu.fp8_quantize_128x128_batched(&ptrs, &mut codes, &mut scales, rows, cols, fmt)?;
            Ok((gpu.download(&codes)?, gpu.download(&scales)?))
        };
        match run() {
            Ok((c, s)) => {
                let (wc, ws) = quantize_each_128x128(&xs, rows, cols, fmt);
                r.codes_and_scales(kernel, &name, &note, (&c, &s), (&wc, &ws));
            }
            Err(e) => r.error(kernel, &name, &e),
        }
        let kernel = "fp8_quantize_128x1_segmented";
        let name = format!("segments {offsets:?} × {seg_cols}");
        let total = offsets[offsets.len() - 1];
        let run = || -> Result<(Vec<u8>, Vec<f32>), GpuError> {
            let dx = gpu.upload(&x)?;
            let mut codes = gpu.zeros::<u8>(total * seg_cols)?;
            let mut scales = gpu.zeros::<f32>(bands.len() / 2 * seg_cols)?;
            let b = &bands;
            gpu.fp8_quantize_128x1_segmented(
                &dx,
                &mut codes,
                &mut scales,
                b,
                total,
                seg_cols,
                fmt,
            )?;
            Ok((gpu.download(&codes)?, gpu.download(&scales)?))
        };
        match run() {
            Ok((c, s)) => {
                let (wc, ws) = quantize_segments(&x, &offsets, seg_cols, fmt);
                r.codes_and_scales(kernel, &name, &note, (&c, &s), (&wc, &ws));
            }
            Err(e) => r.error(kernel, &name, &e),
        }
    }
}

/// Quantiser and dequantiser time on the big shape: bytes = f32 in + codes out + scales out
/// (dequantiser: codes and scales in, f32 out).
fn time(gpu: &Gpu, r: &mut Report, x: &[f32], layout: ScaleLayout, kernel: &str) {
    let (rows, cols) = BIG;
    let n = rows * cols;
    let ns = layout.num_scales(rows, cols);
    let name = shape(&[rows, cols]);
    let bufs = (|| {
        let dx = gpu.upload(x)?;
        Ok::<_, kernels::device::cuda::launch::GpuError>((
            dx,
            gpu.zeros::<u8>(n)?,
            gpu.zeros::<f32>(ns)?,
            gpu.zeros::<f32>(n)?,
        ))
    })();
    let (dx, mut codes, mut scales, mut y) = match bufs {
        Ok(b) => b,
        Err(e) => return r.error(kernel, &name, &e),
    };
    let bytes = (n * 5 + ns * 4) as f64;
    let ms = gpu.time_ms(20, || {
        gpu.fp8_quantize_dev(
            &dx,
            &mut codes,
            &mut scales,
            rows,
            cols,
            layout,
            ScaleFormat::F32,
        )
    });
    r.timing(kernel, &name, ms, bytes);
    let ms = gpu.time_ms(20, || {
        gpu.fp8_dequantize_dev(&codes, &scales, &mut y, rows, cols, layout)
    });
    r.timing("fp8_dequantize", &name, ms, bytes);
}
