//! The local run journal (sled): runs, their steps, checkpoints, restarts and outcome, kept on
//! disk next to the run so `phalanx runs` can tell what happened after the process is gone.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// A journal that cannot be opened or written, naming its directory.
#[derive(Debug, thiserror::Error)]
#[error("journal {dir}: {source}")]
pub struct JournalError {
    dir: String,
    source: sled::Error,
}

/// One run as the journal knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEntry {
    pub id: String,
    pub started_unix: u64,
    pub config: String,
    pub seed: u64,
    pub total_steps: u64,
    /// The checkpoint step the run continued from, if it was a resume.
    pub resumed_from: Option<u64>,
    pub store: Option<String>,
    /// `running`, `finished` or `failed`.
    pub status: String,
    /// The process that ran it (tells a run still going from one whose process died).
    #[serde(default)]
    pub pid: Option<u32>,
    pub last_step: u64,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub checkpoints: Vec<u64>,
    pub restarts: u64,
    pub error: Option<String>,
}

impl RunEntry {
    /// A run that has just started (status `running`, nothing done yet).
    pub fn running(
        id: &str,
        started_unix: u64,
        config: &str,
        seed: u64,
        total_steps: u64,
    ) -> RunEntry {
        RunEntry {
            id: id.to_string(),
            started_unix,
            config: config.to_string(),
            seed,
            total_steps,
            resumed_from: None,
            store: None,
            status: "running".into(),
            pid: None,
            last_step: 0,
            last_loss: None,
            eval_loss: None,
            checkpoints: vec![],
            restarts: 0,
            error: None,
        }
    }
}

