//! Launch wrappers of `fp8_quant.cu`: the three E4M3 quantisers and the dequantiser, on device
//! buffers, and host-level `quantize` / `dequantize` that take and give `fp8::Fp8Tensor` as the
//! CPU's `fp8::quantize` and `fp8::dequantize` do. Never run on a GPU.

use super::{
    BLOCK, GRID_X_MAX, GRID_Y_MAX, Gpu, GpuError, check_len, config, grid_dim, grid_stride, int,
};
use crate::fp8::{Fp8Tensor, ScaleFormat, ScaleLayout, TILE};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// The kernel of a layout.
fn quantizer(layout: ScaleLayout) -> &'static str {
    match layout {
        ScaleLayout::Tile1x128 => "fp8_quantize_1x128",
        ScaleLayout::Tile128x1 => "fp8_quantize_128x1",
        ScaleLayout::Block128x128 => "fp8_quantize_128x128",
    }
}

impl Gpu {
    /// E4M3 codes and scales of `x [rows, cols]` with `layout`'s groups, into device buffers of
    /// `rows·cols` codes and `layout.num_scales(rows, cols)` scales.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_quantize_dev(
        &self,
        x: &CudaSlice<f32>,
        codes: &mut CudaSlice<u8>,
        scales: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        layout: ScaleLayout,
        fmt: ScaleFormat,
    ) -> Result<(), GpuError> {
        let k = quantizer(layout);
        let n = rows * cols;
        check_len(k, "x", x.len(), n)?;
        check_len(k, "codes", codes.len(), n)?;
        check_len(k, "scales", scales.len(), layout.num_scales(rows, cols))?;
        if n == 0 {
            return Ok(());
        }
        let (r, c) = (int(k, "rows", rows)?, int(k, "cols", cols)?);
        let ue8m0 = i32::from(fmt == ScaleFormat::Ue8m0);
        let tiles = |len: usize| len.div_ceil(TILE);
        let cfg = match layout {
            // one warp per 1×128 tile, BLOCK/32 tiles per block
            ScaleLayout::Tile1x128 => {
                let warps = rows * tiles(cols);
                let g = grid_dim(k, warps.div_ceil(BLOCK as usize / 32), GRID_X_MAX)?;
                config((g, 1), BLOCK)
            }
            // one thread per column of a 128-row band
            ScaleLayout::Tile128x1 => {
                let gx = grid_dim(k, cols.div_ceil(BLOCK as usize), GRID_X_MAX)?;
                config((gx, grid_dim(k, tiles(rows), GRID_Y_MAX)?), BLOCK)
            }
            // one block per 128×128 block (the kernel indexes scales by gridDim.x = ⌈cols/128⌉)
            ScaleLayout::Block128x128 => {
                let gx = grid_dim(k, tiles(cols), GRID_X_MAX)?;
                config((gx, grid_dim(k, tiles(rows), GRID_Y_MAX)?), BLOCK)
            }
        };
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(x).arg(codes).arg(scales).arg(&r).arg(&c).arg(&ue8m0);
        // SAFETY: every fp8_quantize_* takes (const float* x, u8* codes, float* scales, int rows,
        // int cols, int ue8m0); x and codes hold rows·cols elements and scales the layout's
        // scale count (checked above); the grid is the one the kernel's indexing assumes.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `fp8_quantize_128x1_segmented`: x `[rows, cols]` quantised 128×1 band by band, `bands`
    /// the (lo, hi) rows of each (`fp8::grouped::row_bands`: every segment's from its first row);
    /// codes in place, band b's scales at `scales[b·cols..]`.
    #[allow(clippy::too_many_arguments)]
    pub fn fp8_quantize_128x1_segmented(
        &self,
        x: &CudaSlice<f32>,
        codes: &mut CudaSlice<u8>,
        scales: &mut CudaSlice<f32>,
        bands: &[i32],
        rows: usize,
        cols: usize,
        fmt: ScaleFormat,
    ) -> Result<(), GpuError> {
        let k = "fp8_quantize_128x1_segmented";
        let nb = bands.len() / 2;
        check_len(k, "x", x.len(), rows * cols)?;
        check_len(k, "codes", codes.len(), rows * cols)?;
        check_len(k, "scales", scales.len(), nb * cols)?;
        let bad = bands.chunks(2).any(|b| {
            b.len() != 2
                || b[0] < 0
                || b[1] < b[0]
                || b[1] - b[0] > TILE as i32
                || b[1] as usize > rows
        });
        if bad {
            return Err(super::shape_err(
                k,
                "a band outside the rows or wider than 128",
            ));
        }
        if nb == 0 || cols == 0 {
            return Ok(());
        }
        let c = int(k, "cols", cols)?;
        let ue8m0 = i32::from(fmt == ScaleFormat::Ue8m0);
        let gx = grid_dim(k, cols.div_ceil(BLOCK as usize), GRID_X_MAX)?;
        let gy = grid_dim(k, nb, GRID_Y_MAX)?;
        let dbands = self.upload(bands)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(x)
            .arg(codes)
            .arg(scales)
            .arg(&dbands)
            .arg(&c)
            .arg(&ue8m0);
        // SAFETY: the argument list is the kernel's; every band lies inside the rows (checked
        // above), so each thread reads and writes x and codes within rows·cols and its scale
        // within nb·cols; the band list is freed stream-ordered after the kernel.
        unsafe { b.launch(config((gx, gy), BLOCK)) }?;
        Ok(())
    }

    /// `fp8_quantize_128x128_batched`: the matrices at the device addresses `xs` (each
    /// `[rows, cols]` f32, live for the launch) quantised in 128×128 blocks in one launch, matrix z's
    /// codes at `codes[z·rows·cols..]` and its scales at `scales[z·⌈rows/128⌉·⌈cols/128⌉..]`.
    pub fn fp8_quantize_128x128_batched(
        &self,
        xs: &[u64],
        codes: &mut CudaSlice<u8>,
        scales: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        fmt: ScaleFormat,
    ) -> Result<(), GpuError> {
        let k = "fp8_quantize_128x128_batched";
        let n = rows * cols;
        let per_scales = ScaleLayout::Block128x128.num_scales(rows, cols);
        check_len(k, "codes", codes.len(), xs.len() * n)?;
        check_len(k, "scales", scales.len(), xs.len() * per_scales)?;
        if n == 0 || xs.is_empty() {
            return Ok(());
        }
        let (r, c) = (int(k, "rows", rows)?, int(k, "cols", cols)?);
        let ue8m0 = i32::from(fmt == ScaleFormat::Ue8m0);
        let grid = (
            grid_dim(k, cols.div_ceil(TILE), GRID_X_MAX)?,
            grid_dim(k, rows.div_ceil(TILE), GRID_Y_MAX)?,
            grid_dim(k, xs.len(), GRID_Y_MAX)?,
        );
        let ptrs = self.upload(xs)?;
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(&ptrs)
            .arg(codes)
            .arg(scales)
            .arg(&r)
            .arg(&c)
            .arg(&ue8m0);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: grid,
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list is the kernel's; each address in `xs` holds rows·cols f32
        // (the caller's), codes and scales hold every matrix's (checked above); the pointer list
        // is freed stream-ordered after the kernel.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `fp8_dequantize`: `y [rows, cols]` = decode(code) · scale of the element's group.
    pub fn fp8_dequantize_dev(
        &self,
        codes: &CudaSlice<u8>,
        scales: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        layout: ScaleLayout,
    ) -> Result<(), GpuError> {
        let k = "fp8_dequantize";
        let n = rows * cols;
        check_len(k, "codes", codes.len(), n)?;
        check_len(k, "y", y.len(), n)?;
        check_len(k, "scales", scales.len(), layout.num_scales(rows, cols))?;
        if n == 0 {
            return Ok(());
        }
        let (gr, gc) = layout.group_shape();
        let (r, c) = (int(k, "rows", rows)?, int(k, "cols", cols)?);
        let (gr, gc) = (gr as i32, gc as i32);
        let mut b = self.stream.launch_builder(self.function(k)?);
        b.arg(codes)
            .arg(scales)
            .arg(y)
            .arg(&r)
            .arg(&c)
            .arg(&gr)
            .arg(&gc);
        // SAFETY: fp8_dequantize takes (const u8* codes, const float* scales, float* y, int rows,
        // int cols, int group_rows, int group_cols); codes and y hold rows·cols elements, scales
        // the layout's count (checked above); a grid-stride loop, any launch shape.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// `fp8::quantize` on the GPU: uploads `x`, quantises, downloads codes and scales.
    pub fn quantize(
        &self,
        x: &[f32],
        rows: usize,
        cols: usize,
        layout: ScaleLayout,
        fmt: ScaleFormat,
    ) -> Result<Fp8Tensor, GpuError> {
        check_len(quantizer(layout), "x", x.len(), rows * cols)?;
        let ns = layout.num_scales(rows, cols);
        let mut t = Fp8Tensor {
            rows,
            cols,
            codes: Vec::new(),
            scales: vec![0.0; ns],
            layout,
        };
        if x.is_empty() {
            return Ok(t);
        }
        let dx = self.upload(x)?;
        let mut codes = self.zeros::<u8>(rows * cols)?;
        let mut scales = self.zeros::<f32>(ns)?;
        self.fp8_quantize_dev(&dx, &mut codes, &mut scales, rows, cols, layout, fmt)?;
        t.codes = self.download(&codes)?;
        t.scales = self.download(&scales)?;
        Ok(t)
    }

    /// `fp8::dequantize` on the GPU.
    pub fn dequantize(&self, t: &Fp8Tensor) -> Result<Vec<f32>, GpuError> {
        let n = t.rows * t.cols;
        if n == 0 {
            return Ok(Vec::new());
        }
        let codes = self.upload(&t.codes)?;
        let scales = self.upload(&t.scales)?;
        let mut y = self.zeros::<f32>(n)?;
        self.fp8_dequantize_dev(&codes, &scales, &mut y, t.rows, t.cols, t.layout)?;
        self.download(&y)
    }
}

/// One operand of `fp8_gemm_promoted`: E4M3 codes read at `row·row_stride + k·k_stride`, and the
/// scale of K block kb for row r at `scales[kb·scale_kb + (r / scale_div)·scale_row]`.
pub struct Fp8Operand<'a> {
    pub codes: &'a CudaSlice<u8>,
    pub row_stride: usize,
    pub k_stride: usize,
    pub scales: &'a CudaSlice<f32>,
    pub scale_kb: usize,
    pub scale_row: usize,
    pub scale_div: usize,
}

impl Fp8Operand<'_> {
    /// Ok when every code and scale the kernel reads for `rows` rows and `k` lies inside the
    /// buffers (the kernel does not bound-check).
    fn check(&self, kn: &'static str, what: &str, rows: usize, k: usize) -> Result<(), GpuError> {
        let last_code = (rows - 1) * self.row_stride + (k - 1) * self.k_stride;
        let kbs = k.div_ceil(TILE);
        let last_scale = (kbs - 1) * self.scale_kb + ((rows - 1) / self.scale_div) * self.scale_row;
        if last_code >= self.codes.len() || last_scale >= self.scales.len() || self.scale_div == 0 {
            let why = format!(
                "{what}: reads code {last_code} of {} and scale {last_scale} of {}",
                self.codes.len(),
                self.scales.len()
            );
            return Err(super::shape_err(kn, why));
        }
        Ok(())
    }
}

