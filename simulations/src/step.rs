//! One step at scale: chunk costs from the FLOP accounting and the communication model, the
//! schedule run through the control plane (`choreography`: the Coordinator and every rank's
//! RankMachine) in virtual time, its makespan, bubble, exposed communication and commit time,
//! and the Gantt chart as SVG.

use crate::choreography::{Choreography, run_step};
use crate::comm::{CommCosts, Layout, chunk_comm};
use actors::schedule::{Costs, Timeline};
use actors::schedule::{ScheduleKind, build};

/// Chunk costs of one micro-batch on one stage: forward `f`, backward `b` = input + weight
/// gradients (≈ 2 f), weight part `w` (≈ f), and a forward overlapped with a backward `fb`
/// (compute adds up: F&B = F + B; DualPipe hides the communication, not the compute).
pub fn chunk_costs(
    flops_per_token: f64,
    tokens_per_microbatch: f64,
    stages: usize,
    tflops: f64,
    efficiency: f64,
) -> Costs {
    let fwd = flops_per_token / 3.0 * tokens_per_microbatch / stages as f64;
    let f = fwd / (tflops * 1e12 * efficiency);
    Costs {
        f,
        b: 2.0 * f,
        w: f,
        fb: 3.0 * f,
    }
}

/// The schedule `kind` on `ranks` ranks with `microbatches`, run through the control plane
/// with compute `costs` and communication `comm`; control messages take `control_s`.
pub fn step_choreography(
    kind: ScheduleKind,
    ranks: usize,
    microbatches: usize,
    costs: &Costs,
    comm: &CommCosts,
    control_s: f64,
) -> Result<Choreography, String> {
    let s = build(kind, ranks, microbatches).map_err(|e| e.to_string())?;
    run_step(&s, costs, comm, control_s)
}

/// The schedule's timeline with compute only (communication free).
pub fn step_timeline(
    kind: ScheduleKind,
    ranks: usize,
    microbatches: usize,
    costs: &Costs,
) -> Result<Timeline, String> {
    Ok(step_choreography(kind, ranks, microbatches, costs, &CommCosts::default(), 0.0)?.timeline)
}

/// The bubble of the DualPipe paper's Table 2 for `kind` on `pp` ranks.
pub fn table2_bubble(kind: ScheduleKind, pp: usize, c: &Costs) -> Option<f64> {
    let p = pp as f64;
    match kind {
        ScheduleKind::OneFOneB => Some((p - 1.0) * (c.f + c.b)),
        ScheduleKind::Zb1p => Some((p - 1.0) * (c.f + c.b - 2.0 * c.w)),
        ScheduleKind::DualPipe => Some((p / 2.0 - 1.0) * (c.fb + c.b - 3.0 * c.w)),
        ScheduleKind::DualPipeV => None,
    }
}

/// One step of `s`'s `[pipeline]` with chunk costs from its FLOP accounting: the timeline (for
/// the Gantt) and what it says.
pub fn scenario_step(
    s: &crate::scenario::Scenario,
) -> Result<Option<(Timeline, StepSummary)>, String> {
    match &s.pipeline {
        Some(p) => pipeline_step(s, p.microbatches).map(Some),
        None => Ok(None),
    }
}

/// Micro-batches one pipeline runs per step of the run: the step's tokens over the data-parallel
/// replicas of the pipeline (gpus / pp) and the tokens of a micro-batch.
pub fn run_microbatches(s: &crate::scenario::Scenario) -> Result<usize, String> {
    let p = s
        .pipeline
        .as_ref()
        .ok_or("run.step_time = \"pipeline\" needs a [pipeline]")?;
    let tokens = p
        .microbatch_tokens
        .unwrap_or(s.run.seq_len.unwrap_or(4096) as f64);
    let replicas = (s.gpus() / p.pp as u64) as f64;
    let m = s.run.tokens_per_step / (replicas * tokens);
    if m < 1.0 || (m - m.round()).abs() > 1e-9 {
        return Err(format!(
            "run.tokens_per_step {} is not a whole number of micro-batches of {tokens} tokens on \
             each of the {replicas} pipelines ({m})",
            s.run.tokens_per_step
        ));
    }
    Ok(m.round() as usize)
}

/// The run's step time from its choreography: one step of the `[pipeline]` with the run's own
/// number of micro-batches, through the Coordinator and RankMachines, to its commit.
pub fn pipeline_step_seconds(s: &crate::scenario::Scenario) -> Result<f64, String> {
    let m = step_model(s)?;
    let ch = step_choreography(
        m.kind,
        m.pp,
        run_microbatches(s)?,
        &m.costs,
        &m.comm,
        m.control_s,
    )?;
    Ok(ch.committed_s)
}

/// What one step of a scenario's `[pipeline]` costs, chunk by chunk.
struct StepModel {
    kind: ScheduleKind,
    pp: usize,
    ep: usize,
    costs: Costs,
    comm: CommCosts,
    control_s: f64,
}

