//! The routed experts' Linears as grouped GEMMs: the dispatched rows of a MoE layer are sorted by
//! expert, expert `e` owning rows `offsets[e]..offsets[e + 1]`, and one call multiplies every
//! expert's rows by its own weight (`W_e`, a parameter by id). The per-segment loops here are the
//! reference (each segment exactly the Linear op the expert's SwiGLU would run, so the CPU
//! backend gives the CPU model's bits); a device overrides the `Backend::grouped_*` methods with
//! one library call (CUDA: `cublasGemmGroupedBatchedEx`) and falls back to these.

use super::{Backend, BackendResult, GemmPrecision};

/// How the experts' Linears multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertGemm {
    /// `linear_*` in this precision.
    Plain(GemmPrecision),
    /// `fp8_linear_*`: DeepSeek-V3's FP8 recipe.
    Fp8,
}

/// The non-empty segments of `offsets`: (index, lo, hi).
pub fn segments(offsets: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    offsets
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(e, w)| (e, w[0], w[1]))
}

/// y[rows, dout]: segment e of x[rows, din] times `params[ids[e]]`ᵀ.
#[allow(clippy::too_many_arguments)]
pub fn forward_per_segment<B: Backend>(
    b: &B,
    x: &B::Buf,
    params: &[B::Buf],
    ids: &[usize],
    offsets: &[usize],
    din: usize,
    dout: usize,
    kind: ExpertGemm,
) -> BackendResult<B::Buf> {
    let mut y = b.zeros(offsets.last().copied().unwrap_or(0) * dout)?;
    for (e, lo, hi) in segments(offsets) {
        let xi = b.rows(x, lo, hi, din)?;
        let w = &params[ids[e]];
        let yi = match kind {
            ExpertGemm::Plain(p) => b.linear_forward(&xi, w, hi - lo, din, dout, p)?,
            ExpertGemm::Fp8 => b.fp8_linear_forward(&xi, w, hi - lo, din, dout)?,
        };
        b.put_rows(&mut y, lo, &yi, dout, false)?;
    }
    Ok(y)
}

/// dx[rows, din] (+)= segment e of dy[rows, dout] times `params[ids[e]]`.
#[allow(clippy::too_many_arguments)]
pub fn backward_input_per_segment<B: Backend>(
    b: &B,
    dx: &mut B::Buf,
    dy: &B::Buf,
    params: &[B::Buf],
    ids: &[usize],
    offsets: &[usize],
    din: usize,
    dout: usize,
    acc: bool,
    kind: ExpertGemm,
) -> BackendResult<()> {
    for (e, lo, hi) in segments(offsets) {
        let dyi = b.rows(dy, lo, hi, dout)?;
        let w = &params[ids[e]];
        let n = hi - lo;
        let dxi = match kind {
            ExpertGemm::Plain(p) => {
                let mut dxi = if acc {
                    b.rows(dx, lo, hi, din)?
                } else {
                    b.zeros(n * din)?
                };
                b.linear_backward_input(&mut dxi, &dyi, w, n, din, dout, acc, p)?;
                dxi
            }
            ExpertGemm::Fp8 => {
                let g = b.fp8_linear_backward_input(&dyi, w, n, din, dout)?;
                if acc {
                    let mut dxi = b.rows(dx, lo, hi, din)?;
                    b.add_into(&mut dxi, &g)?;
                    dxi
                } else {
                    g
                }
            }
        };
        b.put_rows(dx, lo, &dxi, din, false)?;
    }
    Ok(())
}

/// grads[ids[e]] += (segment e of dy)ᵀ · (segment e of x).
#[allow(clippy::too_many_arguments)]
pub fn backward_weight_per_segment<B: Backend>(
    b: &B,
    grads: &mut [B::Buf],
    ids: &[usize],
    dy: &B::Buf,
    x: &B::Buf,
    offsets: &[usize],
    din: usize,
    dout: usize,
    kind: ExpertGemm,
) -> BackendResult<()> {
    for (e, lo, hi) in segments(offsets) {
        let dyi = b.rows(dy, lo, hi, dout)?;
        let xi = b.rows(x, lo, hi, din)?;
        let g = &mut grads[ids[e]];
        match kind {
            ExpertGemm::Plain(p) => {
                b.linear_backward_weight(g, &dyi, &xi, hi - lo, din, dout, p)?
            }
            ExpertGemm::Fp8 => b.fp8_linear_backward_weight(g, &dyi, &xi, hi - lo, din, dout)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::backend::Cpu;

    #[test]
    fn segments_skip_empty_experts() {
        let s: Vec<_> = segments(&[0, 3, 3, 4, 4]).collect();
        assert_eq!(s, vec![(0, 0, 3), (2, 3, 4)]);
        assert_eq!(segments(&[0]).count(), 0);
    }

    #[test]
    fn each_segment_uses_its_experts_weight() {
        // 2 experts (ids reversed), 1 → 1 features: y = x · w_e on each segment
        let params = vec![vec![2.0f32], vec![10.0f32]];
        let x = vec![1.0f32, 2.0, 3.0];
        let kind = ExpertGemm::Plain(GemmPrecision::F32);
        let y =
            forward_per_segment(&Cpu::new(), &x, &params, &[1, 0], &[0, 2, 3], 1, 1, kind).unwrap();
        assert_eq!(y, vec![10.0, 20.0, 6.0]);
        let mut grads = vec![vec![0.0f32], vec![0.0f32]];
        backward_weight_per_segment(
            &Cpu::new(),
            &mut grads,
            &[1, 0],
            &y,
            &x,
            &[0, 2, 3],
            1,
            1,
            kind,
        )
        .unwrap();
        assert_eq!(grads, vec![vec![18.0], vec![50.0]]);
    }
}