impl Gpu {
    /// out[m, n] = Σ_kb (Σ_{k ∈ kb} A(i, k)·B(j, k)) · sa(kb, i) · sb(kb, j): the FP8 GEMM with
    /// promotion per 128 of K (`fp8_gemm.cu`), its orientation given by the operands' strides.
    pub fn fp8_gemm_promoted(
        &self,
        out: &mut CudaSlice<f32>,
        (m, n, k): (usize, usize, usize),
        a: &Fp8Operand<'_>,
        b: &Fp8Operand<'_>,
    ) -> Result<(), GpuError> {
        let kn = "fp8_gemm_promoted";
        check_len(kn, "out", out.len(), m * n)?;
        if m * n == 0 {
            return Ok(());
        }
        if k == 0 {
            return Err(super::shape_err(kn, "K = 0"));
        }
        a.check(kn, "A", m, k)?;
        b.check(kn, "B", n, k)?;
        let l = |what: &str, v: usize| super::long(kn, what, v);
        let (mi, ni, ki) = (int(kn, "m", m)?, int(kn, "n", n)?, int(kn, "k", k)?);
        let (a_i, a_k, sa_kb, sa_i) = (
            l("a_i", a.row_stride)?,
            l("a_k", a.k_stride)?,
            l("sa_kb", a.scale_kb)?,
            l("sa_i", a.scale_row)?,
        );
        let (b_j, b_k, sb_kb, sb_j) = (
            l("b_j", b.row_stride)?,
            l("b_k", b.k_stride)?,
            l("sb_kb", b.scale_kb)?,
            l("sb_j", b.scale_row)?,
        );
        let (sa_div, sb_div) = (
            int(kn, "sa_div", a.scale_div)?,
            int(kn, "sb_div", b.scale_div)?,
        );
        let mut bld = self.stream.launch_builder(self.function(kn)?);
        bld.arg(out).arg(&mi).arg(&ni).arg(&ki);
        bld.arg(a.codes)
            .arg(&a_i)
            .arg(&a_k)
            .arg(a.scales)
            .arg(&sa_kb)
            .arg(&sa_i)
            .arg(&sa_div);
        bld.arg(b.codes)
            .arg(&b_j)
            .arg(&b_k)
            .arg(b.scales)
            .arg(&sb_kb)
            .arg(&sb_j)
            .arg(&sb_div);
        // SAFETY: the argument list is fp8_gemm_promoted's; every code and scale index the kernel
        // forms lies inside its buffer (checked by `Fp8Operand::check`); grid-stride over m·n.
        unsafe { bld.launch(grid_stride(m * n)) }?;
        Ok(())
    }
}

