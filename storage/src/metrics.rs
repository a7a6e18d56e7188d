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
    pub fn create(dir: &Path) -> std::io::Result<MetricsLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("metrics.jsonl");
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        Ok(MetricsLog { path, file })
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
