//! The whole DeepSeek-V3 training step on a `Backend` (issue 12): `DeviceModel` holds the
//! parameters, gradients and AdamW moments on the device and runs forward, split backward
//! (every weight gradient added as soon as its layer's input gradient is done), the clipped
//! global norm and AdamW, and the auxiliary-loss-free bias update. It is written once; on the CPU
//! backend it reproduces `DeepSeekV3::forward_backward` and `TrainState::apply` bit for bit
//! (`kernels/tests/device_model.rs`), which is what makes the CUDA backend's step checkable:
//! each primitive there is compared with its CPU twin, and the composition is this file's.
//!
//! Precisions: f32; BF16 mixed precision (`set_gemm_precision`); and a model whose Linears are
//! FP8 (`DeepSeekV3::set_precision(Fp8)`) runs DeepSeek-V3's FP8 recipe as the CPU model does
//! (1×128 / 128×128 E4M3, promotion per 128 of K, Wgrad on the requantised input), with BF16
//! moments when the optimizer asks. The FP8 input a Linear keeps for Wgrad is recomputed from its
//! f32 input (the same bits as the CPU's cached codes; the memory saving is not taken).

pub mod experts;
mod layers;
mod remote;
pub mod stage;
mod tail;
mod weight;

use super::backend::{
    AdamJob, Backend, BackendError, BackendResult, GemmPrecision, MomentsMut, WeightsHeld,
};
use super::profile::{self, StepProfile, span};
use crate::model::deepseek::{Batch, DeepSeekV3, StepStats};
use crate::model::layers::Rows;
use crate::ops::adamw::{self, AdamW, Moments};
use crate::ops::balance;
use crate::tensor::Tensor;
use half::bf16;
use layers::{
    Ctx, Positions, block_backward, block_forward, check_batch, embedding_backward, ensure_table,
    upload_params,
};

/// A DeepSeek-V3 whose parameters, gradients and moments live on backend `B`.
pub struct DeviceModel<B: Backend> {
    pub backend: B,
    /// The layer structure (configuration, parameter names, shapes, flags); its tensors hold no
    /// data on the host (the device does: [`DeviceModel::to_host`] copies it back).
    pub model: DeepSeekV3,
    params: Vec<B::Buf>,
    grads: Vec<B::Buf>,
    /// (m, v) of every trainable tensor, created at the first update.
    moments: Vec<Option<DeviceMoments<B>>>,
    host_bias: Vec<Vec<f32>>,
    table: Option<(usize, B::Table)>,
    /// The precision of the Linear GEMMs (f32 unless [`DeviceModel::set_gemm_precision`]).
    gemm: GemmPrecision,
    /// The regions of the steps since [`DeviceModel::set_profiling`] turned profiling on.
    profile: Option<StepProfile>,
    /// Whether a step holds the weights (`Backend::hold_weights`): each W is rounded to BF16 or
    /// quantised to FP8 once per step, not again for its input gradient or each micro-batch.
    reuse_weights: bool,
}

/// A tensor's AdamW moments on the device: f32, or BF16 (`AdamW::bf16_moments`, the FP8 recipe).
enum DeviceMoments<B: Backend> {
    F32(B::Buf, B::Buf),
    Bf16(B::Half, B::Half),
}

/// `m` with every tensor's data dropped (shapes kept): the device holds the values, and a host
/// copy of a large model is not kept twice.
fn structure_only(mut m: DeepSeekV3) -> DeepSeekV3 {
    m.params
        .tensors
        .iter_mut()
        .for_each(|t| t.data = Vec::new());
    m
}

/// What one optimizer update did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateStats {
    /// The pre-clip global gradient norm.
    pub norm: f64,
    pub clip_factor: f32,
}

