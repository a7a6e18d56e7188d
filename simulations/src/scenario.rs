//! A failure scenario as read from `scenarios/*.toml`: the cluster, the run, the failure
//! process, checkpoints and recovery costs. Unknown keys and impossible values are refused
//! naming the file and the key. Every default and its source is in `simulations/README.md`.

use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub cluster: Cluster,
    pub run: RunSpec,
    pub failures: Failures,
    pub checkpoint: Checkpoint,
    #[serde(default)]
    pub recovery: Recovery,
    /// The live formation's step timeout in milliseconds: when a scripted hang or dropped
    /// message is seen, counted from the step's start (default: the detector's bound).
    #[serde(default)]
    pub step_timeout_ms: Option<u64>,
    /// Faults at given steps, in `phalanx train --inject`'s `[[fault]]` format: the same file
    /// drives a live run (see `simulations/README.md`, "Live replay").
    #[serde(default, rename = "fault")]
    pub faults: Vec<actors::inject::Fault>,
    /// One step's choreography to draw (`DIR/step.svg`): the schedule, its ranks and
    /// micro-batches, chunk costs from `run`'s FLOP accounting.
    pub pipeline: Option<Pipeline>,
    /// Link bandwidths and latencies per GPU (default: DeepSeek-V3's H800 cluster).
    #[serde(default)]
    pub network: crate::comm::Network,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// `1f1b`, `zb1p`, `dualpipe` or `dualpipev`.
    pub schedule: String,
    pub pp: usize,
    pub microbatches: usize,
    /// Tokens of one micro-batch (default `run.seq_len`: one sequence).
    pub microbatch_tokens: Option<f64>,
    /// Expert-parallel size: the GPUs of a stage that share its routed experts and exchange
    /// tokens in the all-to-all (1: no all-to-all).
    #[serde(default = "one")]
    pub ep: usize,
    /// Most nodes one token's routed experts may sit on (DeepSeek-V3's node-limited routing: 4).
    #[serde(default = "four")]
    pub node_limit: usize,
}

fn one() -> usize {
    1
}

