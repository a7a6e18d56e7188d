//! DeepSeekMoE: shared experts plus group-limited routed experts (sigmoid affinities, bias for
//! selection only), dispatch and combine in plan order, the balance loss and expert loads; the
//! routed experts run in the stage or behind an [`ExpertCompute`] (expert groups).

use super::*;

/// Where a routed-expert computation belongs: the decoder layer and the micro-batch.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ExpertSite {
    pub layer: usize,
    pub mb: usize,
}

/// What a remote expert returns from backward for one block of rows: the gradient of its input
/// rows and its three weight gradients of this micro-batch (each run from a zero buffer).
#[derive(Clone, Debug, Default)]
pub struct ExpertGrads {
    pub dx: Vec<f32>,
    pub dgate: Vec<f32>,
    pub dup: Vec<f32>,
    pub ddown: Vec<f32>,
}

/// The remote experts of MoE layer `layer` for micro-batch `mb`, reborrowed from an optional
/// `ExpertCompute` (None runs the experts in place).
pub fn experts_at<'a>(
    experts: &'a mut Option<&mut dyn ExpertCompute>,
    layer: usize,
    mb: usize,
) -> Option<(&'a mut dyn ExpertCompute, ExpertSite)> {
    let site = ExpertSite { layer, mb };
    experts
        .as_deref_mut()
        .map(|e| (e as &mut dyn ExpertCompute, site))
}

/// Routed experts computed outside the layer (expert parallelism). `blocks` are
/// `(expert, rows)` in ascending expert order, only experts that received rows; the answers come
/// back in the same order. The forward keeps whatever backward needs under `site`.
pub trait ExpertCompute: Send + Sync + std::fmt::Debug {
    fn forward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>>;
    fn backward(&mut self, site: ExpertSite, blocks: Vec<(usize, Vec<f32>)>) -> Vec<ExpertGrads>;
    /// Drops every kept activation (an aborted step).
    fn reset(&mut self) {}
    /// Installs parameter values (by whole-model id).
    fn load_from(&mut self, _full: &dyn TensorSource) {}
}

/// DeepSeekMoE: shared expert(s) plus routed experts chosen by the group-limited sigmoid router.
#[derive(Clone, Debug)]
pub struct Moe {
    pub gate: Linear,
    pub bias: ParamId,
    pub experts: Vec<SwiGlu>,
    pub shared: SwiGlu,
    pub rule: RouteRule,
    pub alpha: f32,
}

/// Activations DeepSeekMoE's backward needs.
#[derive(Debug)]
pub struct MoeStash {
    x: Arc<Vec<f32>>,
    s: Vec<f32>,
    routing: Routing,
    plan: DispatchPlan,
    experts: Vec<Option<SwiGluStash>>,
    /// The routed experts ran in an [`ExpertCompute`] (their stashes live there).
    remote: bool,
    ye: Vec<f32>,
    shared: SwiGluStash,
}

/// What a MoE layer reports besides its output: the balance loss and per-expert loads.
#[derive(Clone, Debug, Default)]
pub struct MoeStats {
    pub balance_loss: f64,
    pub loads: Vec<u32>,
}

impl Moe {
    pub fn new(p: &mut ParamStore, prefix: &str, c: &ModelConfig, std: f32, seed: u64) -> Moe {
        let d = c.hidden_size;
        let e = c.n_routed_experts;
        let gate = Linear::new(p, format!("{prefix}.gate.weight"), d, e, std, seed);
        let bias = p.add(
            format!("{prefix}.gate.e_score_correction_bias"),
            &[e],
            Init::Zeros,
            false,
            seed,
        );
        let experts = (0..e)
            .map(|i| {
                SwiGlu::new(
                    p,
                    &format!("{prefix}.experts.{i}"),
                    d,
                    c.moe_intermediate_size,
                    std,
                    seed,
                )
            })
            .collect();
        let shared = SwiGlu::new(
            p,
            &format!("{prefix}.shared_experts"),
            d,
            c.moe_intermediate_size * c.n_shared_experts,
            std,
            seed,
        );
        Moe {
            gate,
            bias,
            experts,
            shared,
            rule: RouteRule {
                n_group: c.n_group,
                topk_group: c.topk_group,
                k: c.num_experts_per_tok,
                scale: c.routed_scaling_factor,
                normalize: c.norm_topk_prob,
            },
            alpha: if c.seq_aux { c.aux_loss_alpha } else { 0.0 },
        }
    }