impl<B: Backend> DeviceModel<B> {
    /// Uploads every tensor of `model` to `backend`, with zero gradients.
    pub fn new(backend: B, model: DeepSeekV3) -> BackendResult<DeviceModel<B>> {
        let p = &model.params;
        let params = upload_params(&backend, p)?;
        let grads = p
            .tensors
            .iter()
            .map(|t| backend.zeros(t.numel()))
            .collect::<BackendResult<Vec<_>>>()?;
        let mut host_bias = vec![Vec::new(); p.len()];
        for id in model.moe_biases() {
            host_bias[id.0] = p.get(id).to_vec();
        }
        Ok(DeviceModel {
            backend,
            moments: (0..p.len()).map(|_| None).collect(),
            params,
            grads,
            host_bias,
            table: None,
            gemm: GemmPrecision::F32,
            model: structure_only(model),
            profile: None,
            reuse_weights: true,
        })
    }

    /// Replaces every parameter with `model`'s (same structure), zeroes the gradients and drops
    /// the moments: a rollback to an older committed state.
    pub fn replace(&mut self, model: DeepSeekV3) -> BackendResult<()> {
        let fresh = |a: &DeepSeekV3| {
            (
                a.params.names.clone(),
                a.params
                    .tensors
                    .iter()
                    .map(|t| t.shape.clone())
                    .collect::<Vec<_>>(),
            )
        };
        if fresh(&model) != fresh(&self.model) {
            return Err(BackendError("replace: a model of another structure".into()));
        }
        for (dst, t) in self.params.iter_mut().zip(&model.params.tensors) {
            *dst = self.backend.upload(&t.data)?;
        }
        for id in model.moe_biases() {
            self.host_bias[id.0] = model.params.get(id).to_vec();
        }
        self.discard_grads()?;
        self.moments.iter_mut().for_each(|m| *m = None);
        self.model = structure_only(model);
        Ok(())
    }

    /// Sets the precision of every Linear's GEMMs (BF16: mixed precision, f32 master weights).
    pub fn set_gemm_precision(&mut self, p: GemmPrecision) {
        self.gemm = p;
    }

    pub fn gemm_precision(&self) -> GemmPrecision {
        self.gemm
    }

