//! The model's output end on a `Backend`: final norm, head and main cross-entropy, and the MTP
//! depths (shared embedding and head), forward and backward in the CPU model's order
//! (`model::deepseek::Tail`).

use super::super::backend::{Backend, BackendResult};
use super::layers::{
    BlockSt, Ctx, NormSt, Positions, block_backward, block_forward, embedding_backward,
    linear_backward, linear_forward, norm_backward, norm_forward,
};
use crate::model::config::ModelConfig;
use crate::model::deepseek::{Batch, Tail, TailStats};
use crate::model::layers::Rows;
use crate::model::params::ParamId;

struct MtpSt<B: Backend> {
    ids: B::Ids,
    host_ids: Vec<u32>,
    targets: B::Ids,
    en: NormSt<B>,
    hn: NormSt<B>,
    cat: B::Buf,
    block: BlockSt<B>,
    pos: Positions<B>,
    z_norm: NormSt<B>,
    z: B::Buf,
    logits: B::Buf,
    len: usize,
}

/// The tail's activations.
pub(crate) struct TailSt<B: Backend> {
    targets: B::Ids,
    norm: NormSt<B>,
    hn: B::Buf,
    logits: B::Buf,
    mtp: Vec<MtpSt<B>>,
    mtp_weight: f32,
}

/// Main loss and, with λ > 0, the MTP depths, from the last block's output `h_final`.
pub(crate) fn tail_forward<B: Backend>(
    c: &Ctx<'_, B>,
    tail: &Tail,
    embed: ParamId,
    cfg: &ModelConfig,
    batch: &Batch,
    h_final: B::Buf,
    mtp_weight: f32,
) -> BackendResult<(TailSt<B>, TailStats)> {
    let b = c.b;
    let (bsz, t) = (batch.batch, batch.seq);
    let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let n = bsz * t;
    let mut stats = TailStats::default();
    let targets = b.ids(&batch.targets, vocab)?;
    let (hn, norm) = norm_forward(c, &tail.norm, h_final)?;
    let logits = linear_forward(c, &tail.head, &hn)?;
    stats.loss = b.cross_entropy_forward(&logits, &targets, vocab)? / n as f64;
    let depth = tail.mtp.len() as f32;
    let mut mtp: Vec<MtpSt<B>> = Vec::new();
    if mtp_weight > 0.0 {
        for (k0, m) in tail.mtp.iter().enumerate() {
            let k = k0 + 1;
            let len = t.saturating_sub(k);
            if len == 0 {
                break;
            }
            let (prev, prev_len) = match mtp.last() {
                Some(st) => (st.block_out(), st.len),
                None => (&norm.x, t),
            };
            let mut h_rows = b.zeros(bsz * len * d)?;
            let mut mids = Vec::with_capacity(bsz * len);
            let mut mtargets = Vec::with_capacity(bsz * len);
            for bi in 0..bsz {
                let r = b.rows(prev, bi * prev_len, bi * prev_len + len, d)?;
                b.put_rows(&mut h_rows, bi * len, &r, d, false)?;
                mids.extend_from_slice(&batch.inputs[bi * t + k..bi * t + k + len]);
                mtargets.extend_from_slice(&batch.targets[bi * t + k..bi * t + k + len]);
            }
            let ids = b.ids(&mids, vocab)?;
            let mtargets = b.ids(&mtargets, vocab)?;
            let e = b.embedding_forward(&ids, &c.p[embed.0], d)?;
            let (en, en_st) = norm_forward(c, &m.enorm, e)?;
            let (hnn, hn_st) = norm_forward(c, &m.hnorm, h_rows)?;
            let mut cat = b.zeros(bsz * len * 2 * d)?;
            b.copy_cols(&mut cat, 2 * d, 0, &en, d, 0, d, false)?;
            b.copy_cols(&mut cat, 2 * d, d, &hnn, d, 0, d, false)?;
            let hp = linear_forward(c, &m.eh_proj, &cat)?;
            let mrows = Rows {
                batch: bsz,
                seq: len,
            };
            let pos = Positions::new(b, mrows, m.block.attn.heads)?;
            let layer = cfg.num_hidden_layers + k0;
            let (hout, bst, ms) = block_forward(c, &m.block, hp, mrows, &pos, layer)?;
            let (z, z_st) = norm_forward(c, &m.head_norm, hout)?;
            let mlogits = linear_forward(c, &tail.head, &z)?;
            let sum = b.cross_entropy_forward(&mlogits, &mtargets, vocab)?;
            // the depth's balance loss, read once its cross-entropy has waited for the device
            if let Some(ms) = ms {
                let ms = ms.read(b)?;
                stats.balance.push(ms.balance_loss);
                stats.loads.push(ms.loads);
            }
            stats.mtp_loss += sum / (bsz * len) as f64 / depth as f64;
            stats.mtp_objective += mtp_weight as f64 / depth as f64 * sum / n as f64;
            mtp.push(MtpSt {
                ids,
                host_ids: mids,
                targets: mtargets,
                en: en_st,
                hn: hn_st,
                cat,
                block: bst,
                pos,
                z_norm: z_st,
                z,
                logits: mlogits,
                len,
            });
        }
    }
    let st = TailSt {
        targets,
        norm,
        hn,
        logits,
        mtp,
        mtp_weight,
    };
    Ok((st, stats))
}

