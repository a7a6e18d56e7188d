//! The commands around runs rather than inside one: `report` (a run directory drawn as SVG) and
//! `simulate` (a failure scenario replayed at cluster scale). Flags in, one library call, out.

use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The run directory (`--out` of `phalanx train`): its metrics.jsonl and journal.
    #[arg(default_value = "runs/latest")]
    pub run: PathBuf,
    /// The picture to write (SVG) [default: RUN/report.svg].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `phalanx report`: the run directory's metrics and checkpoints drawn as one SVG.
pub fn report(a: ReportArgs) -> Result<()> {
    let out = a.out.unwrap_or_else(|| a.run.join("report.svg"));
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => {}
        Some("png") => bail!(
            "--out {}: PNG is not written (no raster backend is built in); use a .svg path",
            out.display()
        ),
        _ => bail!("--out {}: the picture must be a .svg file", out.display()),
    }
    let metrics = a.run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).with_context(|| {
        format!(
            "{}: cannot read (no run has used --out {})",
            metrics.display(),
            a.run.display()
        )
    })?;
    let mut points = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", metrics.display(), i + 1))?;
        points.extend(actors::report::Point::from_json(&v));
    }
    // the newest run of the directory's journal (or its export while a run holds it)
    let dir = a.run.join("journal");
    let runs = match storage::journal::Journal::open(&dir) {
        Ok(j) => j.runs_observed().unwrap_or_default(),
        Err(_) => storage::journal::Journal::read_export(&dir).unwrap_or_default(),
    };
    let last = runs.last();
    let checkpoints = last.map(|r| r.checkpoints.clone()).unwrap_or_default();
    let title = match last {
        Some(r) => format!(
            "{} · {} · {} · {}/{} steps",
            a.run.display(),
            r.id,
            r.config,
            r.last_step,
            r.total_steps
        ),
        None => a.run.display().to_string(),
    };
    let (svg, m) = actors::report::svg(&title, &points, &checkpoints);
    std::fs::write(&out, svg).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "{}: {} steps, {} evaluations, {} checkpoints, {} restarts, {} rollbacks ({} steps skipped)",
        out.display(),
        m.steps,
        m.evals,
        m.checkpoints,
        m.restarts,
        m.rollbacks,
        m.skipped_steps
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// The scenario (TOML; see simulations/README.md).
    pub scenario: PathBuf,
    /// Seed of the failure draws [default: 1].
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where to write events.jsonl and ettr.svg [default: sim/<scenario name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Vary one key over values: `--sweep checkpoint.interval_steps=50,150,600`.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Only this policy: whole-job, actor-restart or peer-restore [default: all three].
    #[arg(long)]
    pub policy: Option<String>,
    /// The summary JSON of a clean `phalanx train` run (no faults): its measured time per step
    /// (`wall_seconds / steps`, evaluations included) replaces the scenario's `run.step_seconds`.
    #[arg(long)]
    pub calibrate: Option<PathBuf>,
}

/// The seconds per step of a `phalanx train` summary: `wall_seconds / steps`.
fn measured_step_seconds(path: &std::path::Path) -> Result<f64> {
    let name = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {name}"))?;
    // the summary is the last JSON object of the file (a captured stdout may hold log lines)
    let start = text
        .rfind("\n{")
        .map(|i| i + 1)
        .or_else(|| text.starts_with('{').then_some(0))
        .ok_or_else(|| anyhow::anyhow!("{name}: no JSON summary of `phalanx train` in it"))?;
    let v: serde_json::Value = serde_json::from_str(text[start..].trim())
        .with_context(|| format!("{name}: not a `phalanx train` summary"))?;
    let field = |k: &str| {
        v[k].as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| anyhow::anyhow!("{name}: field `{k}` is missing or not positive"))
    };
    Ok(field("wall_seconds")? / field("steps")?)
}

