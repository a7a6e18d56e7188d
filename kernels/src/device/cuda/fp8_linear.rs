//! The FP8 Linear of the CUDA backend (feature `cuda`): the CPU recipe's quantisation
//! (`fp8_quant.cu`: x and dy in 1×128 tiles, W in 128×128 blocks, 128×1 tiles for Wgrad from the
//! requantised input), then each GEMM on one of two engines:
//! - **tensor cores**: cuBLASLt's block-scaled FP8 matmul on operands packed by `fp8::pack`'s
//!   plans (`launch::lt`), for shapes it takes (K and N multiples of 16);
//! - **CUDA cores**: `fp8_gemm.cu`, the promoted GEMM that follows the CPU's sums, for every other
//!   shape and when the tensor-core engine is off.
//!
//! [`Fp8Linear::open`] picks the engine: `PHALANX_FP8_GEMM=own` forces the CUDA cores,
//! `=cublaslt` the tensor cores unchecked; by default the tensor cores are used only when
//! cuBLASLt, on random operands of every orientation at open, agrees with the CUDA-core kernel to
//! [`AGREE`] normwise (a wrong scale layout or operand order is off by O(1)). Never run on a GPU.

use super::launch::{Fp8Operand, Gpu, GpuError, Lt, Refusals};
use crate::fp8::pack::{self, Plan};
use crate::fp8::{ScaleFormat, ScaleLayout, TILE};
use crate::rng::Rng;
use cudarc::driver::CudaSlice;

/// Normwise relative difference under which cuBLASLt is taken to compute the recipe's product
/// (both sum exact E4M3 products and promote per 128 of K; they differ only in summation order
/// and the tensor cores' internal accumulation).
pub const AGREE: f64 = 1e-3;

/// The row counts the check at open multiplies, each with the row alignment it stands for. The
/// rows' operand's `VEC128_32F` scales are stored `[⌈K/128⌉, m]` (`fp8::pack`); whether cuBLASLt
/// reads them with stride m for every m, or pads m to 4 or 16, is measured, not assumed: the
/// tensor cores take row counts of the finest alignment that agrees.
const CHECK_ROWS: [(usize, usize); 3] = [(16, 208), (4, 204), (1, 37)];

/// Where the FP8 GEMMs run.
pub enum Fp8Engine {
    TensorCores(Box<Lt>),
    /// The CUDA-core kernel, and why the tensor cores are not used.
    CudaCores(String),
}

/// The FP8 Linear's three GEMMs on one device.
pub struct Fp8Linear {
    pub engine: Fp8Engine,
    /// The tensor cores' agreement with the CUDA-core kernel measured at open, when checked.
    pub agreement: Option<f64>,
    /// The tensor cores take GEMMs whose row count (`Plan::m`) is a multiple of this (1: any).
    pub rows_align: usize,
    /// GEMMs the tensor cores refused at run time (then run on the CUDA cores), and the first
    /// refusal.
    pub refused: Refusals,
}

/// x `[rows, cols]` quantised to E4M3 in `layout` with f32 scales: (codes, scales).
pub(super) fn quantize(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    layout: ScaleLayout,
) -> Result<(CudaSlice<u8>, CudaSlice<f32>), GpuError> {
    let mut codes = gpu.zeros::<u8>(rows * cols)?;
    let mut scales = gpu.zeros::<f32>(layout.num_scales(rows, cols))?;
    gpu.fp8_quantize_dev(
        x,
        &mut codes,
        &mut scales,
        rows,
        cols,
        layout,
        ScaleFormat::F32,
    )?;
    Ok((codes, scales))
}

/// A quantised operand: codes and scales in `fp8::gemm`'s layouts.
pub(super) type Quantised = (CudaSlice<u8>, CudaSlice<f32>);

impl Fp8Linear {
    /// The engine `PHALANX_FP8_GEMM` names, or the tensor cores if they pass the check.
    pub fn open(gpu: &Gpu) -> Fp8Linear {
        let lt = || Lt::new(gpu).map(Box::new);
        let engine = match std::env::var("PHALANX_FP8_GEMM")
            .unwrap_or_default()
            .as_str()
        {
            "own" => Fp8Engine::CudaCores("PHALANX_FP8_GEMM=own".into()),
            "cublaslt" => match lt() {
                Ok(lt) => Fp8Engine::TensorCores(lt),
                Err(e) => Fp8Engine::CudaCores(format!("cuBLASLt: {e}")),
            },
            _ => match lt() {
                Err(e) => Fp8Engine::CudaCores(format!("cuBLASLt: {e}")),
                Ok(lt) => {
                    let mut candidate = Fp8Linear::new(Fp8Engine::TensorCores(lt));
                    match candidate.check_rows(gpu) {
                        Ok((worst, align)) => {
                            candidate.agreement = Some(worst);
                            candidate.rows_align = align;
                            return candidate;
                        }
                        Err(why) => Fp8Engine::CudaCores(why),
                    }
                }
            },
        };
        Fp8Linear::new(engine)
    }