    /// Turns profiling on (a fresh [`StepProfile`]: every region of the following steps and
    /// updates is timed between device synchronisations, which makes them slower) or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(StepProfile::new);
    }

    /// The regions timed since profiling was turned on.
    pub fn profile(&self) -> Option<&StepProfile> {
        self.profile.as_ref()
    }

    /// Whether steps reuse each weight's BF16 rounding or FP8 quantisation within the step (on
    /// by default; the bits are the same either way).
    pub fn set_weight_reuse(&mut self, on: bool) {
        self.reuse_weights = on;
    }

    /// Forward and backward of one step; gradients are added into the device gradient buffers
    /// (`DeepSeekV3::forward_backward`'s contract). λ = `mtp_weight`; 0 skips MTP.
    pub fn forward_backward(&mut self, batch: &Batch, mtp_weight: f32) -> BackendResult<StepStats> {
        let vocab = self.model.cfg.vocab_size;
        check_batch(batch)?;
        let DeviceModel {
            backend,
            model,
            params,
            grads,
            table,
            gemm,
            profile,
            reuse_weights,
            ..
        } = self;
        // no parameter is written until the step returns
        let _held = WeightsHeld::new(&*backend, *reuse_weights);
        let table = ensure_table(&*backend, table, &model.cfg, batch.seq)?;
        let mut c = Ctx {
            b: &*backend,
            p: params,
            g: grads,
            table,
            gemm: *gemm,
            handed: None,
            defer: None,
            remote: None,
            prof: profile.as_ref(),
        };
        let rows = Rows {
            batch: batch.batch,
            seq: batch.seq,
        };
        let heads = model.cfg.num_attention_heads;
        let pos = Positions::new(c.b, rows, heads)?;
        let d = model.cfg.hidden_size;
        let t = span(c.prof, c.b, "forward: embedding")?;
        let ids = c.b.ids(&batch.inputs, vocab)?;
        let mut stats = StepStats::default();
        let mut x = c.b.embedding_forward(&ids, &c.p[model.embed.0], d)?;
        profile::end(t, c.b)?;
        let mut stashes = Vec::with_capacity(model.blocks.len());
        let mut moe_stats = Vec::new();
        for (l, blk) in model.blocks.iter().enumerate() {
            let (y, st, ms) = block_forward(&c, blk, x, rows, &pos, l)?;
            moe_stats.extend(ms);
            stashes.push(st);
            x = y;
        }
        let t = span(c.prof, c.b, "forward: head, loss, mtp")?;
        let (tail_st, ts) = tail::tail_forward(
            &c,
            &model.tail,
            model.embed,
            &model.cfg,
            batch,
            x,
            mtp_weight,
        )?;
        profile::end(t, c.b)?;
        // the balance losses, read once the cross-entropy has waited for the device
        for ms in moe_stats {
            let ms = ms.read(c.b)?;
            stats.balance_loss += ms.balance_loss;
            stats.loads.push(ms.loads);
        }
        stats.loss = ts.loss;
        stats.mtp_loss = ts.mtp_loss;
        for (b, l) in ts.balance.into_iter().zip(ts.loads) {
            stats.balance_loss += b;
            stats.loads.push(l);
        }
        stats.objective = ts.mtp_objective;
        stats.objective += stats.loss + stats.balance_loss;
        let (b, prof) = (c.b, c.prof);
        let t = span(prof, b, "backward: head, loss, mtp")?;
        let mut dx =
            tail::tail_backward(&mut c, &model.tail, model.embed, &model.cfg, tail_st, rows)?;
        profile::end(t, b)?;
        for (l, (blk, st)) in model.blocks.iter().zip(stashes).enumerate().rev() {
            dx = block_backward(&mut c, blk, dx, st, rows, &pos, l)?;
        }
        let t = span(prof, b, "backward: embedding")?;
        embedding_backward(&mut c, model.embed, &ids, &batch.inputs, &dx, d)?;
        profile::end(t, b)?;
        Ok(stats)
    }

    /// A step's batch as micro-batches, as the CPU's `forward_backward_microbatches` and
    /// `scale_for_microbatches` run them: the first half accumulate into the gradients, the
    /// second half into a second set added after, then everything × 1/micro-batches. Returns each
    /// micro-batch's stats.
    pub fn forward_backward_microbatches(
        &mut self,
        batches: &[Batch],
        mtp_weight: f32,
    ) -> BackendResult<Vec<StepStats>> {
        // one hold over every micro-batch: each W is prepared once per step
        let held = self.reuse_weights;
        if held {
            self.backend.hold_weights();
        }
        let r = self.microbatches_held(batches, mtp_weight);
        if held {
            self.backend.release_weights();
        }
        r
    }

    fn microbatches_held(
        &mut self,
        batches: &[Batch],
        mtp_weight: f32,
    ) -> BackendResult<Vec<StepStats>> {
        let mid = batches.len().div_ceil(2);
        let mut out = Vec::with_capacity(batches.len());
        let mut second: Option<Vec<B::Buf>> = None;
        for (i, b) in batches.iter().enumerate() {
            if i < mid {
                out.push(self.forward_backward(b, mtp_weight)?);
                continue;
            }
            let mut s = match second.take() {
                Some(s) => s,
                None => self
                    .params
                    .iter()
                    .map(|p| self.backend.zeros(self.backend.len(p)))
                    .collect::<BackendResult<Vec<_>>>()?,
            };
            std::mem::swap(&mut self.grads, &mut s);
            let r = self.forward_backward(b, mtp_weight);
            std::mem::swap(&mut self.grads, &mut s);
            second = Some(s);
            out.push(r?);
        }
        if let Some(s) = second {
            for (d, s) in self.grads.iter_mut().zip(&s) {
                self.backend.add_into(d, s)?;
            }
        }
        if batches.len() > 1 {
            let f = 1.0 / batches.len() as f32;
            for g in &mut self.grads {
                self.backend.scale(g, f)?;
            }
        }
        Ok(out)
    }

    /// Main-head cross-entropy (mean) of a batch, forward only.
    pub fn eval_loss(&mut self, batch: &Batch) -> BackendResult<f64> {
        check_batch(batch)?;
        let (b, model) = (&self.backend, &self.model);
        let table = ensure_table(b, &mut self.table, &model.cfg, batch.seq)?;
        let c = Ctx::forward_only(b, &self.params, table, self.gemm);
        let rows = Rows {
            batch: batch.batch,
            seq: batch.seq,
        };
        let pos = Positions::new(b, rows, model.cfg.num_attention_heads)?;
        let (d, vocab) = (model.cfg.hidden_size, model.cfg.vocab_size);
        let ids = b.ids(&batch.inputs, vocab)?;
        let mut x = b.embedding_forward(&ids, &c.p[model.embed.0], d)?;
        for (l, blk) in model.blocks.iter().enumerate() {
            x = block_forward(&c, blk, x, rows, &pos, l)?.0;
        }
        let (st, ts) = tail::tail_forward(&c, &model.tail, model.embed, &model.cfg, batch, x, 0.0)?;
        drop(st);
        Ok(ts.loss)
    }

    /// The pre-clip global norm of the trainable tensors' gradients, in tensor order.
    pub fn grad_norm(&self) -> BackendResult<f64> {
        let live: Vec<&B::Buf> = self
            .grads
            .iter()
            .zip(&self.model.params.trainable)
            .filter(|(_, t)| **t)
            .map(|(g, _)| g)
            .collect();
        self.backend.global_norm(&live)
    }

    /// Zeroes every gradient (a step whose update was refused).
    pub fn discard_grads(&mut self) -> BackendResult<()> {
        for g in &mut self.grads {
            self.backend.fill_zero(g)?;
        }
        Ok(())
    }

    /// Clips the accumulated gradients by their global norm `norm`, applies AdamW (f32 moments;
    /// weight decay on matrices) at `lr` as 1-based step `t`, zeroes the gradients and runs the
    /// bias update with γ from the step's expert loads: `TrainState::apply_with_norm` on the
    /// device.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_with_norm(
        &mut self,
        norm: f64,
        opt: &AdamW,
        lr: f32,
        clip: f32,
        gamma: f32,
        loads: &[Vec<u32>],
        t: u64,
    ) -> BackendResult<UpdateStats> {
        let label = "optimizer: clip, adamw, bias update";
        let s = span(self.profile.as_ref(), &self.backend, label)?;
        let b = &self.backend;
        let trainable = &self.model.params.trainable;
        let factor = adamw::clip_factor(norm, clip);
        // each trainable tensor's constants (its moments made first), then every update at once
        let mut consts: Vec<Option<adamw::StepConsts>> = vec![None; trainable.len()];
        for (i, &tr) in trainable.iter().enumerate() {
            if !tr {
                b.fill_zero(&mut self.grads[i])?;
                continue;
            }
            let n = b.len(&self.params[i]);
            // zero moments, in BF16 from the first step of an optimizer with bf16_moments (as
            // `Moments::ensure_bf16` converts the CPU's zeros)
            let fresh = match (&self.moments[i], opt.bf16_moments) {
                (None, false) => Some(DeviceMoments::F32(b.zeros(n)?, b.zeros(n)?)),
                (None, true) => Some(DeviceMoments::Bf16(b.zeros_half(n)?, b.zeros_half(n)?)),
                // f32 moments under an optimizer with bf16_moments: rounded once, as
                // `Moments::ensure_bf16` does
                (Some(DeviceMoments::F32(m, v)), true) => {
                    let half = |x: &B::Buf| -> BackendResult<B::Half> {
                        let bits: Vec<u16> = b
                            .download(x)?
                            .iter()
                            .map(|&y| bf16::from_f32(y).to_bits())
                            .collect();
                        b.upload_half(&bits)
                    };
                    Some(DeviceMoments::Bf16(half(m)?, half(v)?))
                }
                _ => None,
            };
            if let Some(f) = fresh {
                self.moments[i] = Some(f);
            }
            let decay = self.model.params.tensors[i].shape.len() >= 2;
            consts[i] = Some(opt.consts(lr, t, decay));
        }
        let tensors = self.params.iter_mut().zip(&mut self.grads);
        let jobs = tensors
            .zip(&mut self.moments)
            .zip(consts)
            .filter_map(|(((p, g), m), c)| {
                let moments = match m.as_mut()? {
                    DeviceMoments::F32(m, v) => MomentsMut::F32(m, v),
                    DeviceMoments::Bf16(m, v) => MomentsMut::Bf16(m, v),
                };
                Some(AdamJob {
                    p,
                    g,
                    moments,
                    c: c?,
                })
            })
            .collect();
        b.adamw_steps(jobs, factor)?;
        for (id, l) in self.model.moe_biases().into_iter().zip(loads) {
            let bias = &mut self.host_bias[id.0];
            balance::bias_update(bias, l, gamma);
            self.params[id.0] = b.upload(bias)?;
        }
        profile::end(s, b)?;
        Ok(UpdateStats {
            norm,
            clip_factor: factor,
        })
    }

    /// [`DeviceModel::grad_norm`] then [`DeviceModel::apply_with_norm`]: `TrainState::apply`.
    pub fn apply(
        &mut self,
        opt: &AdamW,
        lr: f32,
        clip: f32,
        gamma: f32,
        loads: &[Vec<u32>],
        t: u64,
    ) -> BackendResult<UpdateStats> {
        let s = span(self.profile.as_ref(), &self.backend, "optimizer: grad norm")?;
        let norm = self.grad_norm()?;
        profile::end(s, &self.backend)?;
        self.apply_with_norm(norm, opt, lr, clip, gamma, loads, t)
    }

    /// Installs tensor `i`'s moments (a resumed or rolled-back state's).
    pub fn load_moments(&mut self, i: usize, mo: &Moments) -> BackendResult<()> {
        let n = self.backend.len(&self.params[i]);
        let (m_len, v_len) = match mo {
            Moments::F32 { m, v } => (m.len(), v.len()),
            Moments::Bf16 { m, v } => (m.len(), v.len()),
        };
        if m_len != n || v_len != n {
            return Err(BackendError(format!(
                "moments of {} have {m_len} / {v_len} values, the tensor {n}",
                self.model.params.names[i]
            )));
        }
        let b = &self.backend;
        let bits = |x: &[bf16]| x.iter().map(|y| y.to_bits()).collect::<Vec<u16>>();
        self.moments[i] = Some(match mo {
            Moments::F32 { m, v } => DeviceMoments::F32(b.upload(m)?, b.upload(v)?),
            Moments::Bf16 { m, v } => {
                DeviceMoments::Bf16(b.upload_half(&bits(m))?, b.upload_half(&bits(v))?)
            }
        });
        Ok(())
    }

    /// The gradients as host tensors (shaped like the parameters).
    pub fn grads(&self) -> BackendResult<Vec<Tensor>> {
        self.download_all(&self.grads)
    }

    /// The model with the device's current parameters, on the host.
    pub fn to_host(&self) -> BackendResult<DeepSeekV3> {
        let t = self.download_all(&self.params)?;
        Ok(DeepSeekV3 {
            params: self.model.params.with_tensors(t),
            ..self.model.clone()
        })
    }

    /// Tensor `i`'s moments on the host, once an update made them.
    pub fn moments(&self, i: usize) -> BackendResult<Option<Moments>> {
        let b = &self.backend;
        let half = |x: &B::Half| -> BackendResult<Vec<bf16>> {
            Ok(b.download_half(x)?
                .into_iter()
                .map(bf16::from_bits)
                .collect())
        };
        Ok(match &self.moments[i] {
            None => None,
            Some(DeviceMoments::F32(m, v)) => Some(Moments::F32 {
                m: b.download(m)?,
                v: b.download(v)?,
            }),
            Some(DeviceMoments::Bf16(m, v)) => Some(Moments::Bf16 {
                m: half(m)?,
                v: half(v)?,
            }),
        })
    }

    fn download_all(&self, bufs: &[B::Buf]) -> BackendResult<Vec<Tensor>> {
        bufs.iter()
            .zip(&self.model.params.tensors)
            .map(|(b, t)| Ok(Tensor::from_vec(&t.shape, self.backend.download(b)?)))
            .collect()
    }
}
