//! The weight gradients of the device step as jobs: each layer's backward describes its dW as a
//! [`WeightJob`] on borrowed inputs, which runs at once (the whole-model step) or, when the
//! context defers (a pipeline stage's B*), is kept with device copies of its inputs until the
//! schedule's W runs it: the CPU's `WeightGradQueue` on the device. Jobs run in the order B*
//! made them, so the sums are the same bits either way.

use super::super::backend::{Backend, BackendResult, ExpertGemm, GemmPrecision};
use super::layers::Ctx;
use std::borrow::Borrow;

/// One weight gradient: the op and its inputs (`X` a buffer or a borrowed one, `I` indices).
pub(crate) enum WeightJob<X, I> {
    /// dW[w] += dyᵀ·x in precision `p`; `shape` is (n, din, dout).
    Linear {
        w: usize,
        dy: X,
        x: X,
        shape: (usize, usize, usize),
        p: GemmPrecision,
    },
    /// dW[w] += the FP8 Wgrad of dy and x (requantised from f32, as the CPU's Linear does).
    Fp8Linear {
        w: usize,
        dy: X,
        x: X,
        shape: (usize, usize, usize),
    },
    /// dw[w] += Σ dy ⊙ x·rstd over rows of `d`.
    Norm {
        w: usize,
        dy: X,
        x: X,
        rstd: X,
        d: usize,
    },
    /// Every routed expert's dW of one projection over its segment of the dispatched rows.
    Grouped {
        ids: Vec<usize>,
        dy: X,
        x: X,
        offsets: Vec<usize>,
        din: usize,
        dout: usize,
        kind: ExpertGemm,
    },
    /// dtable[w][ids] += dy over rows of `d`.
    Embedding { w: usize, ids: I, dy: X, d: usize },
    /// dW[w] += g: a gradient computed elsewhere from zero (an expert group's, `remote.rs`).
    Dense { w: usize, g: X },
}

/// A job kept until W: its inputs copied on the device.
pub(crate) type OwedJob<B> = WeightJob<<B as Backend>::Buf, <B as Backend>::Ids>;

impl<X, I> WeightJob<X, I> {
    /// Adds this gradient into `g` (by tensor id).
    pub fn run<B: Backend>(&self, b: &B, g: &mut [B::Buf]) -> BackendResult<()>
    where
        X: Borrow<B::Buf>,
        I: Borrow<B::Ids>,
    {
        match self {
            WeightJob::Linear {
                w,
                dy,
                x,
                shape: (n, din, dout),
                p,
            } => b.linear_backward_weight(&mut g[*w], dy.borrow(), x.borrow(), *n, *din, *dout, *p),
            WeightJob::Fp8Linear {
                w,
                dy,
                x,
                shape: (n, din, dout),
            } => b.fp8_linear_backward_weight(&mut g[*w], dy.borrow(), x.borrow(), *n, *din, *dout),
            WeightJob::Norm { w, dy, x, rstd, d } => {
                b.rmsnorm_backward_weight(&mut g[*w], dy.borrow(), x.borrow(), rstd.borrow(), *d)
            }
            WeightJob::Grouped {
                ids,
                dy,
                x,
                offsets,
                din,
                dout,
                kind,
            } => b.grouped_linear_backward_weight(
                g,
                ids,
                dy.borrow(),
                x.borrow(),
                offsets,
                *din,
                *dout,
                *kind,
            ),
            WeightJob::Embedding { w, ids, dy, d } => {
                b.embedding_backward_weight(&mut g[*w], ids.borrow(), dy.borrow(), *d)
            }
            WeightJob::Dense { w, g: grad } => b.add_into(&mut g[*w], grad.borrow()),
        }
    }

    /// The same job on copies of its inputs, to run later.
    fn owned<B: Backend>(&self, b: &B) -> BackendResult<OwedJob<B>>
    where
        X: Borrow<B::Buf>,
        I: Borrow<B::Ids>,
    {
        let c = |x: &X| b.copy(x.borrow());
        Ok(match self {
            WeightJob::Linear { w, dy, x, shape, p } => WeightJob::Linear {
                w: *w,
                dy: c(dy)?,
                x: c(x)?,
                shape: *shape,
                p: *p,
            },
            WeightJob::Fp8Linear { w, dy, x, shape } => WeightJob::Fp8Linear {
                w: *w,
                dy: c(dy)?,
                x: c(x)?,
                shape: *shape,
            },
            WeightJob::Norm { w, dy, x, rstd, d } => WeightJob::Norm {
                w: *w,
                dy: c(dy)?,
                x: c(x)?,
                rstd: c(rstd)?,
                d: *d,
            },
            WeightJob::Grouped {
                ids,
                dy,
                x,
                offsets,
                din,
                dout,
                kind,
            } => WeightJob::Grouped {
                ids: ids.clone(),
                dy: c(dy)?,
                x: c(x)?,
                offsets: offsets.clone(),
                din: *din,
                dout: *dout,
                kind: *kind,
            },
            WeightJob::Embedding { w, ids, dy, d } => WeightJob::Embedding {
                w: *w,
                ids: b.copy_ids(ids.borrow())?,
                dy: c(dy)?,
                d: *d,
            },
            WeightJob::Dense { w, g } => WeightJob::Dense { w: *w, g: c(g)? },
        })
    }
}

/// The context defers weight gradients (a pipeline stage's B*).
pub(crate) fn defers<B: Backend>(c: &Ctx<'_, B>) -> bool {
    c.defer.is_some()
}

/// Runs `job`, whose inputs it owns already, now, or keeps it as it is for W when the context
/// defers (no copy: a remote expert's gradient uploaded for this job alone).
pub(crate) fn weight_owned<B: Backend>(c: &mut Ctx<'_, B>, job: OwedJob<B>) -> BackendResult<()> {
    match c.defer.as_deref_mut() {
        Some(q) => {
            q.push(job);
            Ok(())
        }
        None => job.run(c.b, c.g),
    }
}

/// Runs `job` into the context's gradients now, or keeps it (copied) for W when it defers.
pub(crate) fn weight<B: Backend>(
    c: &mut Ctx<'_, B>,
    job: WeightJob<&B::Buf, &B::Ids>,
) -> BackendResult<()> {
    match c.defer.as_deref_mut() {
        Some(q) => {
            q.push(job.owned(c.b)?);
            Ok(())
        }
        None => job.run(c.b, c.g),
    }
}