    /// The agreement at the [`CHECK_ROWS`] in turn while it holds: the worst difference and the
    /// finest row alignment that agreed, or why the tensor cores are off (the aligned rows
    /// disagree or are refused).
    fn check_rows(&self, gpu: &Gpu) -> Result<(f64, usize), String> {
        let mut passed: Option<(f64, usize)> = None;
        for (align, n) in CHECK_ROWS {
            let why = match self.measure_agreement(gpu, n) {
                Ok(worst) if worst <= AGREE => {
                    passed = Some((passed.map_or(worst, |p| p.0.max(worst)), align));
                    continue;
                }
                Ok(worst) => format!(
                    "cuBLASLt differs from the CUDA-core FP8 GEMM by {worst:.1e} (> {AGREE:.0e}) at {n} rows"
                ),
                Err(e) => format!("cuBLASLt: {e}"),
            };
            return passed.ok_or(why);
        }
        passed.ok_or_else(|| "no row count checked".into())
    }

    /// What [`Fp8Linear::open`] decided: the tensor cores (with their measured agreement and
    /// the row alignment they take), or the CUDA cores and why.
    pub fn verdict(&self) -> Result<(Option<f64>, usize), String> {
        match &self.engine {
            Fp8Engine::TensorCores(_) => Ok((self.agreement, self.rows_align)),
            Fp8Engine::CudaCores(why) => Err(why.clone()),
        }
    }

    /// The engine an earlier open of the same device decided (`verdict`), without measuring
    /// again; the CUDA cores if cuBLASLt does not open now.
    pub fn reopen(gpu: &Gpu, verdict: Result<(Option<f64>, usize), String>) -> Fp8Linear {
        match verdict {
            Ok((agreement, rows_align)) => match Lt::new(gpu) {
                Ok(lt) => Fp8Linear {
                    agreement,
                    rows_align,
                    ..Fp8Linear::new(Fp8Engine::TensorCores(Box::new(lt)))
                },
                Err(e) => Fp8Linear::new(Fp8Engine::CudaCores(format!("cuBLASLt: {e}"))),
            },
            Err(why) => Fp8Linear::new(Fp8Engine::CudaCores(why)),
        }
    }

    /// `engine`, unchecked.
    pub fn new(engine: Fp8Engine) -> Fp8Linear {
        Fp8Linear {
            engine,
            agreement: None,
            rows_align: 1,
            refused: Default::default(),
        }
    }

    /// e.g. `fp8 gemm: tensor cores (cuBLASLt, block-scaled; 3.1e-6 from the CUDA-core kernel)`.
    pub fn describe(&self) -> String {
        if let (n @ 1.., Some(first)) = self.refused.get() {
            return format!(
                "fp8 gemm: tensor cores, {n} GEMMs refused and run on the CUDA cores (first: {first})"
            );
        }
        match &self.engine {
            Fp8Engine::TensorCores(_) => match self.agreement {
                Some(a) if self.rows_align > 1 => format!(
                    "fp8 gemm: tensor cores (cuBLASLt, block-scaled; {a:.1e} from the CUDA-core kernel; row counts not a multiple of {} on the CUDA cores)",
                    self.rows_align
                ),
                Some(a) => format!(
                    "fp8 gemm: tensor cores (cuBLASLt, block-scaled; {a:.1e} from the CUDA-core kernel)"
                ),
                None => "fp8 gemm: tensor cores (cuBLASLt, block-scaled; unchecked)".into(),
            },
            Fp8Engine::CudaCores(why) => format!("fp8 gemm: CUDA cores ({why})"),
        }
    }