/// The journal of one directory. Cheap to clone; safe to share between threads.
#[derive(Clone, Debug)]
pub struct Journal {
    dir: String,
    runs: sled::Tree,
    steps: sled::Tree,
    /// `<dir>.json`: every run as JSON, rewritten at each change (step records at most once a
    /// second), for readers in other processes (sled locks its directory while a run trains).
    export: std::path::PathBuf,
    /// When the export was last written for a step record.
    exported: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Journal {
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        /// How long a held lock is tried again.
        const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
        let name = dir.display().to_string();
        let err = |source| JournalError {
            dir: name.clone(),
            source,
        };
        // sled releases its file lock from a background thread after the last handle drops: a
        // journal closed a moment ago by this process may still read as held, so a held lock
        // is tried again for a while before it is an error
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match sled::open(dir) {
                Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r.map_err(err)?,
            }
        };
        Ok(Journal {
            runs: db.open_tree("runs").map_err(err)?,
            steps: db.open_tree("steps").map_err(err)?,
            dir: name,
            export: export_path(dir),
            exported: Default::default(),
        })
    }

    /// [`Journal::open`] for a run that must not be blocked by its journal: a journal that
    /// cannot be read (corrupt, or of another sled version) is moved aside to
    /// `<dir>.corrupt-<unix time>` and a fresh one is started; the second value says so. A
    /// journal held by another process is still an error (two runs in one directory).
    pub fn open_for_run(dir: &Path) -> Result<(Journal, Option<String>), JournalError> {
        match Journal::open(dir) {
            Ok(j) => Ok((j, None)),
            Err(e) if is_lock_error(&e.source) => Err(e),
            Err(e) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = dir.with_file_name(format!(
                    "{}.corrupt-{now}",
                    dir.file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("journal")
                ));
                std::fs::rename(dir, &aside).map_err(|io| JournalError {
                    dir: dir.display().to_string(),
                    source: sled::Error::Io(io),
                })?;
                let j = Journal::open(dir)?;
                Ok((
                    j,
                    Some(format!(
                        "journal {} could not be read ({}): moved aside to {}; a fresh one is kept",
                        dir.display(),
                        e.source,
                        aside.display()
                    )),
                ))
            }
        }
    }

    /// The runs as the running process last exported them (`<dir>.json`), for a reader that
    /// cannot open the journal because a run holds it.
    pub fn read_export(dir: &Path) -> Result<Vec<RunEntry>, String> {
        let path = export_path(dir);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: not a run list: {e}", path.display()))
    }

    /// Rewrites the export file (write to a temporary file, then rename: a reader never sees a
    /// half-written list). Failing to write it only costs the live view: logged, not returned.
    fn write_export(&self) {
        let Ok(runs) = self.runs() else { return };
        let tmp = self.export.with_extension("json.tmp");
        let r = serde_json::to_vec_pretty(&runs)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.export));
        if let Err(e) = r {
            tracing::warn!("cannot write {}: {e}", self.export.display());
        }
    }

    fn err(&self) -> impl Fn(sled::Error) -> JournalError + '_ {
        |source| JournalError {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Records a new run (status `running`) and writes it to disk. Later updates reach the disk
    /// within sled's flush interval (0.5 s) or at `flush`.
    pub fn begin(&self, entry: &RunEntry) -> Result<(), JournalError> {
        let v = serde_json::to_vec(entry).expect("a run entry serialises");
        self.runs
            .insert(entry.id.as_bytes(), v)
            .map_err(self.err())?;
        self.write_export();
        self.flush()
    }

    /// Changes the run `id` with `f` (a run that is not there, or not readable, is left alone).
    pub fn update(&self, id: &str, f: impl Fn(&mut RunEntry)) -> Result<(), JournalError> {
        self.change(id, f)?;
        self.write_export();
        Ok(())
    }

    fn change(&self, id: &str, f: impl Fn(&mut RunEntry)) -> Result<(), JournalError> {
        self.runs
            .fetch_and_update(id.as_bytes(), |old| {
                // returning None would delete the entry: an unreadable one is kept as it is
                let old = old?;
                let Ok(mut e) = serde_json::from_slice::<RunEntry>(old) else {
                    return Some(old.to_vec());
                };
                f(&mut e);
                Some(serde_json::to_vec(&e).expect("a run entry serialises"))
            })
            .map_err(self.err())?;
        Ok(())
    }

    /// Records one finished step (its metrics line) and moves the run's last step.
    pub fn step(
        &self,
        id: &str,
        step: u64,
        record: &serde_json::Value,
    ) -> Result<(), JournalError> {
        let mut key = id.as_bytes().to_vec();
        key.push(0);
        key.extend(step.to_be_bytes());
        self.steps
            .insert(key, serde_json::to_vec(record).expect("json"))
            .map_err(self.err())?;
        let loss = record["loss"].as_f64();
        let eval = record["eval_loss"].as_f64();
        self.change(id, |e| {
            e.last_step = step;
            e.last_loss = loss;
            if eval.is_some() {
                e.eval_loss = eval;
            }
        })?;
        // a step is the hot path: the export follows at most once a second
        let due = self.exported.lock().map(|mut last| {
            let due = last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1));
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        });
        if due.unwrap_or(true) {
            self.write_export();
        }
        Ok(())
    }

    /// The step records of run `id`, in step order.
    pub fn steps(&self, id: &str) -> Result<Vec<serde_json::Value>, JournalError> {
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        self.steps
            .scan_prefix(prefix)
            .values()
            .map(|v| {
                v.map(|v| serde_json::from_slice(&v).unwrap_or(serde_json::Value::Null))
                    .map_err(self.err())
            })
            .collect()
    }

    /// Every run, oldest first.
    /// [`Journal::runs`] as they are now: a run still marked running whose process on this
    /// machine is gone was killed (or crashed hard) and shows as `died`.
    pub fn runs_observed(&self) -> Result<Vec<RunEntry>, JournalError> {
        let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
        let mut runs = self.runs()?;
        for r in &mut runs {
            if r.status == "running" && r.pid.is_some_and(|p| !alive(p)) {
                r.status = "died".into();
            }
        }
        Ok(runs)
    }

    pub fn runs(&self) -> Result<Vec<RunEntry>, JournalError> {
        let mut out: Vec<RunEntry> = self
            .runs
            .iter()
            .values()
            .filter_map(|v| match v {
                Ok(v) => serde_json::from_slice(&v).ok().map(Ok),
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        out.sort_by(|a, b| (a.started_unix, &a.id).cmp(&(b.started_unix, &b.id)));
        Ok(out)
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.steps.flush().map_err(self.err())?;
        self.runs.flush().map_err(self.err())?;
        Ok(())
    }
}

/// `<dir>.json` beside the journal directory.
fn export_path(dir: &Path) -> std::path::PathBuf {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("journal");
    dir.with_file_name(format!("{name}.json"))
}

/// sled could not take its directory's lock: another process has the journal open.
fn is_lock_error(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, started: u64) -> RunEntry {
        RunEntry::running(id, started, "configs/micro.toml", 1, 3)
    }

    #[test]
    fn runs_steps_and_outcome_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("phalanx-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let j = Journal::open(&dir).unwrap();
            j.begin(&entry("b", 20)).unwrap();
            j.begin(&entry("a", 10)).unwrap();
            for s in 1..=3 {
                j.step(
                    "a",
                    s,
                    &serde_json::json!({"step": s, "loss": 4.0 - s as f64}),
                )
                .unwrap();
            }
            j.step(
                "a",
                3,
                &serde_json::json!({"step": 3, "loss": 1.0, "eval_loss": 1.5}),
            )
            .unwrap();
            j.update("a", |e| {
                e.checkpoints.push(3);
                e.status = "finished".into();
            })
            .unwrap();
            j.flush().unwrap();
        }
        let j = Journal::open(&dir).unwrap();
        let runs = j.runs().unwrap();
        assert_eq!(
            runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let a = &runs[0];
        assert_eq!(
            (a.last_step, a.last_loss, a.eval_loss),
            (3, Some(1.0), Some(1.5))
        );
        assert_eq!(
            (a.status.as_str(), a.checkpoints.clone()),
            ("finished", vec![3])
        );
        let steps = j.steps("a").unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[2]["eval_loss"], 1.5);
        assert!(j.steps("b").unwrap().is_empty());
    }

    /// The running process exports its runs beside the journal: a second process reads them
    /// while sled holds the directory (it cannot open it).
    #[test]
    fn a_second_reader_sees_the_exported_runs_while_the_journal_is_held() {
        let dir = std::env::temp_dir().join(format!("phalanx-journal-held-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(export_path(&dir));
        let j = Journal::open(&dir).unwrap();
        j.begin(&entry("r", 5)).unwrap();
        j.step("r", 7, &serde_json::json!({"step": 7, "loss": 2.5}))
            .unwrap();
        let seen = Journal::read_export(&dir).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].id.as_str(), seen[0].last_step), ("r", 7));
        assert_eq!(seen[0].last_loss, Some(2.5));
        drop(j);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(export_path(&dir));
    }

    /// A journal that cannot be read is moved aside with a message; the run gets a fresh one.
    #[test]
    fn a_corrupt_journal_is_moved_aside_not_blocking() {
        let root = std::env::temp_dir().join(format!("phalanx-journal-bad-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("journal");
        std::fs::create_dir_all(&dir).unwrap();
        // not a sled database: its config file is garbage
        std::fs::write(dir.join("conf"), b"\x00\xffnot a sled config").unwrap();
        std::fs::write(dir.join("db"), vec![0xAB; 4096]).unwrap();
        let (j, warning) = Journal::open_for_run(&dir).expect("a fresh journal");
        let w = warning.expect("a warning");
        assert!(w.contains("moved aside"), "{w}");
        j.begin(&entry("fresh", 1)).unwrap();
        assert_eq!(j.runs().unwrap().len(), 1);
        let aside: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("journal.corrupt-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "the old journal is kept aside");
        drop(j);
        let _ = std::fs::remove_dir_all(&root);
    }
}