    pub fn forward(
        &self,
        p: &ParamStore,
        x: Arc<Vec<f32>>,
        rows: Rows,
    ) -> (Vec<f32>, MoeStash, MoeStats) {
        self.forward_with(p, x, rows, None)
    }

    /// Forward with the routed experts in `remote` when given (same dispatch plan and combine
    /// order as the in-place experts, so f32 results are identical).
    pub fn forward_with(
        &self,
        p: &ParamStore,
        x: Arc<Vec<f32>>,
        rows: Rows,
        remote: Option<(&mut dyn ExpertCompute, ExpertSite)>,
    ) -> (Vec<f32>, MoeStash, MoeStats) {
        let d = self.gate.d_in;
        let e = self.experts.len();
        let logits = self.gate.forward(p, &x);
        let mut s = vec![0.0; logits.len()];
        moe_gate::sigmoid_forward(&mut s, &logits);
        let routing = moe_gate::forward(&s, p.get(self.bias), &self.rule);
        let plan = DispatchPlan::new(&routing, e);
        let mut xe = vec![0.0; plan.rows() * d];
        moe_dispatch::dispatch_forward(&mut xe, &x, &plan, d);
        let is_remote = remote.is_some();
        let outs: Vec<Option<(Vec<f32>, Option<SwiGluStash>)>> = match remote {
            None => (0..e)
                .into_par_iter()
                .map(|i| {
                    let (lo, hi) = (plan.offsets[i], plan.offsets[i + 1]);
                    (hi > lo).then(|| {
                        let (y, st) =
                            self.experts[i].forward(p, Arc::new(xe[lo * d..hi * d].to_vec()));
                        (y, Some(st))
                    })
                })
                .collect(),
            Some((ec, site)) => {
                let blocks: Vec<(usize, Vec<f32>)> = (0..e)
                    .filter(|&i| plan.offsets[i + 1] > plan.offsets[i])
                    .map(|i| (i, xe[plan.offsets[i] * d..plan.offsets[i + 1] * d].to_vec()))
                    .collect();
                let ids: Vec<usize> = blocks.iter().map(|b| b.0).collect();
                let ys = ec.forward(site, blocks);
                assert_eq!(ys.len(), ids.len(), "one output per dispatched expert");
                let mut outs: Vec<Option<(Vec<f32>, Option<SwiGluStash>)>> =
                    (0..e).map(|_| None).collect();
                for (i, y) in ids.into_iter().zip(ys) {
                    outs[i] = Some((y, None));
                }
                outs
            }
        };
        let mut ye = vec![0.0; plan.rows() * d];
        let mut stashes = Vec::with_capacity(e);
        for (i, o) in outs.into_iter().enumerate() {
            match o {
                Some((y, st)) => {
                    ye[plan.offsets[i] * d..plan.offsets[i + 1] * d].copy_from_slice(&y);
                    stashes.push(st);
                }
                None => stashes.push(None),
            }
        }
        let (mut out, shared) = self.shared.forward(p, x.clone());
        moe_dispatch::combine_forward(&mut out, &ye, &routing.weights, routing.k, &plan, d);
        let balance_loss = if self.alpha > 0.0 {
            let (t, b, k) = (rows.seq, rows.batch, routing.k);
            balance::batch_loss_forward(&s, &routing.experts, t, b, k, self.alpha)
        } else {
            0.0
        };
        let stats = MoeStats {
            balance_loss,
            loads: plan.loads(),
        };
        (
            out,
            MoeStash {
                x,
                s,
                routing,
                plan,
                experts: stashes,
                remote: is_remote,
                ye,
                shared,
            },
            stats,
        )
    }

    pub fn backward(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: MoeStash,
        rows: Rows,
        q: &mut WeightGradQueue,
    ) -> Vec<f32> {
        self.backward_with(p, dy, st, rows, q, None)
    }

