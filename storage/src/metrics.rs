//! The per-run metrics file: one JSON object per line (step, losses, lr, grad norm, expert load,
//! throughput), flushed as it is written so a crashed run keeps every finished step.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends JSON lines to `<dir>/metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl MetricsLog {
    /// A fresh `<dir>/metrics.jsonl`. An earlier run's file there is kept, renamed to
    /// `metrics.<n>.jsonl` (the first free n), never truncated.
    pub fn create(dir: &Path) -> std::io::Result<MetricsLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("metrics.jsonl");
        if path.exists() {
            let mut n = 1;
            while dir.join(format!("metrics.{n}.jsonl")).exists() {
                n += 1;
            }
            std::fs::rename(&path, dir.join(format!("metrics.{n}.jsonl")))?;
        }
        MetricsLog::open_new(path)
    }

    fn open_new(path: std::path::PathBuf) -> std::io::Result<MetricsLog> {
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        Ok(MetricsLog { path, file })
    }

    /// Continues `<dir>/metrics.jsonl` after step `after`: the lines of steps up to `after` are
    /// kept, later ones (written after the checkpoint a run resumes from) are dropped.
    pub fn resume(dir: &Path, after: u64) -> std::io::Result<MetricsLog> {
        let path = dir.join("metrics.jsonl");
        let kept: Vec<String> = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= after)
                })
                .map(str::to_string)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        std::fs::create_dir_all(dir)?;
        let mut log = MetricsLog::open_new(path)?;
        for line in kept {
            log.file.write_all(line.as_bytes())?;
            log.file.write_all(b"\n")?;
        }
        log.file.flush()?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, record: &serde_json::Value) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.file, record)?;
        self.file.write_all(b"\n")?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new run never truncates an earlier run's metrics: they move to metrics.1.jsonl, .2, …
    #[test]
    fn an_earlier_runs_metrics_are_kept() {
        let dir = std::env::temp_dir().join(format!("phalanx-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for run in 0..3 {
            let mut log = MetricsLog::create(&dir).unwrap();
            log.write(&serde_json::json!({"step": 1, "run": run}))
                .unwrap();
        }
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(read("metrics.1.jsonl").contains("\"run\":0"));
        assert!(read("metrics.2.jsonl").contains("\"run\":1"));
        assert!(read("metrics.jsonl").contains("\"run\":2"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
