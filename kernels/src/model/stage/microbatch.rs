//! Micro-batches of one step: splitting a batch, the single-process reference that sums their
//! gradients in order, the reduce that sums stage copies' per-micro-batch gradients in the same
//! order (so a pipelined step equals it bit for bit), and their stats combined.

use super::*;

/// Adds `src` into `dst` elementwise (the one accumulation both reduce paths use).
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    for (a, b) in dst.iter_mut().zip(src) {
        *a += b;
    }
}

/// Multiplies every gradient by 1/`microbatches` (the step's objective is the mean over its
/// micro-batches); no-op for one micro-batch.
pub fn scale_for_microbatches(grads: &mut [Tensor], microbatches: usize) {
    if microbatches > 1 {
        let f = 1.0 / microbatches as f32;
        grads
            .iter_mut()
            .for_each(|g| g.data.iter_mut().for_each(|v| *v *= f));
    }
}

/// Everything one stage copy hands to the reduce: its stage and its per-micro-batch gradients.
pub struct StageGrads<'a> {
    pub stage: &'a Stage,
    pub grads: BTreeMap<usize, MbGrads>,
}

/// Sums per-micro-batch stage gradients into whole-model `grads` (zero on entry): micro-batches
/// in order `0..microbatches`; within one, each tensor's buffer from the highest stage holding it,
/// then the deferred jobs of lower stages in descending stage order (see the module docs).
/// Every micro-batch must be present exactly once per model stage (DualPipe's two copies of a
/// stage each bring their own micro-batches; together they bring all of them once).
pub fn reduce(
    grads: &mut [Tensor],
    full: &ParamStore,
    parts: Vec<StageGrads<'_>>,
    microbatches: usize,
) -> Result<(), String> {
    let stages = parts.first().map_or(0, |p| p.stage.count);
    // per micro-batch, per model stage: (stage, grads)
    let mut by_mb: Vec<Vec<Option<(&Stage, MbGrads)>>> = (0..microbatches)
        .map(|_| (0..stages).map(|_| None).collect())
        .collect();
    for part in parts {
        for (mb, g) in part.grads {
            let slot = by_mb.get_mut(mb).ok_or_else(|| {
                format!(
                    "stage {} has gradients of micro-batch {mb} of {microbatches}",
                    part.stage.index
                )
            })?;
            if slot[part.stage.index].is_some() {
                return Err(format!(
                    "micro-batch {mb} of stage {} reduced twice",
                    part.stage.index
                ));
            }
            slot[part.stage.index] = Some((part.stage, g));
        }
    }
    let mut seen = vec![false; full.len()];
    for (mb, row) in by_mb.into_iter().enumerate() {
        seen.iter_mut().for_each(|s| *s = false);
        let mut deferred: Vec<WeightGrad> = Vec::new();
        let mut mb_bufs: Vec<Option<Tensor>> = (0..full.len()).map(|_| None).collect();
        for (s, cell) in row.into_iter().enumerate().rev() {
            let (stage, g) =
                cell.ok_or_else(|| format!("micro-batch {mb} has no gradients from stage {s}"))?;
            let MbGrads {
                dense,
                deferred: jobs,
            } = g;
            for (local, t) in dense.into_iter().enumerate() {
                if stage.deferred[local] {
                    continue;
                }
                let gid = stage.global[local];
                if seen[gid.0] {
                    return Err(format!(
                        "tensor {} reduced by two stages",
                        full.names[gid.0]
                    ));
                }
                seen[gid.0] = true;
                mb_bufs[gid.0] = Some(t);
            }
            let f = |id: ParamId| stage.global[id.0];
            deferred.extend(jobs.iter().map(|j| remap_job(j, &f)));
        }
        for (i, b) in mb_bufs.iter_mut().enumerate() {
            if b.is_none() {
                *b = Some(Tensor::zeros(&full.tensors[i].shape));
            }
        }
        let mut bufs: Vec<Tensor> = mb_bufs
            .into_iter()
            .map(|b| b.expect("filled above"))
            .collect();
        WeightGradQueue { jobs: deferred }.run(full, &mut bufs);
        for (dst, src) in grads.iter_mut().zip(bufs) {
            if mb == 0 {
                dst.data.copy_from_slice(&src.data);
            } else {
                add_into(&mut dst.data, &src.data);
            }
        }
    }
    Ok(())
}

/// The single-process reference of a pipelined step: micro-batches one at a time in order, each
/// with `forward_backward` into zero-initialised gradients, summed in micro-batch order into
/// `grads` (zero on entry). Returns each micro-batch's stats.
pub fn forward_backward_microbatches(
    model: &DeepSeekV3,
    batches: &[Batch],
    mtp_weight: f32,
    grads: &mut [Tensor],
) -> Vec<StepStats> {
    let mut out = Vec::with_capacity(batches.len());
    let mut scratch: Option<Vec<Tensor>> = None;
    for (i, b) in batches.iter().enumerate() {
        if i == 0 {
            out.push(model.forward_backward(b, mtp_weight, grads));
        } else {
            let s = scratch.get_or_insert_with(|| model.params.zeros_like());
            s.iter_mut().for_each(|t| t.zero_());
            out.push(model.forward_backward(b, mtp_weight, s));
            for (dst, src) in grads.iter_mut().zip(s.iter()) {
                add_into(&mut dst.data, &src.data);
            }
        }
    }
    out
}

/// Splits a batch of sequences into `m` micro-batches of `batch / m` sequences each, in order.
pub fn split_batch(batch: &Batch, m: usize) -> Result<Vec<Batch>, String> {
    if m == 0 || !batch.batch.is_multiple_of(m) {
        return Err(format!(
            "a batch of {} sequences does not split into {m} equal micro-batches",
            batch.batch
        ));
    }
    let per = batch.batch / m;
    let len = per * batch.seq;
    Ok((0..m)
        .map(|i| Batch {
            batch: per,
            seq: batch.seq,
            inputs: batch.inputs[i * len..(i + 1) * len].to_vec(),
            targets: batch.targets[i * len..(i + 1) * len].to_vec(),
        })
        .collect())
}

/// The stats of a step from its micro-batches' stats, in micro-batch order: losses are means,
/// loads are sums. One micro-batch's stats are returned unchanged.
pub fn combine_microbatch_stats(mut per: Vec<StepStats>) -> StepStats {
    if per.len() == 1 {
        return per.pop().expect("one");
    }
    let m = per.len() as f64;
    let mut s = StepStats::default();
    for p in &per {
        s.loss += p.loss;
        s.mtp_loss += p.mtp_loss;
        s.balance_loss += p.balance_loss;
        s.objective += p.objective;
        if s.loads.is_empty() {
            s.loads = p.loads.clone();
        } else {
            for (a, b) in s.loads.iter_mut().zip(&p.loads) {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            }
        }
    }
    s.loss /= m;
    s.mtp_loss /= m;
    s.balance_loss /= m;
    s.objective /= m;
    s
}