impl<B: Backend> MtpSt<B> {
    /// The depth's block output (the head norm's input), which the next depth reads.
    fn block_out(&self) -> &B::Buf {
        &self.z_norm.x
    }
}

/// The gradient of `h_final` from the main and MTP losses; every tail weight gradient added.
pub(crate) fn tail_backward<B: Backend>(
    c: &mut Ctx<'_, B>,
    tail: &Tail,
    embed: ParamId,
    cfg: &ModelConfig,
    st: TailSt<B>,
    rows: Rows,
) -> BackendResult<B::Buf> {
    let b = c.b;
    let (bsz, n) = (rows.batch, rows.n());
    let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let dlogits = b.cross_entropy_backward_input(&st.logits, &st.targets, vocab, 1.0 / n as f32)?;
    drop(st.logits);
    let mut dhn = b.zeros(n * d)?;
    linear_backward(c, &tail.head, &dlogits, &st.hn, &mut dhn, false)?;
    drop(dlogits);
    let mut dx = b.zeros(n * d)?;
    norm_backward(c, &tail.norm, &dhn, &st.norm, &mut dx, false)?;
    // deepest depth first; each adds into the gradient of the hidden it read
    let depth = tail.mtp.len() as f32;
    let mut dnext: Option<B::Buf> = None;
    for (k0, ms) in st.mtp.into_iter().enumerate().rev() {
        let m = &tail.mtp[k0];
        let len = ms.len;
        let prev_len = len + 1;
        let scale = st.mtp_weight / depth / n as f32;
        let dl = b.cross_entropy_backward_input(&ms.logits, &ms.targets, vocab, scale)?;
        let mut dz = b.zeros(bsz * len * d)?;
        linear_backward(c, &tail.head, &dl, &ms.z, &mut dz, false)?;
        let mut dhout = match dnext.take() {
            Some(g) => g,
            None => b.zeros(bsz * len * d)?,
        };
        norm_backward(c, &m.head_norm, &dz, &ms.z_norm, &mut dhout, true)?;
        let mrows = Rows {
            batch: bsz,
            seq: len,
        };
        let layer = cfg.num_hidden_layers + k0;
        let dhp = block_backward(c, &m.block, dhout, ms.block, mrows, &ms.pos, layer)?;
        let mut dcat = b.zeros(bsz * len * 2 * d)?;
        linear_backward(c, &m.eh_proj, &dhp, &ms.cat, &mut dcat, false)?;
        let mut den = b.zeros(bsz * len * d)?;
        let mut dhnn = b.zeros(bsz * len * d)?;
        b.copy_cols(&mut den, d, 0, &dcat, 2 * d, 0, d, false)?;
        b.copy_cols(&mut dhnn, d, 0, &dcat, 2 * d, d, d, false)?;
        let mut de = b.zeros(bsz * len * d)?;
        norm_backward(c, &m.enorm, &den, &ms.en, &mut de, false)?;
        embedding_backward(c, embed, &ms.ids, &ms.host_ids, &de, d)?;
        let mut dh_rows = b.zeros(bsz * len * d)?;
        norm_backward(c, &m.hnorm, &dhnn, &ms.hn, &mut dh_rows, false)?;
        // scatter into the previous hidden [bsz, prev_len, d]
        let target: &mut B::Buf = if k0 == 0 {
            &mut dx
        } else {
            if dnext.is_none() {
                dnext = Some(b.zeros(bsz * prev_len * d)?);
            }
            dnext.as_mut().expect("just set")
        };
        for bi in 0..bsz {
            let r = b.rows(&dh_rows, bi * len, (bi + 1) * len, d)?;
            b.put_rows(target, bi * prev_len, &r, d, true)?;
        }
    }
    Ok(dx)
}