fn four() -> usize {
    4
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub nodes: u64,
    pub gpus_per_node: u64,
    /// Warm standby nodes that take a failed node's place (replenished after repair).
    #[serde(default)]
    pub spare_nodes: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Wall-clock length simulated, in hours (exactly one of this and `tokens`).
    pub duration_hours: Option<f64>,
    /// Tokens to train (the run ends when they are done).
    pub tokens: Option<f64>,
    pub tokens_per_step: f64,
    /// The time of one step; or derive it from `model`, `gpu_tflops` and `efficiency`.
    pub step_seconds: Option<f64>,
    /// A phalanx model config (path relative to the workspace root) for the FLOP accounting.
    pub model: Option<String>,
    /// Sequence length for the attention FLOPs (default 4096).
    pub seq_len: Option<u64>,
    /// Peak dense TFLOP/s per GPU, and the fraction of it a step achieves.
    pub gpu_tflops: Option<f64>,
    /// Or a GPU whose peak is known: `h200` (measured on the project's H200: BF16 GEMM 800,
    /// FP8 with DeepSeek's block scales 1,300 TFLOP/s) or `h800` (NVIDIA's dense figures:
    /// 989.5 BF16, 1,979 FP8), at `precision` (`bf16`, the default, or `fp8`).
    pub gpu: Option<String>,
    pub precision: Option<String>,
    /// Where a derived step time comes from: `flops` (the default: training FLOPs over the
    /// cluster's peak × efficiency, an all-inclusive efficiency) or `pipeline` (one step of the
    /// `[pipeline]` with the run's micro-batches through the Coordinator and RankMachines: chunk
    /// compute at the efficiency, plus bubbles and exposed communication).
    pub step_time: Option<String>,
    pub efficiency: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Failures {
    /// Unexpected interruptions per 1,000 node-days (exponential per node).
    pub rate_per_1000_node_days: f64,
    /// Category mix: "llama3" (Table 5) or "uniform-crash".
    #[serde(default = "llama3")]
    pub mix: String,
    /// Probability that a failure is a correlated burst (a rack or a switch) taking
    /// `burst_nodes` nodes down at once.
    #[serde(default)]
    pub burst_probability: f64,
    #[serde(default)]
    pub burst_nodes: u64,
    /// Nodes that turn slow (thermal throttling, a bad link) per 1,000 node-days; the whole
    /// synchronous step runs `straggler_slowdown`× slower for `straggler_minutes`.
    #[serde(default)]
    pub straggler_rate_per_1000_node_days: f64,
    #[serde(default = "two")]
    pub straggler_slowdown: f64,
    #[serde(default = "thirty")]
    pub straggler_minutes: f64,
    /// Steps per 1,000 whose loss spikes (a bad batch, an unlucky update).
    #[serde(default)]
    pub loss_spikes_per_1000_steps: f64,
}

fn two() -> f64 {
    2.0
}

fn thirty() -> f64 {
    30.0
}

fn llama3() -> String {
    "llama3".into()
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Checkpoint every this many steps.
    pub interval_steps: u64,
    /// Whole-job policy: the step loop stops this long per checkpoint (synchronous save).
    pub sync_write_seconds: f64,
    /// Actor-level policies: the stall of an asynchronous save (copy, then upload beside).
    pub async_stall_seconds: f64,
    /// Reading the whole checkpoint back at a job restart.
    pub restore_seconds: f64,
    /// Outages of the checkpoint store per day, each `store_outage_minutes` long: checkpoints
    /// due meanwhile are missed, restores from the store wait for it.
    #[serde(default)]
    pub store_outages_per_day: f64,
    #[serde(default = "thirty")]
    pub store_outage_minutes: f64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Recovery {
    /// Whole-job restart: requeue, process start, NCCL init (cold restart at 16K: ~200 s).
    pub job_restart_seconds: f64,
    /// Actor-level: a fresh process on the same node.
    pub process_restart_seconds: f64,
    /// Actor-level: a warm spare node taking the place of a failed one.
    pub spare_start_seconds: f64,
    /// Actor-level: one node's state from the object store.
    pub node_restore_seconds: f64,
    /// Peer policy: one node's state from a peer's memory.
    pub peer_restore_seconds: f64,
    /// A failed node is back in the pool after this long.
    pub repair_hours: f64,
    /// Whole-job policy: a hang is seen by the collective watchdog after this long.
    pub watchdog_seconds: f64,
    /// Actor-level: the failure detector's bound (heartbeat every 100 ms).
    pub detector_dead_after_ms: u64,
}

impl Default for Recovery {
    fn default() -> Recovery {
        Recovery {
            job_restart_seconds: 200.0,
            process_restart_seconds: 30.0,
            spare_start_seconds: 60.0,
            node_restore_seconds: 20.0,
            peer_restore_seconds: 3.0,
            repair_hours: 4.0,
            watchdog_seconds: 600.0,
            detector_dead_after_ms: 2000,
        }
    }
}

impl RunSpec {
    /// The GPU's peak TFLOP/s: `gpu_tflops`, else the `gpu` preset at `precision`.
    pub fn peak_tflops(&self) -> Option<f64> {
        if self.gpu_tflops.is_some() {
            return self.gpu_tflops;
        }
        let fp8 = match self.precision.as_deref() {
            None | Some("bf16") => false,
            Some("fp8") => true,
            Some(_) => return None,
        };
        gpu_peak(self.gpu.as_deref()?, fp8)
    }
}

/// Peak TFLOP/s of a named GPU, BF16 or FP8 (see `RunSpec::gpu`).
fn gpu_peak(gpu: &str, fp8: bool) -> Option<f64> {
    match (gpu, fp8) {
        ("h200", false) => Some(800.0),
        ("h200", true) => Some(1300.0),
        ("h800", false) => Some(989.5),
        ("h800", true) => Some(1979.0),
        _ => None,
    }
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
        Scenario::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Scenario, String> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| format!("{file}: not valid TOML: {}", e.message()))?;
        let s: Scenario =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let msg = e.inner().to_string();
                let msg = msg.lines().next().unwrap_or("").to_string();
                format!("{file}: key `{}`: {msg}", e.path())
            })?;
        s.validate(file)?;
        Ok(s)
    }

    fn validate(&self, file: &str) -> Result<(), String> {
        let bad = |key: &str, why: String| Err(format!("{file}: key `{key}`: {why}"));
        if let Some(p) = &self.pipeline {
            let kind = match p.schedule.parse::<actors::schedule::ScheduleKind>() {
                Ok(k) => k,
                Err(e) => return bad("pipeline.schedule", e.to_string()),
            };
            if let Err(e) = actors::schedule::build(kind, p.pp, p.microbatches) {
                return bad("pipeline.pp", e.to_string());
            }
            let gpus = self.gpus();
            if p.ep == 0 || p.node_limit == 0 {
                return bad("pipeline.ep", "ep and node_limit must be at least 1".into());
            }
            if !gpus.is_multiple_of((p.pp * p.ep) as u64) {
                return bad(
                    "pipeline.ep",
                    format!(
                        "pp {} × ep {} does not divide the cluster's {gpus} GPUs",
                        p.pp, p.ep
                    ),
                );
            }
            let g = self.cluster.gpus_per_node as usize;
            if p.ep > 1 && !(p.ep.is_multiple_of(g) || g.is_multiple_of(p.ep)) {
                return bad(
                    "pipeline.ep",
                    format!("{} neither divides nor fills whole nodes of {g} GPUs", p.ep),
                );
            }
            if self.run.model.is_none() || self.run.peak_tflops().is_none() {
                return bad(
                    "pipeline",
                    "its chunk costs need run.model, run.gpu_tflops (or run.gpu) and run.efficiency"
                        .into(),
                );
            }
        }
        let n = &self.network;
        for (key, v) in [
            ("network.network_gb_s", n.network_gb_s),
            ("network.nvlink_gb_s", n.nvlink_gb_s),
        ] {
            if v.is_nan() || v <= 0.0 {
                return bad(key, format!("{v} (must be a positive bandwidth)"));
            }
        }
        for (key, v) in [
            ("network.network_latency_us", n.network_latency_us),
            ("network.nvlink_latency_us", n.nvlink_latency_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(key, format!("{v} (must be zero or positive)"));
            }
        }
        if self.step_timeout_ms == Some(0) {
            return bad("step_timeout_ms", "must be at least 1".into());
        }
        let steps = self
            .run
            .tokens
            .map(|t| (t / self.run.tokens_per_step).ceil() as u64);
        for (i, f) in self.faults.iter().enumerate() {
            if f.at_step == 0 || steps.is_some_and(|n| f.at_step > n) {
                return bad(
                    &format!("fault[{i}].at_step"),
                    format!(
                        "{} (the run has steps 1..={})",
                        f.at_step,
                        steps.unwrap_or(0)
                    ),
                );
            }
        }
        if self.cluster.nodes == 0 {
            return bad("cluster.nodes", "must be at least 1".into());
        }
        if !(1..=16).contains(&self.cluster.gpus_per_node) {
            return bad(
                "cluster.gpus_per_node",
                format!("{} (a node has 1 to 16 GPUs)", self.cluster.gpus_per_node),
            );
        }
        let r = &self.run;
        match (r.duration_hours, r.tokens) {
            (Some(_), Some(_)) | (None, None) => {
                return bad(
                    "run.duration_hours",
                    "give exactly one of run.duration_hours and run.tokens".into(),
                );
            }
            _ => {}
        }
        let positive = [
            ("run.duration_hours", r.duration_hours),
            ("run.tokens", r.tokens),
            ("run.tokens_per_step", Some(r.tokens_per_step)),
            ("run.step_seconds", r.step_seconds),
            ("run.gpu_tflops", r.gpu_tflops),
            ("run.efficiency", r.efficiency),
        ];
        for (k, v) in positive {
            if let Some(v) = v
                && !(v > 0.0 && v.is_finite())
            {
                return bad(k, format!("{v} (must be a positive number)"));
            }
        }
        if r.efficiency.is_some_and(|e| e > 1.0) {
            return bad("run.efficiency", "must be at most 1".into());
        }
        if let Some(g) = &r.gpu
            && gpu_peak(g, false).is_none()
        {
            return bad("run.gpu", format!("unknown GPU {g:?} (h200, h800)"));
        }
        match r.step_time.as_deref() {
            None | Some("flops") => {}
            Some("pipeline") => {
                if self.pipeline.is_none() {
                    return bad(
                        "run.step_time",
                        "\"pipeline\" needs a [pipeline] table".into(),
                    );
                }
                match crate::step::run_microbatches(self) {
                    Err(e) => return bad("run.tokens_per_step", e),
                    Ok(m) => {
                        let p = self.pipeline.as_ref().expect("checked above");
                        let kind = p.schedule.parse().expect("checked above");
                        if let Err(e) = actors::schedule::build(kind, p.pp, m) {
                            return bad("run.step_time", format!("{m} micro-batches: {e}"));
                        }
                    }
                }
            }
            Some(x) => {
                return bad("run.step_time", format!("unknown {x:?} (flops, pipeline)"));
            }
        }
        if let Some(p) = &r.precision
            && !["bf16", "fp8"].contains(&p.as_str())
        {
            return bad(
                "run.precision",
                format!("unknown precision {p:?} (bf16, fp8)"),
            );
        }
        if r.step_seconds.is_none()
            && (r.model.is_none() || r.peak_tflops().is_none() || r.efficiency.is_none())
        {
            return bad(
                "run.step_seconds",
                "give it, or run.model, run.gpu_tflops (or run.gpu) and run.efficiency to derive it".into(),
            );
        }
        let f = &self.failures;
        if !(f.rate_per_1000_node_days >= 0.0 && f.rate_per_1000_node_days.is_finite()) {
            return bad(
                "failures.rate_per_1000_node_days",
                format!("{} (must be zero or positive)", f.rate_per_1000_node_days),
            );
        }
        for (key, v, min) in [
            (
                "failures.straggler_rate_per_1000_node_days",
                f.straggler_rate_per_1000_node_days,
                0.0,
            ),
            ("failures.straggler_slowdown", f.straggler_slowdown, 1.0),
            ("failures.straggler_minutes", f.straggler_minutes, 0.0),
            (
                "failures.loss_spikes_per_1000_steps",
                f.loss_spikes_per_1000_steps,
                0.0,
            ),
            (
                "checkpoint.store_outages_per_day",
                self.checkpoint.store_outages_per_day,
                0.0,
            ),
            (
                "checkpoint.store_outage_minutes",
                self.checkpoint.store_outage_minutes,
                0.0,
            ),
        ] {
            if !(v.is_finite() && v >= min) {
                return bad(key, format!("{v} (must be a number ≥ {min})"));
            }
        }
        if f.loss_spikes_per_1000_steps > 1000.0 {
            return bad(
                "failures.loss_spikes_per_1000_steps",
                "at most 1000 (every step)".into(),
            );
        }
        if !(0.0..=1.0).contains(&f.burst_probability) {
            return bad("failures.burst_probability", "must lie in [0, 1]".into());
        }
        if f.burst_nodes > self.cluster.nodes {
            return bad(
                "failures.burst_nodes",
                format!(
                    "{} is more than the cluster's {} nodes",
                    f.burst_nodes, self.cluster.nodes
                ),
            );
        }
        if crate::failures::mix(&f.mix).is_none() {
            return bad(
                "failures.mix",
                format!("unknown mix {:?} (llama3, uniform-crash)", f.mix),
            );
        }
        let c = &self.checkpoint;
        if c.interval_steps == 0 {
            return bad("checkpoint.interval_steps", "must be at least 1".into());
        }
        let rc = &self.recovery;
        for (k, v) in [
            ("checkpoint.sync_write_seconds", c.sync_write_seconds),
            ("checkpoint.async_stall_seconds", c.async_stall_seconds),
            ("checkpoint.restore_seconds", c.restore_seconds),
            ("recovery.job_restart_seconds", rc.job_restart_seconds),
            (
                "recovery.process_restart_seconds",
                rc.process_restart_seconds,
            ),
            ("recovery.spare_start_seconds", rc.spare_start_seconds),
            ("recovery.node_restore_seconds", rc.node_restore_seconds),
            ("recovery.peer_restore_seconds", rc.peer_restore_seconds),
            ("recovery.repair_hours", rc.repair_hours),
            ("recovery.watchdog_seconds", rc.watchdog_seconds),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(k, format!("{v} (must be zero or positive)"));
            }
        }
        Ok(())
    }

    pub fn gpus(&self) -> u64 {
        self.cluster.nodes * self.cluster.gpus_per_node
    }

    /// Sets a key from `--sweep key=value` (the keys a sweep can vary).
    pub fn set(&mut self, key: &str, value: f64) -> Result<(), String> {
        match key {
            "checkpoint.interval_steps" => self.checkpoint.interval_steps = value as u64,
            "failures.rate_per_1000_node_days" => self.failures.rate_per_1000_node_days = value,
            "cluster.nodes" => self.cluster.nodes = value as u64,
            "cluster.spare_nodes" => self.cluster.spare_nodes = value as u64,
            "recovery.job_restart_seconds" => self.recovery.job_restart_seconds = value,
            other => {
                return Err(format!(
                    "--sweep {other}: not a sweepable key (checkpoint.interval_steps, failures.rate_per_1000_node_days, cluster.nodes, cluster.spare_nodes, recovery.job_restart_seconds)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name = \"x\"\n[cluster]\nnodes = 4\ngpus_per_node = 8\n[run]\nduration_hours = 1.0\ntokens_per_step = 1.0\nstep_seconds = 1.0\n[failures]\nrate_per_1000_node_days = 1.0\n[checkpoint]\ninterval_steps = 10\nsync_write_seconds = 1.0\nasync_stall_seconds = 0.1\nrestore_seconds = 1.0\n";

    /// `run.gpu` names a peak: the H200's measured BF16 and block-scaled FP8 GEMM rates.
    #[test]
    fn gpu_presets_give_the_peak() {
        let text = GOOD.replace(
            "step_seconds = 1.0",
            "model = \"configs/tiny.toml\"\ngpu = \"h200\"\nefficiency = 0.5",
        );
        let s = Scenario::parse(&text, "s.toml").unwrap();
        assert_eq!(s.run.peak_tflops(), Some(800.0));
        let fp8 = Scenario::parse(
            &text.replace("gpu = ", "precision = \"fp8\"\ngpu = "),
            "s.toml",
        );
        assert_eq!(fp8.unwrap().run.peak_tflops(), Some(1300.0));
        let step = crate::run::step_seconds(&s).unwrap();
        let cfg = crate::run::model_config("configs/tiny.toml").unwrap();
        let want = crate::cost::training_flops_per_token(&cfg, 4096) / (32.0 * 800e12 * 0.5);
        assert!((step - want).abs() <= 1e-12 * want, "{step} vs {want}");
    }

    #[test]
    fn bad_scenarios_are_refused_naming_file_and_key() {
        assert!(Scenario::parse(GOOD, "s.toml").is_ok());
        for (from, to, key) in [
            ("nodes = 4", "nodes = 4\nnodez = 1", "cluster"),
            (
                "rate_per_1000_node_days = 1.0",
                "rate_per_1000_node_days = -1.0",
                "failures.rate_per_1000_node_days",
            ),
            (
                "gpus_per_node = 8",
                "gpus_per_node = 64",
                "cluster.gpus_per_node",
            ),
            (
                "interval_steps = 10",
                "interval_steps = 0",
                "checkpoint.interval_steps",
            ),
            ("step_seconds = 1.0", "", "run.step_seconds"),
            (
                "duration_hours = 1.0",
                "duration_hours = 1.0\ntokens = 5.0",
                "run.duration_hours",
            ),
            (
                "rate_per_1000_node_days = 1.0",
                "rate_per_1000_node_days = 1.0\nmix = \"nope\"",
                "failures.mix",
            ),
            (
                "rate_per_1000_node_days = 1.0",
                "rate_per_1000_node_days = 1.0\nburst_nodes = 9",
                "failures.burst_nodes",
            ),
            (
                "name = \"x\"",
                "step_timeout_ms = 0\nname = \"x\"",
                "step_timeout_ms",
            ),
            (
                "restore_seconds = 1.0",
                "restore_seconds = 1.0\n[[fault]]\nat_step = 0\nactor = \"stage\"",
                "fault[0].at_step",
            ),
            (
                "restore_seconds = 1.0",
                "restore_seconds = 1.0\n[pipeline]\nschedule = \"zigzag\"\npp = 4\nmicrobatches = 8",
                "pipeline.schedule",
            ),
            (
                "restore_seconds = 1.0",
                "restore_seconds = 1.0\n[pipeline]\nschedule = \"1f1b\"\npp = 4\nmicrobatches = 8",
                "pipeline",
            ),
            (
                "restore_seconds = 1.0",
                "restore_seconds = 1.0\n[pipeline]\nschedule = \"1f1b\"\npp = 4\nmicrobatches = 8\nep = 3",
                "pipeline.ep",
            ),
            ("step_seconds = 1.0", "gpu = \"a100\"", "run.gpu"),
            (
                "restore_seconds = 1.0",
                "restore_seconds = 1.0\n[network]\nnetwork_gb_s = -50.0",
                "network.network_gb_s",
            ),
            (
                "restore_seconds = 1.0",
                "restore_seconds = 1.0\n[network]\ninfiniband = 1.0",
                "network",
            ),
        ] {
            let text = GOOD.replace(from, to);
            let e = Scenario::parse(&text, "s.toml").unwrap_err();
            assert!(
                e.starts_with("s.toml: key `") && e.contains(key),
                "{to}: {e}"
            );
        }
    }
}