/// `phalanx simulate`: every policy (and sweep value) of a scenario; summary JSON on stdout.
pub fn simulate(a: SimulateArgs) -> Result<()> {
    use simulations::run::{Policy, simulate};
    let mut base =
        simulations::scenario::Scenario::load(&a.scenario).map_err(anyhow::Error::msg)?;
    let calibrated = match &a.calibrate {
        Some(p) => {
            let step = measured_step_seconds(p)?;
            base.run.step_seconds = Some(step);
            base.run.model = None;
            Some(step)
        }
        None => None,
    };
    let policies: Vec<Policy> = match a.policy.as_deref() {
        None => Policy::ALL.to_vec(),
        Some(p) => vec![
            Policy::ALL
                .into_iter()
                .find(|x| x.name() == p)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--policy {p}: expected whole-job, actor-restart or peer-restore"
                    )
                })?,
        ],
    };
    let sweep: Vec<Option<(String, f64)>> = match &a.sweep {
        None => vec![None],
        Some(s) => {
            let (key, values) = s
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--sweep {s}: expected key=a,b,c"))?;
            values
                .split(',')
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .map(|x| Some((key.to_string(), x)))
                        .map_err(|_| anyhow::anyhow!("--sweep {s}: {v:?} is not a number"))
                })
                .collect::<Result<_>>()?
        }
    };
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from("sim").join(&base.name));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let events_path = out.join("events.jsonl");
    let mut events = std::io::BufWriter::new(
        std::fs::File::create(&events_path)
            .with_context(|| format!("cannot write {}", events_path.display()))?,
    );
    let bar = indicatif::ProgressBar::new((sweep.len() * policies.len()) as u64);
    let started = std::time::Instant::now();
    let mut points = Vec::new();
    let mut total_events = 0u64;
    for sw in sweep {
        let mut s = base.clone();
        if let Some((k, v)) = &sw {
            s.set(k, *v).map_err(anyhow::Error::msg)?;
        }
        let mut outcomes = Vec::new();
        for &p in &policies {
            bar.set_message(format!("{} {}", s.name, p.name()));
            let mut write_err = None;
            let o = simulate(&s, p, a.seed, &mut |e| {
                use std::io::Write;
                let mut v = serde_json::to_value(e).unwrap_or_default();
                if let Some((k, x)) = &sw {
                    v["sweep"] = serde_json::json!({ k.as_str(): x });
                }
                if let Err(e) = writeln!(events, "{v}") {
                    write_err.get_or_insert(e);
                }
            })
            .map_err(anyhow::Error::msg)?;
            if let Some(e) = write_err {
                bail!("cannot write {}: {e}", events_path.display());
            }
            total_events += o.events;
            outcomes.push(o);
            bar.inc(1);
        }
        points.push(simulations::report::Point {
            sweep: sw,
            outcomes,
        });
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let svg = simulations::report::svg(&base.name, &points);
    std::fs::write(out.join("ettr.svg"), svg)?;
    let mut pictures = vec![out.join("ettr.svg"), out.join("progress.svg")];
    if let Some(first) = points.first() {
        let title = format!("{}: progress over time", base.name);
        let svg = simulations::report::progress_svg(&title, &first.outcomes);
        std::fs::write(out.join("progress.svg"), svg)?;
    }
    // one step's choreography, when the scenario describes its pipeline
    let step = simulations::step::scenario_step(&base).map_err(anyhow::Error::msg)?;
    if let Some((timeline, _)) = &step {
        let path = out.join("step.svg");
        std::fs::write(&path, actors::schedule::svg(timeline))
            .with_context(|| format!("cannot write {}", path.display()))?;
        pictures.push(path);
    }
    let summary = serde_json::json!({
        "scenario": base.name,
        "seed": a.seed,
        "gpus": base.gpus(),
        "events": total_events,
        "seconds": secs,
        "events_per_s": total_events as f64 / secs.max(1e-9),
        "calibrated_step_seconds": calibrated,
        "events_log": events_path.display().to_string(),
        "pictures": pictures.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "step": step.map(|(_, summary)| summary),
        "results": points,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