    /// The worst normwise difference between the tensor-core and CUDA-core engines over the
    /// three GEMMs of a Linear of `n` rows on random operands (K blocks not a multiple of 4).
    /// An error when the tensor cores refuse them.
    pub fn measure_agreement(&self, gpu: &Gpu, n: usize) -> Result<f64, GpuError> {
        let Fp8Engine::TensorCores(lt) = &self.engine else {
            return Err(super::launch::shape_err(
                "fp8 agreement",
                "the tensor cores are off",
            ));
        };
        let (din, dout) = (640, 256);
        let mut rng = Rng::new(0x005e_edf8);
        let mut random = |len: usize| {
            let v: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
            gpu.upload(&v)
        };
        let (x, w, dy) = (random(n * din)?, random(dout * din)?, random(n * dout)?);
        let xq = quantize(gpu, &x, n, din, ScaleLayout::Tile1x128)?;
        let wq = quantize(gpu, &w, dout, din, ScaleLayout::Block128x128)?;
        let gq = quantize(gpu, &dy, n, dout, ScaleLayout::Tile1x128)?;
        let gt = quantize(gpu, &dy, n, dout, ScaleLayout::Tile128x1)?;
        let xt = quantize(gpu, &x, n, din, ScaleLayout::Tile128x1)?;
        let mut worst = 0f64;
        for (p, a, b, own) in [
            (
                pack::fprop(n, din, dout),
                &xq,
                &wq,
                own_fprop(gpu, &xq, &wq, n, din, dout)?,
            ),
            (
                pack::dgrad(n, din, dout),
                &gq,
                &wq,
                own_dgrad(gpu, &gq, &wq, n, din, dout)?,
            ),
            (
                pack::wgrad(n, din, dout),
                &gt,
                &xt,
                own_wgrad(gpu, &gt, &xt, n, din, dout)?,
            ),
        ] {
            let got = gpu.download(&tensor_cores(gpu, lt, &p, a, b)?)?;
            let want = gpu.download(&own)?;
            worst = worst.max(crate::device::norm_rel_error(&got, &want));
        }
        Ok(worst)
    }

    /// The tensor cores' FP8 ceiling: TFLOP/s of the best of `reps` timed cuBLASLt calls on an
    /// n×n×n Fprop with operands already quantised and packed (1×128 × 128×128 scales). An error
    /// when the tensor cores are off.
    pub fn gemm_tflops(&self, gpu: &Gpu, n: usize, reps: usize) -> Result<f64, GpuError> {
        let Fp8Engine::TensorCores(lt) = &self.engine else {
            return Err(super::launch::shape_err(
                "fp8 ceiling",
                "the tensor cores are off",
            ));
        };
        let x = gpu.upload(&vec![0.5f32; n * n])?;
        let xq = quantize(gpu, &x, n, n, ScaleLayout::Tile1x128)?;
        let wq = quantize(gpu, &x, n, n, ScaleLayout::Block128x128)?;
        let p = pack::fprop(n, n, n);
        let (a, b) = (
            gpu.fp8_pack(&p.a, &xq.0, &xq.1)?,
            gpu.fp8_pack(&p.b, &wq.0, &wq.1)?,
        );
        let mut y = gpu.zeros::<f32>(n * n)?;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) {
            best = best.min(gpu.time_ms(1, || lt.gemm(&mut y, &p, &a, &b))?);
        }
        Ok(2.0 * (n as f64).powi(3) / (best * 1e-3) / 1e12)
    }

    /// The tensor cores' engine when they are on and take `p`'s shapes.
    fn lt_for(&self, p: &Plan) -> Option<&Lt> {
        match &self.engine {
            Fp8Engine::TensorCores(lt)
                if p.unsupported().is_none() && p.m.is_multiple_of(self.rows_align) =>
            {
                Some(lt)
            }
            _ => None,
        }
    }

    /// `p`'s product on the tensor cores when they take it, else (or when they refuse it at run
    /// time) `own`, the CUDA-core kernel.
    fn gemm(
        &self,
        gpu: &Gpu,
        p: &Plan,
        (a, b): (&Quantised, &Quantised),
        own: impl Fn() -> Result<CudaSlice<f32>, GpuError>,
    ) -> Result<CudaSlice<f32>, GpuError> {
        match self.lt_for(p) {
            Some(lt) => tensor_cores(gpu, lt, p, a, b).or_else(|e| {
                self.refused.note(&e);
                own()
            }),
            None => own(),
        }
    }

    /// y `[n, dout]` = x·Wᵀ, W already quantised in 128×128 blocks (`CudaBackend::fp8_weight`).
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        wq: &Quantised,
        n: usize,
        din: usize,
        dout: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let xq = quantize(gpu, x, n, din, ScaleLayout::Tile1x128)?;
        let p = pack::fprop(n, din, dout);
        self.gemm(gpu, &p, (&xq, wq), || own_fprop(gpu, &xq, wq, n, din, dout))
    }

    /// dx `[n, din]` = dy·W, W already quantised in 128×128 blocks.
    pub fn backward_input(
        &self,
        gpu: &Gpu,
        dy: &CudaSlice<f32>,
        wq: &Quantised,
        n: usize,
        din: usize,
        dout: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let gq = quantize(gpu, dy, n, dout, ScaleLayout::Tile1x128)?;
        let p = pack::dgrad(n, din, dout);
        self.gemm(gpu, &p, (&gq, wq), || own_dgrad(gpu, &gq, wq, n, din, dout))
    }

    /// dW `[dout, din]` = dyᵀ·x (a fresh buffer): x as Fprop consumed it (1×128), dequantised
    /// and requantised 128×1, the CPU's weight job.
    pub fn backward_weight(
        &self,
        gpu: &Gpu,
        dy: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        n: usize,
        din: usize,
        dout: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        let (xc, xs) = quantize(gpu, x, n, din, ScaleLayout::Tile1x128)?;
        let mut xd = gpu.zeros::<f32>(n * din)?;
        gpu.fp8_dequantize_dev(&xc, &xs, &mut xd, n, din, ScaleLayout::Tile1x128)?;
        let xt = quantize(gpu, &xd, n, din, ScaleLayout::Tile128x1)?;
        let gt = quantize(gpu, dy, n, dout, ScaleLayout::Tile128x1)?;
        let p = pack::wgrad(n, din, dout);
        self.gemm(gpu, &p, (&gt, &xt), || {
            own_wgrad(gpu, &gt, &xt, n, din, dout)
        })
    }
}

