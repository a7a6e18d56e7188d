//! One step's choreography at scale: a pipeline schedule run in virtual time with per-chunk
//! costs from the cost model (`actors::schedule::timeline`, which drives every rank's
//! `RankExecutor`), its makespan and bubble, and the Gantt chart as SVG.

use actors::schedule::{Costs, Timeline, timeline};
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

/// The schedule `kind` on `ranks` ranks with `microbatches`, run with `costs`.
pub fn step_timeline(
    kind: ScheduleKind,
    ranks: usize,
    microbatches: usize,
    costs: &Costs,
) -> Result<Timeline, String> {
    let s = build(kind, ranks, microbatches).map_err(|e| e.to_string())?;
    Ok(timeline(&s, costs))
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
    let Some(p) = &s.pipeline else {
        return Ok(None);
    };
    let kind: ScheduleKind = p
        .schedule
        .parse()
        .map_err(|e: actors::schedule::ScheduleError| e.to_string())?;
    let (Some(model), Some(tflops), Some(eff)) = (&s.run.model, s.run.gpu_tflops, s.run.efficiency)
    else {
        return Err("pipeline: needs run.model, run.gpu_tflops and run.efficiency".into());
    };
    let cfg = crate::run::model_config(model)?;
    let seq = s.run.seq_len.unwrap_or(4096);
    let fpt = crate::cost::training_flops_per_token(&cfg, seq);
    let tokens = p.microbatch_tokens.unwrap_or(seq as f64);
    let costs = chunk_costs(fpt, tokens, kind.model_stages(p.pp), tflops, eff);
    let t = step_timeline(kind, p.pp, p.microbatches, &costs)?;
    let summary = StepSummary {
        schedule: kind.to_string(),
        pp: p.pp,
        microbatches: p.microbatches,
        forward_chunk_s: costs.f,
        makespan_s: t.makespan,
        bubble_s: t.max_bubble(),
        table2_bubble_s: table2_bubble(kind, p.pp, &costs),
    };
    Ok(Some((t, summary)))
}

/// What one simulated step of a scenario's pipeline came to.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepSummary {
    pub schedule: String,
    pub pp: usize,
    pub microbatches: usize,
    /// One micro-batch's forward chunk on one stage.
    pub forward_chunk_s: f64,
    pub makespan_s: f64,
    /// The largest idle time of a rank within the step.
    pub bubble_s: f64,
    /// The DualPipe paper's Table 2 formula for it (none for DualPipeV).
    pub table2_bubble_s: Option<f64>,
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
                (got - want).abs() <= 1e-9 * want.max(1.0),
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