    /// Backward; a stash from a remote forward needs the same `remote` (its weight gradients
    /// come back computed and are queued as [`WeightGrad::Dense`]).
    pub fn backward_with(
        &self,
        p: &ParamStore,
        dy: Vec<f32>,
        st: MoeStash,
        rows: Rows,
        q: &mut WeightGradQueue,
        remote: Option<(&mut dyn ExpertCompute, ExpertSite)>,
    ) -> Vec<f32> {
        let d = self.gate.d_in;
        let e = self.experts.len();
        let k = st.routing.k;
        let n = st.x.len() / d;
        let mut dye = vec![0.0; st.ye.len()];
        let mut dweights = vec![0.0; n * k];
        moe_dispatch::combine_backward_input(
            &mut dye,
            &mut dweights,
            &dy,
            &st.ye,
            &st.routing.weights,
            k,
            &st.plan,
            d,
        );
        let mut dx = vec![0.0; n * d];
        self.shared.backward(p, dy, st.shared, &mut dx, false, q);
        let plan = &st.plan;
        let results: Vec<Option<(Vec<f32>, WeightGradQueue)>> = if st.remote {
            let (ec, site) = remote.expect("a remote MoE forward needs its experts for backward");
            let blocks: Vec<(usize, Vec<f32>)> = (0..e)
                .filter(|&i| plan.offsets[i + 1] > plan.offsets[i])
                .map(|i| {
                    (
                        i,
                        dye[plan.offsets[i] * d..plan.offsets[i + 1] * d].to_vec(),
                    )
                })
                .collect();
            let ids: Vec<usize> = blocks.iter().map(|b| b.0).collect();
            let gs = ec.backward(site, blocks);
            assert_eq!(gs.len(), ids.len(), "one gradient per dispatched expert");
            let mut results: Vec<Option<(Vec<f32>, WeightGradQueue)>> =
                (0..e).map(|_| None).collect();
            for (i, g) in ids.into_iter().zip(gs) {
                let x = &self.experts[i];
                let mut local = WeightGradQueue::default();
                local.push(WeightGrad::Dense {
                    w: x.down.w,
                    g: g.ddown,
                });
                local.push(WeightGrad::Dense {
                    w: x.gate.w,
                    g: g.dgate,
                });
                local.push(WeightGrad::Dense {
                    w: x.up.w,
                    g: g.dup,
                });
                results[i] = Some((g.dx, local));
            }
            results
        } else {
            st.experts
                .into_par_iter()
                .enumerate()
                .map(|(i, stash)| {
                    stash.map(|stash| {
                        let (lo, hi) = (plan.offsets[i], plan.offsets[i + 1]);
                        let mut dxe = vec![0.0; (hi - lo) * d];
                        let mut local = WeightGradQueue::default();
                        self.experts[i].backward(
                            p,
                            dye[lo * d..hi * d].to_vec(),
                            stash,
                            &mut dxe,
                            false,
                            &mut local,
                        );
                        (dxe, local)
                    })
                })
                .collect()
        };
        let mut dxe_all = vec![0.0; plan.rows() * d];
        for (i, r) in results.into_iter().enumerate() {
            if let Some((dxe, local)) = r {
                dxe_all[plan.offsets[i] * d..plan.offsets[i + 1] * d].copy_from_slice(&dxe);
                q.jobs.extend(local.jobs);
            }
        }
        moe_dispatch::dispatch_backward_input(&mut dx, &dxe_all, plan, d);
        let mut ds = vec![0.0; st.s.len()];
        moe_gate::backward_input(&mut ds, &dweights, &st.s, &st.routing, &self.rule);
        if self.alpha > 0.0 {
            let (t, b, ex) = (rows.seq, rows.batch, &st.routing.experts);
            balance::batch_loss_backward_input(&mut ds, &st.s, ex, t, b, k, self.alpha);
        }
        let mut dlogits = vec![0.0; ds.len()];
        moe_gate::sigmoid_backward_input(&mut dlogits, &ds, &st.s);
        self.gate.backward(p, dlogits, st.x, &mut dx, true, q);
        dx
    }
}