/// `p`'s product on the tensor cores: both operands packed, one cuBLASLt call.
fn tensor_cores(
    gpu: &Gpu,
    lt: &Lt,
    p: &Plan,
    a: &Quantised,
    b: &Quantised,
) -> Result<CudaSlice<f32>, GpuError> {
    let pa = gpu.fp8_pack(&p.a, &a.0, &a.1)?;
    let pb = gpu.fp8_pack(&p.b, &b.0, &b.1)?;
    let mut out = gpu.zeros::<f32>(p.m * p.n)?;
    lt.gemm(&mut out, p, &pa, &pb)?;
    Ok(out)
}

/// y[i, j] = Σ_k x[i, k]·W[j, k]: x 1×128 scales [n, kbs], W 128×128 [⌈dout/128⌉, kbs].
fn own_fprop(
    gpu: &Gpu,
    x: &Quantised,
    w: &Quantised,
    n: usize,
    din: usize,
    dout: usize,
) -> Result<CudaSlice<f32>, GpuError> {
    let kbs = din.div_ceil(TILE);
    let a = Fp8Operand {
        codes: &x.0,
        row_stride: din,
        k_stride: 1,
        scales: &x.1,
        scale_kb: 1,
        scale_row: kbs,
        scale_div: 1,
    };
    let b = Fp8Operand {
        codes: &w.0,
        row_stride: din,
        k_stride: 1,
        scales: &w.1,
        scale_kb: 1,
        scale_row: kbs,
        scale_div: TILE,
    };
    let mut y = gpu.zeros::<f32>(n * dout)?;
    gpu.fp8_gemm_promoted(&mut y, (n, dout, din), &a, &b)?;
    Ok(y)
}

/// dx[i, j] = Σ_k dy[i, k]·W[k, j]: dy 1×128 scales [n, ⌈dout/128⌉]; W read down its columns,
/// its 128×128 scales [⌈dout/128⌉, ⌈din/128⌉] indexed (kb, j/128).
fn own_dgrad(
    gpu: &Gpu,
    dy: &Quantised,
    w: &Quantised,
    n: usize,
    din: usize,
    dout: usize,
) -> Result<CudaSlice<f32>, GpuError> {
    let a = Fp8Operand {
        codes: &dy.0,
        row_stride: dout,
        k_stride: 1,
        scales: &dy.1,
        scale_kb: 1,
        scale_row: dout.div_ceil(TILE),
        scale_div: 1,
    };
    let b = Fp8Operand {
        codes: &w.0,
        row_stride: 1,
        k_stride: din,
        scales: &w.1,
        scale_kb: din.div_ceil(TILE),
        scale_row: 1,
        scale_div: TILE,
    };
    let mut dx = gpu.zeros::<f32>(n * din)?;
    gpu.fp8_gemm_promoted(&mut dx, (n, din, dout), &a, &b)?;
    Ok(dx)
}

/// dW[i, j] = Σ_k dy[k, i]·x[k, j]: both read down columns, 128×1 scales [⌈n/128⌉, cols].
fn own_wgrad(
    gpu: &Gpu,
    dy: &Quantised,
    x: &Quantised,
    n: usize,
    din: usize,
    dout: usize,
) -> Result<CudaSlice<f32>, GpuError> {
    let a = Fp8Operand {
        codes: &dy.0,
        row_stride: 1,
        k_stride: dout,
        scales: &dy.1,
        scale_kb: dout,
        scale_row: 1,
        scale_div: 1,
    };
    let b = Fp8Operand {
        codes: &x.0,
        row_stride: 1,
        k_stride: din,
        scales: &x.1,
        scale_kb: din,
        scale_row: 1,
        scale_div: 1,
    };
    let mut g = gpu.zeros::<f32>(dout * din)?;
    gpu.fp8_gemm_promoted(&mut g, (dout, din, n), &a, &b)?;
    Ok(g)
}
