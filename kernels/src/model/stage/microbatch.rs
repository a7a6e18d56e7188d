//! Micro-batches of one step: splitting a batch, the single-process reference that sums their
//! gradients per half in order, the reduce that adds stage copies' half sums the same way (so a
//! pipelined step equals it bit for bit), and their stats combined.

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

/// Everything one stage copy hands to the reduce: its stage and its gradient sums.
pub struct StageGrads<'a> {
    pub stage: &'a Stage,
    pub sums: GradSums,
}

/// The whole-model gradients of a step from its stage copies' sums: per model stage, what
/// [`reduce_stage`] makes of them; a tensor no stage reduced is zero. Every micro-batch must have
/// run its W exactly once per model stage (DualPipe's two copies of a stage each bring one half).
pub fn reduce(
    full: &ParamStore,
    mut parts: Vec<StageGrads<'_>>,
    microbatches: usize,
) -> Result<Vec<Tensor>, String> {
    let stages = parts.first().map_or(0, |p| p.stage.count);
    let mut out: Vec<Option<Tensor>> = (0..full.len()).map(|_| None).collect();
    for s in 0..stages {
        for (g, t) in reduce_stage(full, s, &mut parts, microbatches)? {
            if out[g].replace(t).is_some() {
                return Err(format!("tensor {} reduced by two stages", full.names[g]));
            }
        }
    }
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| Tensor::zeros(&full.tensors[i].shape)))
        .collect())
}

/// The gradients of the tensors model stage `target` owns, from `parts`: per tensor, the first
/// half's sum (moved out of the stage's copy, not copied) plus the second half's. A shared tensor
/// belongs to the lowest stage holding it (stage 0's embedding); its jobs run here, per half into
/// one zeroed buffer: micro-batches in order, within one the stages in descending order (see the
/// module docs), taken from every part that holds some. `parts` must hold `target`'s copies and
/// every copy with jobs on a shared tensor it owns; what it takes is gone from them. Returns
/// (whole-model id, gradient) in ascending id order.
pub fn reduce_stage(
    full: &ParamStore,
    target: usize,
    parts: &mut [StageGrads<'_>],
    microbatches: usize,
) -> Result<BTreeMap<usize, Tensor>, String> {
    for p in parts.iter() {
        if let Some(mb) = p.sums.waiting().next() {
            return Err(format!(
                "stage {}: the W of micro-batch {mb} still waits for an earlier one",
                p.stage.index
            ));
        }
    }
    // descending stage order, for the shared tensors' jobs
    parts.sort_by_key(|p| std::cmp::Reverse(p.stage.index));
    let mut out: BTreeMap<usize, Option<Tensor>> = BTreeMap::new();
    let mut shared: Vec<usize> = Vec::new();
    for p in parts.iter().filter(|p| p.stage.index == target) {
        for (local, &s) in p.stage.shared.iter().enumerate() {
            let g = p.stage.global[local].0;
            if s && target == 0 && !shared.contains(&g) {
                shared.push(g);
            }
        }
    }
    shared.sort_unstable();
    for h in 0..2 {
        let range = half_range(h, microbatches);
        if range.is_empty() {
            continue;
        }
        let mut found = parts
            .iter_mut()
            .filter(|p| p.stage.index == target && p.sums.halves[h].is_some());
        let Some(p) = found.next() else {
            return Err(format!(
                "micro-batches {range:?} have no gradients from stage {target}"
            ));
        };
        let next = p.sums.halves[h].as_ref().map_or(0, |x| x.next);
        let half = p.sums.halves[h].take().expect("checked above");
        let stage = p.stage;
        if found.next().is_some() {
            return Err(format!(
                "micro-batches {range:?} of stage {target} reduced twice"
            ));
        }
        if next != range.end {
            return Err(format!(
                "stage {target} ran W of micro-batches {range:?} only up to {next}"
            ));
        }
        for (local, t) in half.sums.into_iter().enumerate() {
            if stage.shared[local] {
                continue;
            }
            let g = stage.global[local].0;
            fold_half(out.entry(g).or_default(), t, h, &full.names[g])?;
        }
        for &g in &shared {
            let mut buf = Tensor::zeros(&full.tensors[g].shape);
            for mb in range.clone() {
                for p in parts.iter_mut() {
                    let Some(jobs) = p.sums.shared.remove(&mb) else {
                        continue;
                    };
                    let mut rest = Vec::new();
                    for job in jobs {
                        if p.stage.global[job.param().0].0 == g {
                            job.run_into(&p.stage.params, &mut buf.data);
                        } else {
                            rest.push(job);
                        }
                    }
                    if !rest.is_empty() {
                        p.sums.shared.insert(mb, rest);
                    }
                }
            }
            fold_half(out.entry(g).or_default(), buf, h, &full.names[g])?;
        }
    }
    out.into_iter()
        .map(|(g, t)| {
            t.map(|t| (g, t))
                .ok_or_else(|| format!("tensor {} has no gradient", full.names[g]))
        })
        .collect()
}

/// Puts half `h`'s sum of one tensor into the step's gradient: the first half's moves in, the
/// second half's is added.
fn fold_half(slot: &mut Option<Tensor>, t: Tensor, h: usize, name: &str) -> Result<(), String> {
    match (h, slot.as_mut()) {
        (0, None) => *slot = Some(t),
        (0, Some(_)) => return Err(format!("tensor {name} reduced by two stages")),
        (_, Some(dst)) => add_into(&mut dst.data, &t.data),
        (_, None) => return Err(format!("tensor {name} has gradients of one half only")),
    }
    Ok(())
}

/// The single-process reference of a pipelined step: micro-batches in order, each with
/// `forward_backward` running its W jobs straight into the sum of its half (the first half into
/// `grads`, zero on entry; the second into a zeroed buffer added at the end). Returns each
/// micro-batch's stats.
pub fn forward_backward_microbatches(
    model: &DeepSeekV3,
    batches: &[Batch],
    mtp_weight: f32,
    grads: &mut [Tensor],
) -> Vec<StepStats> {
    let mid = batches.len().div_ceil(2);
    let mut out = Vec::with_capacity(batches.len());
    let mut second: Option<Vec<Tensor>> = None;
    for (i, b) in batches.iter().enumerate() {
        if i < mid {
            out.push(model.forward_backward(b, mtp_weight, grads));
        } else {
            let s = second.get_or_insert_with(|| model.params.zeros_like());
            out.push(model.forward_backward(b, mtp_weight, s));
        }
    }
    if let Some(s) = second {
        for (dst, src) in grads.iter_mut().zip(&s) {
            add_into(&mut dst.data, &src.data);
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