impl Gpu {
    /// Every problem of `fields` (`fp8::grouped::FIELDS` each, addresses already device
    /// addresses) over the tiles `tiles` (`fp8::grouped::tiles`) in one launch of
    /// `fp8_grouped_gemm`: one block of 128 threads per tile. The kernel does not bound-check:
    /// the caller checks every problem's `extents` against its buffers.
    pub fn fp8_grouped_gemm(&self, fields: &[i64], tiles: &[i32]) -> Result<(), GpuError> {
        let kn = "fp8_grouped_gemm";
        if tiles.is_empty() {
            return Ok(());
        }
        let fields_len = crate::fp8::grouped::FIELDS;
        if !fields.len().is_multiple_of(fields_len) || !tiles.len().is_multiple_of(3) {
            return Err(super::shape_err(kn, "a partial problem or tile"));
        }
        let problems = (fields.len() / fields_len) as i32;
        if tiles.chunks(3).any(|t| t[0] < 0 || t[0] >= problems) {
            return Err(super::shape_err(kn, "a tile of no problem"));
        }
        let blocks = grid_dim(kn, tiles.len() / 3, GRID_X_MAX)?;
        let (p, t) = (self.upload(fields)?, self.upload(tiles)?);
        let mut bld = self.stream.launch_builder(self.function(kn)?);
        bld.arg(&p).arg(&t);
        // SAFETY: the argument list is fp8_grouped_gemm's; every tile names a problem, and every
        // address a problem holds lies, with all it reads and writes, inside a live buffer (the
        // caller's check); the uploaded lists are freed stream-ordered after the kernel.
        unsafe { bld.launch(config((blocks, 1), 128)) }?;
        Ok(())
    }
}
