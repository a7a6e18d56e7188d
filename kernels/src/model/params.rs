//! Named parameter storage in Hugging Face naming, its gradients, and the deferred weight-gradient
//! queue that lets every layer split its backward into input grad (B) and weight grad (W).

use crate::fp8::gemm::fp8_gemm_wgrad;
use crate::fp8::quant::quantize_128x1;
use crate::fp8::{Fp8Tensor, ScaleFormat, ScaleLayout};
use crate::ops::{embedding, linear, rmsnorm};
use crate::rng::Rng;
use crate::tensor::Tensor;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Index of a tensor in a `ParamStore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParamId(pub usize);

/// How a tensor starts out.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f32),
    Ones,
    Zeros,
}

/// Tensors by their id in the whole model, wherever they are kept: a whole-model store, or the
/// new values of some pipeline stages (an install reads each of its tensors from the stage
/// that updated it).
pub trait TensorSource {
    /// The tensor with whole-model id `global` (panics naming it when this source lacks it).
    fn tensor(&self, global: usize) -> &Tensor;
}

impl TensorSource for ParamStore {
    fn tensor(&self, global: usize) -> &Tensor {
        &self.tensors[global]
    }
}

impl TensorSource for BTreeMap<usize, &Tensor> {
    fn tensor(&self, global: usize) -> &Tensor {
        self.get(&global)
            .unwrap_or_else(|| panic!("tensor {global} is missing from the values installed"))
    }
}

/// Every tensor of a model by name. Buffers (the routing bias) live here too, marked not trainable.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor>,
    pub trainable: Vec<bool>,
    index: BTreeMap<String, ParamId>,
}

impl ParamStore {
    /// Adds a tensor; its initial values come from a stream seeded by (seed, name), so they do not
    /// depend on the order tensors are created in.
    pub fn add(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
        trainable: bool,
        seed: u64,
    ) -> ParamId {
        assert!(
            !self.index.contains_key(&name),
            "duplicate parameter {name}"
        );
        let n: usize = shape.iter().product();
        let data = match init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => {
                // element i takes draws 2i and 2i+1 of the (seed, name) stream, whatever the chunk
                const CHUNK: usize = 1 << 16;
                let mut data = vec![0.0f32; n];
                data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
                    let mut rng = Rng::stream(seed, &name);
                    rng.advance(2 * (c * CHUNK) as u64);
                    out.iter_mut().for_each(|v| *v = rng.normal() * std);
                });
                data
            }
        };
        let id = ParamId(self.tensors.len());
        self.index.insert(name.clone(), id);
        self.names.push(name);
        self.tensors.push(Tensor::from_vec(shape, data));
        self.trainable.push(trainable);
        id
    }

    pub fn get(&self, id: ParamId) -> &[f32] {
        &self.tensors[id.0].data
    }

    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Number of trainable values.
    pub fn numel_trainable(&self) -> usize {
        self.tensors
            .iter()
            .zip(&self.trainable)
            .filter(|(_, t)| **t)
            .map(|(x, _)| x.numel())
            .sum()
    }

    /// Ids sorted by name (the canonical order for hashing and checkpoints).
    pub fn ids_by_name(&self) -> impl Iterator<Item = ParamId> + '_ {
        self.index.values().copied()
    }

    /// SHA-256 over every tensor's little-endian f32 bytes, tensors in name order (buffers included).
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        for id in self.ids_by_name() {
            for v in &self.tensors[id.0].data {
                h.update(v.to_le_bytes());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The same names and flags holding `tensors` instead (one per name, same shapes).
    pub fn with_tensors(&self, tensors: Vec<Tensor>) -> ParamStore {
        assert_eq!(
            tensors.len(),
            self.tensors.len(),
            "one tensor per parameter"
        );
        for (i, (a, b)) in tensors.iter().zip(&self.tensors).enumerate() {
            assert_eq!(a.shape, b.shape, "shape of {}", self.names[i]);
        }
        ParamStore {
            names: self.names.clone(),
            tensors,
            trainable: self.trainable.clone(),
            index: self.index.clone(),
        }
    }

    /// Zero-filled gradients shaped like the parameters.
    pub fn zeros_like(&self) -> Vec<Tensor> {
        self.tensors
            .iter()
            .map(|t| Tensor::zeros(&t.shape))
            .collect()
    }
}

/// One deferred weight-gradient computation, queued by a layer's `backward_input`.
#[derive(Clone, Debug)]
pub enum WeightGrad {
    /// dW += dyᵀ·x for y = x·Wᵀ
    Linear {
        w: ParamId,
        dy: Vec<f32>,
        x: Arc<Vec<f32>>,
    },
    /// dw += Σ dy ⊙ x·rstd
    RmsNorm {
        w: ParamId,
        dy: Vec<f32>,
        x: Arc<Vec<f32>>,
        rstd: Arc<Vec<f32>>,
    },
    /// dW += dyᵀ·x through the FP8 Wgrad GEMM; `x` is the 1×128 E4M3 activation of Fprop.
    LinearFp8 {
        w: ParamId,
        dy: Vec<f32>,
        x: Arc<Fp8Tensor>,
    },
    /// dtable[ids] += dy
    Embedding {
        w: ParamId,
        ids: Arc<Vec<u32>>,
        dy: Vec<f32>,
    },
    /// dW += g: a gradient computed elsewhere (an expert group under `--ep`) from a zero buffer.
    Dense { w: ParamId, g: Vec<f32> },
}

impl WeightGrad {
    /// The tensor this job accumulates into.
    pub fn param(&self) -> ParamId {
        match self {
            WeightGrad::Linear { w, .. }
            | WeightGrad::LinearFp8 { w, .. }
            | WeightGrad::RmsNorm { w, .. }
            | WeightGrad::Embedding { w, .. }
            | WeightGrad::Dense { w, .. } => *w,
        }
    }

    /// Runs this job into `dw`, the gradient buffer of [`WeightGrad::param`].
    pub fn run_into(self, params: &ParamStore, dw: &mut [f32]) {
        run_weight_grad_into(self, params, dw);
    }
}

/// Weight gradients waiting to run (DualPipe's W steps pop them; the plain loop runs them at once).
#[derive(Debug, Default)]
pub struct WeightGradQueue {
    pub jobs: Vec<WeightGrad>,
}

impl WeightGradQueue {
    pub fn push(&mut self, job: WeightGrad) {
        self.jobs.push(job);
    }

    /// Runs every queued job in queue order, accumulating into `grads`.
    pub fn run(&mut self, params: &ParamStore, grads: &mut [Tensor]) {
        for job in self.jobs.drain(..) {
            run_weight_grad(job, params, grads);
        }
    }
}

fn run_weight_grad(job: WeightGrad, params: &ParamStore, grads: &mut [Tensor]) {
    let w = job.param();
    run_weight_grad_into(job, params, &mut grads[w.0].data);
}

fn run_weight_grad_into(job: WeightGrad, params: &ParamStore, dw_out: &mut [f32]) {
    match job {
        WeightGrad::Linear { w, dy, x } => {
            let shape = &params.tensors[w.0].shape;
            let (d_out, d_in) = (shape[0], shape[1]);
            let n = x.len() / d_in;
            linear::backward_weight(dw_out, &dy, &x, n, d_in, d_out);
        }
        WeightGrad::LinearFp8 { w, dy, x } => {
            let shape = &params.tensors[w.0].shape;
            let (d_out, d_in) = (shape[0], shape[1]);
            let n = x.rows;
            let xt = x.requantize(ScaleLayout::Tile128x1, ScaleFormat::F32);
            let dyq = quantize_128x1(&dy, n, d_out, ScaleFormat::F32);
            let mut dw = vec![0.0; d_out * d_in];
            fp8_gemm_wgrad(&mut dw, &dyq, &xt);
            dw_out.iter_mut().zip(&dw).for_each(|(g, v)| *g += v);
        }
        WeightGrad::RmsNorm { w, dy, x, rstd } => {
            let d = params.tensors[w.0].numel();
            rmsnorm::backward_weight(dw_out, &dy, &x, &rstd, d);
        }
        WeightGrad::Dense { g, .. } => {
            assert_eq!(dw_out.len(), g.len(), "dense gradient size");
            dw_out.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
        }
        WeightGrad::Embedding { w, ids, dy } => {
            let d = params.tensors[w.0].shape[1];
            embedding::backward_weight(dw_out, &ids, &dy, d);
        }
    }
}