/// The chunk costs of `s`'s `[pipeline]`: compute from its FLOP accounting, communication from
/// its layout and network.
fn step_model(s: &crate::scenario::Scenario) -> Result<StepModel, String> {
    let p = s.pipeline.as_ref().ok_or("no [pipeline]")?;
    let kind: ScheduleKind = p
        .schedule
        .parse()
        .map_err(|e: actors::schedule::ScheduleError| e.to_string())?;
    let (Some(model), Some(tflops), Some(eff)) =
        (&s.run.model, s.run.peak_tflops(), s.run.efficiency)
    else {
        return Err("pipeline: needs run.model, run.gpu_tflops and run.efficiency".into());
    };
    let cfg = crate::run::model_config(model)?;
    let seq = s.run.seq_len.unwrap_or(4096);
    let fpt = crate::cost::training_flops_per_token(&cfg, seq);
    let tokens = p.microbatch_tokens.unwrap_or(seq as f64);
    let stages = kind.model_stages(p.pp);
    let layout = Layout {
        pp: p.pp,
        stages,
        ep: p.ep,
        gpus: s.gpus(),
        gpus_per_node: s.cluster.gpus_per_node,
        node_limit: p.node_limit,
        microbatch_tokens: tokens,
    };
    let copies = stages * if kind == ScheduleKind::DualPipe { 2 } else { 1 } / p.pp;
    Ok(StepModel {
        kind,
        pp: p.pp,
        ep: p.ep,
        costs: chunk_costs(fpt, tokens, stages, tflops, eff),
        comm: chunk_comm(&cfg, &layout, &s.network, copies),
        control_s: s.network.transfer_s(0.0, true),
    })
}

/// One step of `s`'s `[pipeline]` run with `microbatches` micro-batches, with and without its
/// communication.
fn pipeline_step(
    s: &crate::scenario::Scenario,
    microbatches: usize,
) -> Result<(Timeline, StepSummary), String> {
    let StepModel {
        kind,
        pp,
        ep,
        costs,
        comm,
        control_s,
    } = step_model(s)?;
    let bare = step_choreography(kind, pp, microbatches, &costs, &CommCosts::default(), 0.0)?;
    let ch = step_choreography(kind, pp, microbatches, &costs, &comm, control_s)?;
    let t = &ch.timeline;
    let summary = StepSummary {
        schedule: kind.to_string(),
        pp,
        ep,
        microbatches,
        forward_chunk_s: costs.f,
        compute_makespan_s: bare.timeline.makespan,
        compute_bubble_s: bare.timeline.max_bubble(),
        table2_bubble_s: table2_bubble(kind, pp, &costs),
        comm,
        makespan_s: t.makespan,
        bubble_s: t.max_bubble(),
        exposed_comm_s: t.makespan - bare.timeline.makespan,
        step_s: ch.committed_s,
        messages: ch.messages,
    };
    Ok((ch.timeline, summary))
}

/// What one simulated step of a scenario's pipeline came to.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepSummary {
    pub schedule: String,
    pub pp: usize,
    pub ep: usize,
    pub microbatches: usize,
    /// One micro-batch's forward chunk on one stage (compute).
    pub forward_chunk_s: f64,
    /// The schedule with compute only: its makespan and largest per-rank idle time.
    pub compute_makespan_s: f64,
    pub compute_bubble_s: f64,
    /// The DualPipe paper's Table 2 formula for that bubble (none for DualPipeV).
    pub table2_bubble_s: Option<f64>,
    /// Communication of one chunk (all-to-all, pipeline sends) and of the step's reduction.
    pub comm: CommCosts,
    /// With communication: the ranks' makespan, the largest bubble, what communication added
    /// to the makespan, and the commit (after the data-parallel reduction and the install).
    pub makespan_s: f64,
    pub bubble_s: f64,
    pub exposed_comm_s: f64,
    pub step_s: f64,
    /// Pipeline messages between ranks in the step.
    pub messages: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PP = 16 with DeepSeek-V3's costs per chunk: DualPipe's bubble is Table 2's
    /// (PP/2 − 1)(F&B + B − 3W) and 1F1B's (PP − 1)(F + B), larger by their ratio.
    #[test]
    fn pp16_dualpipe_bubble_is_table_2_and_1f1b_is_larger_by_the_formula() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/deepseek-v3-671b.toml"
        );
        let cfg = kernels::model::RunConfig::load(std::path::Path::new(p))
            .unwrap()
            .model;
        let fpt = crate::cost::training_flops_per_token(&cfg, 4096);
        let c = chunk_costs(fpt, 4096.0, 16, 989.5, 0.4);
        let mut bubbles = Vec::new();
        for kind in [ScheduleKind::DualPipe, ScheduleKind::OneFOneB] {
            let t = step_timeline(kind, 16, 32, &c).unwrap();
            let want = table2_bubble(kind, 16, &c).unwrap();
            let got = t.max_bubble();
            println!(
                "{kind} PP=16 N=32: bubble {got:.4} s (Table 2: {want:.4} s), makespan {:.3} s",
                t.makespan
            );
            assert!(
                (got - want).abs() <= 1e-13 * want.max(1.0),
                "{kind}: {got} vs {want}"
            );
            bubbles.push(got);
        }
        let ratio = bubbles[1] / bubbles[0];
        let formula = (15.0 * (c.f + c.b)) / (7.0 * (c.fb + c.b - 3.0 * c.w));
        assert!((ratio - formula).abs() < 1e-9, "{ratio} vs {formula}");
        assert!(ratio > 2.0, "1F1B's bubble is {ratio:.2}x DualPipe's");
    }
}
