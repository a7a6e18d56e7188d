//! The background checkpoint uploader: the step pays for the in-memory copy, the upload overlaps
//! later steps. It holds the run's lease, retries failed uploads with a capped backoff, reports a
//! checkpoint that still fails as missed and takes the next one, and fails the run only when no
//! checkpoint has committed for too long.

use anyhow::{Context, Result, anyhow, bail};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use storage::checkpoint::{self, CheckpointError, Shard, SnapData, SnapTensor};
use storage::journal::Journal;
use storage::lease::{Lease, LeaseError};
use storage::store::{Store, block_on};

/// How the uploader holds its run and rides out a flaky store.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadPolicy {
    /// Tries per checkpoint (the first included).
    pub tries: u32,
    /// Wait before the second try; doubled before each further one …
    pub backoff: Duration,
    /// … up to this.
    pub backoff_cap: Duration,
    /// The run fails when a checkpoint fails and none has been committed for this long (since
    /// the last commit, or since the uploader started).
    pub max_without_checkpoint: Duration,
    /// The run's lease (`<run>/lease.json`) is taken over by another writer after this long
    /// without renewal; it is renewed at every upload and every quarter of this while idle.
    pub lease_expiry: Duration,
}

impl Default for UploadPolicy {
    fn default() -> UploadPolicy {
        UploadPolicy {
            tries: 5,
            backoff: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            max_without_checkpoint: Duration::from_secs(30 * 60),
            lease_expiry: storage::lease::DEFAULT_EXPIRY,
        }
    }
}

impl UploadPolicy {
    /// The defaults, overridden by `PHALANX_CKPT_LEASE_EXPIRY_S` and
    /// `PHALANX_CKPT_MAX_WITHOUT_S` (seconds) where set.
    pub fn from_env() -> Result<UploadPolicy> {
        let mut p = UploadPolicy::default();
        let secs = |name: &str| -> Result<Option<Duration>> {
            match std::env::var(name) {
                Ok(v) => {
                    let s: f64 = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s > 0.0)
                        .ok_or_else(|| anyhow!("{name}={v:?}: want a number of seconds > 0"))?;
                    Ok(Some(Duration::from_secs_f64(s)))
                }
                Err(_) => Ok(None),
            }
        };
        if let Some(d) = secs("PHALANX_CKPT_LEASE_EXPIRY_S")? {
            p.lease_expiry = d;
        }
        if let Some(d) = secs("PHALANX_CKPT_MAX_WITHOUT_S")? {
            p.max_without_checkpoint = d;
        }
        Ok(p)
    }

    /// The wait after failed try `n` (1-based).
    pub fn backoff_after(&self, n: u32) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX));
        doubled.min(self.backoff_cap)
    }
}

/// What the uploader did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct UploadSummary {
    /// Checkpoints committed.
    pub committed: u64,
    /// Checkpoints given up after every try failed (the run went on; the next one was taken).
    pub checkpoints_missed: u64,
    /// The steps of the missed checkpoints.
    pub missed_steps: Vec<u64>,
    /// Tries that failed and were tried again.
    pub retries: u64,
}

enum Job {
    Upload {
        step: u64,
        /// One per owner, written side by side.
        shards: Vec<Shard>,
        meta: serde_json::Value,
    },
    /// Buffers to make ready for the first snapshot: tensors with their names, shapes and
    /// dtypes, and no values.
    Prepare(Vec<Vec<SnapTensor>>),
}

/// Counters the uploader thread keeps, readable while it runs.
#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    missed: AtomicU64,
    retries: AtomicU64,
    missed_steps: Mutex<Vec<u64>>,
}

impl Counters {
    fn summary(&self) -> UploadSummary {
        UploadSummary {
            committed: self.committed.load(Ordering::SeqCst),
            checkpoints_missed: self.missed.load(Ordering::SeqCst),
            missed_steps: self
                .missed_steps
                .lock()
                .map(|v| v.clone())
                .unwrap_or_default(),
            retries: self.retries.load(Ordering::SeqCst),
        }
    }
}

/// Uploads snapshots on its own thread, one at a time: `save` waits only while the previous
/// upload is still running (one snapshot in memory besides the model). It holds the run's lease
/// from `start` to `finish`. A failed upload is tried again with capped exponential backoff; a
/// checkpoint that still fails is counted as missed and the run goes on; the run fails only when
/// a checkpoint fails and none has been committed for [`UploadPolicy::max_without_checkpoint`].
pub struct Uploader {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<Result<()>>>,
    counters: Arc<Counters>,
    finished: Option<UploadSummary>,
    /// Snapshots handed over so far.
    saved: u64,
    /// Each handed-over snapshot's buffers, back once its upload is over, and those made by
    /// `prepare`.
    returned: mpsc::Receiver<Vec<Vec<SnapTensor>>>,
    /// Buffers the thread owes (snapshots handed over and `prepare`s not yet given back).
    owed: u64,
}

impl Uploader {
    /// Starts the uploader of checkpoints of run `ckpt_run` to store `url`; each commit is also
    /// recorded in `journal` under the journal's run id `run`. The policy is
    /// [`UploadPolicy::from_env`].
    pub fn start(url: &str, ckpt_run: &str, journal: Journal, run: &str) -> Result<Uploader> {
        let store = Store::open(url)?;
        Uploader::start_with(store, ckpt_run, journal, run, UploadPolicy::from_env()?)
    }

    /// [`Uploader::start`] on an opened store with an explicit policy. Takes the lease of
    /// `ckpt_run` first: a second writer of the same run is refused here, naming the holder.
    pub fn start_with(
        store: Store,
        ckpt_run: &str,
        journal: Journal,
        run: &str,
        policy: UploadPolicy,
    ) -> Result<Uploader> {
        let mut lease = block_on(Lease::acquire(
            &store,
            ckpt_run,
            "train",
            policy.lease_expiry,
        ))?;
        let run = run.to_string();
        let ckpt_run = ckpt_run.to_string();
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let (tx, rx) = mpsc::sync_channel::<Job>(0);
        let (give_back, returned) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("checkpoint-upload".into())
            .spawn(move || -> Result<()> {
                let ends = Ends {
                    jobs: &rx,
                    give_back: &give_back,
                };
                let r = upload_loop(
                    &store, &ckpt_run, &journal, &run, &policy, &mut lease, ends, &shared,
                );
                // let a waiting `save` go before the lease is given back
                drop(rx);
                match block_on(lease.release()) {
                    Ok(()) => r,
                    Err(e) => {
                        tracing::warn!("cannot release the lease of run {ckpt_run}: {e}");
                        r
                    }
                }
            })
            .context("cannot start the checkpoint uploader")?;
        Ok(Uploader {
            jobs: Some(tx),
            thread: Some(thread),
            counters,
            finished: None,
            saved: 0,
            returned,
            owed: 0,
        })
    }

    /// Hands over the snapshot of `step`, one list of tensors per owner (each owner's shard is
    /// written beside the others); fails if the uploader has stopped (no checkpoint committed
    /// for too long, a lost lease, a journal that cannot be written) or a tensor does not fill
    /// its shape. Waits while the previous upload is still running.
    pub fn save(
        &mut self,
        step: u64,
        owners: Vec<Vec<SnapTensor>>,
        meta: serde_json::Value,
    ) -> Result<()> {
        let shards = owners
            .into_iter()
            .map(Shard::new)
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| anyhow!("checkpoint of step {step}: {e}"))?;
        let sent = self
            .jobs
            .as_ref()
            .map(|tx| tx.send(Job::Upload { step, shards, meta }).is_ok())
            .unwrap_or(false);
        if !sent {
            // the uploader stopped: its own error says why
            self.finish()?;
            bail!("the checkpoint uploader stopped before step {step}");
        }
        self.saved += 1;
        self.owed += 1;
        Ok(())
    }

    /// Has the uploader thread make the buffers of the first snapshot while training goes on
    /// (each page written once, so the first snapshot's copy costs what later ones do).
    /// `layout`: the snapshot's tensors without values.
    pub fn prepare(&mut self, layout: Vec<Vec<SnapTensor>>) {
        if let Some(tx) = &self.jobs
            && tx.send(Job::Prepare(layout)).is_ok()
        {
            self.owed += 1;
        }
    }

    /// The buffers of the last snapshot handed over, once its upload is over (waiting for it
    /// if it still runs), for the next snapshot to copy into; empty after none or when the
    /// uploader stopped.
    pub fn take_buffers(&mut self) -> Vec<Vec<SnapTensor>> {
        let mut last = Vec::new();
        while self.owed > 0 {
            match self.returned.recv() {
                Ok(b) => {
                    self.owed -= 1;
                    last = b;
                }
                Err(_) => break,
            }
        }
        last
    }

    /// Waits until every handed-over snapshot is committed or missed (a rollback that reads
    /// the store needs the newest one there).
    pub fn wait_idle(&self) {
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            let c = &self.counters;
            let done = c.committed.load(Ordering::SeqCst) + c.missed.load(Ordering::SeqCst);
            if done >= self.saved {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Checkpoints missed so far (every try failed; the run went on).
    pub fn checkpoints_missed(&self) -> u64 {
        self.counters.missed.load(Ordering::SeqCst)
    }

    /// Waits for every handed-over snapshot to be committed or missed, gives the lease back and
    /// returns how many were committed (see [`Uploader::finish_summary`] for the rest).
    pub fn finish(&mut self) -> Result<u64> {
        Ok(self.finish_summary()?.committed)
    }

    /// [`Uploader::finish`], returning the whole summary. Later calls return the same summary.
    pub fn finish_summary(&mut self) -> Result<UploadSummary> {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow!("the checkpoint uploader panicked"))??;
            self.finished = Some(self.counters.summary());
        }
        Ok(self
            .finished
            .clone()
            .unwrap_or_else(|| self.counters.summary()))
    }

    /// The summary so far (final after `finish`).
    pub fn summary(&self) -> UploadSummary {
        self.finished
            .clone()
            .unwrap_or_else(|| self.counters.summary())
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// `n` values whose pages are mapped (a fresh allocation's pages are mapped on first write).
fn touched<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    let per_page = (4096 / std::mem::size_of::<T>()).max(1);
    for i in (0..n).step_by(per_page) {
        // an opaque value: the compiler may not skip storing the zero that is already there
        v[i] = std::hint::black_box(T::default());
    }
    v
}

/// The uploader thread's channels: snapshots in, their buffers back out.
struct Ends<'a> {
    jobs: &'a mpsc::Receiver<Job>,
    give_back: &'a mpsc::Sender<Vec<Vec<SnapTensor>>>,
}

/// The uploader thread: jobs as they come, the lease renewed while idle.
#[allow(clippy::too_many_arguments)]
fn upload_loop(
    store: &Store,
    ckpt_run: &str,
    journal: &Journal,
    run: &str,
    policy: &UploadPolicy,
    lease: &mut Lease,
    ends: Ends<'_>,
    counters: &Counters,
) -> Result<()> {
    let started = Instant::now();
    let mut last_commit: Option<(Instant, u64)> = None;
    loop {
        let job = match ends.jobs.recv_timeout(lease.heartbeat()) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                match block_on(lease.renew()) {
                    Ok(()) => {}
                    Err(e @ LeaseError::Lost { .. }) => return Err(e.into()),
                    Err(e) => tracing::warn!("cannot renew the checkpoint lease: {e}"),
                }
                continue;
            }
        };
        let (step, shards, meta) = match job {
            Job::Upload { step, shards, meta } => (step, shards, meta),
            Job::Prepare(mut layout) => {
                for t in layout.iter_mut().flatten() {
                    let n = t.shape.iter().product();
                    t.data = match t.data {
                        SnapData::F32(_) => SnapData::F32(touched(n)),
                        SnapData::Bf16(_) => SnapData::Bf16(touched(n)),
                    };
                }
                let _ = ends.give_back.send(layout);
                continue;
            }
        };
        let mut last_err = None;
        let mut tries = 0;
        for attempt in 1..=policy.tries.max(1) {
            tries = attempt;
            let tried = block_on(async {
                lease.renew().await?;
                let write = checkpoint::write_shards(store, ckpt_run, step, &shards, meta.clone());
                lease.hold_while(write).await?
            });
            match tried {
                Ok(_) => {
                    last_err = None;
                    break;
                }
                Err(CheckpointError::Lease(e @ LeaseError::Lost { .. })) => {
                    return Err(anyhow::Error::new(e).context(format!("checkpoint of step {step}")));
                }
                Err(e) => {
                    tracing::warn!(
                        step,
                        attempt,
                        tries = policy.tries,
                        "checkpoint upload failed: {e}"
                    );
                    let permanent = e.is_permanent();
                    last_err = Some(e);
                    if permanent {
                        // an intact checkpoint of this step is already there: no try can help
                        break;
                    }
                    if attempt < policy.tries {
                        counters.retries.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(policy.backoff_after(attempt));
                    }
                }
            }
        }
        // the buffers go back for the next snapshot (a leftover clone would keep them: then
        // the next snapshot makes its own)
        let buffers = shards.into_iter().filter_map(Shard::into_tensors).collect();
        let _ = ends.give_back.send(buffers);
        match last_err {
            None => {
                tracing::info!(step, store = %store.url, "checkpoint committed");
                // on disk at once: the journal's record of commits survives a kill
                journal.update(run, |e| e.checkpoints.push(step))?;
                journal.flush()?;
                counters.committed.fetch_add(1, Ordering::SeqCst);
                last_commit = Some((Instant::now(), step));
            }
            Some(e) => {
                counters.missed.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut v) = counters.missed_steps.lock() {
                    v.push(step);
                }
                let since = last_commit.map_or(started, |(t, _)| t).elapsed();
                let last = last_commit
                    .map_or("none since the run started".to_string(), |(_, s)| {
                        format!("the last was step {s}")
                    });
                if since > policy.max_without_checkpoint {
                    bail!(
                        "checkpoint of step {step} failed after {tries} tries ({e}); no checkpoint of run {ckpt_run} committed for {:.0} s ({last}), the limit is {:.0} s",
                        since.as_secs_f64(),
                        policy.max_without_checkpoint.as_secs_f64()
                    );
                }
                tracing::warn!(
                    step,
                    store = %store.url,
                    "checkpoint of step {step} missed after {tries} tries ({e}); training goes on, the next checkpoint is taken as planned ({last})"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::*;
    use storage::checkpoint::SnapData;
    use storage::journal::RunEntry;
    use storage::object_store::ObjectStoreExt;
    use storage::store::Faulty;

    fn snap(k: f32) -> Vec<SnapTensor> {
        vec![SnapTensor {
            name: "w".into(),
            shape: vec![2, 2],
            data: SnapData::F32(vec![k; 4]),
        }]
    }

    fn quick() -> UploadPolicy {
        UploadPolicy {
            backoff: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(4),
            ..UploadPolicy::default()
        }
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("phalanx-upl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A journal with run `j` begun.
    fn journal(name: &str) -> Journal {
        let j = Journal::open(&tmp(name)).unwrap();
        j.begin(&RunEntry::running("j", 0, "test", 0, 30)).unwrap();
        j
    }

    fn journaled(j: &Journal) -> Vec<u64> {
        j.runs().unwrap()[0].checkpoints.clone()
    }

    #[test]
    fn checkpoint_backoff_doubles_up_to_its_cap() {
        let p = UploadPolicy::default();
        assert_eq!(
            (p.tries, p.max_without_checkpoint, p.lease_expiry),
            (5, Duration::from_secs(1800), Duration::from_secs(60))
        );
        let ms: Vec<u128> = (1..=7).map(|n| p.backoff_after(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(p.backoff_after(200), Duration::from_secs(2));
    }

    #[test]
    fn checkpoint_upload_is_retried_until_it_commits() {
        let base = Store::open("memory://").unwrap();
        let (store, faults) = Faulty::wrap(&base, "/checkpoints/");
        let j = journal("retry");
        let mut up = Uploader::start_with(store, "r", j.clone(), "j", quick()).unwrap();
        // the first two tries fail at their first request; the third commits
        faults.fail_writes(2);
        up.save(10, vec![snap(1.0)], serde_json::json!({})).unwrap();
        let s = up.finish_summary().unwrap();
        assert_eq!(
            s,
            UploadSummary {
                committed: 1,
                checkpoints_missed: 0,
                missed_steps: vec![],
                retries: 2
            }
        );
        assert_eq!(faults.failed(), 2);
        assert_eq!(
            block_on(checkpoint::committed_steps(&base, "r")).unwrap(),
            [10]
        );
        // the snapshot's buffers came back for the next one, as they were
        assert_eq!(up.take_buffers(), vec![snap(1.0)]);
        assert_eq!(journaled(&j), [10]);
        assert_eq!(up.finish().unwrap(), 1, "finish again: the same summary");
    }

    #[test]
    fn checkpoint_missed_after_every_try_then_the_next_one_commits() {
        let base = Store::open("memory://").unwrap();
        let (store, faults) = Faulty::wrap(&base, "/checkpoints/");
        let j = journal("missed");
        let mut up = Uploader::start_with(store, "r", j.clone(), "j", quick()).unwrap();
        // every one of the five tries of step 10 fails; the run goes on
        faults.fail_writes(5);
        up.save(10, vec![snap(1.0)], serde_json::json!({})).unwrap();
        // handing over step 20 waits for step 10 to be given up
        up.save(20, vec![snap(2.0)], serde_json::json!({})).unwrap();
        assert_eq!(up.checkpoints_missed(), 1);
        let s = up.finish_summary().unwrap();
        assert_eq!(
            s,
            UploadSummary {
                committed: 1,
                checkpoints_missed: 1,
                missed_steps: vec![10],
                retries: 4
            }
        );
        assert_eq!(faults.failed(), 5);
        assert_eq!(
            block_on(checkpoint::committed_steps(&base, "r")).unwrap(),
            [20]
        );
        assert_eq!(journaled(&j), [20]);
        // a resume finds step 20
        let m = block_on(checkpoint::latest_intact(&base, None)).unwrap();
        assert_eq!(m.manifest.step, 20);
        // an intact checkpoint of the step is already committed: missed at once, no retries
        let mut up =
            Uploader::start_with(base.clone(), "r", journal("missed2"), "j", quick()).unwrap();
        up.save(20, vec![snap(7.0)], serde_json::json!({})).unwrap();
        let s = up.finish_summary().unwrap();
        assert_eq!((s.committed, s.checkpoints_missed, s.retries), (0, 1, 0));
        let m = block_on(checkpoint::latest_intact(&base, None)).unwrap();
        assert_eq!(m.tensors, snap(2.0));
    }

    #[test]
    fn checkpoint_missing_for_too_long_fails_the_run() {
        let base = Store::open("memory://").unwrap();
        let (store, faults) = Faulty::wrap(&base, "/checkpoints/");
        let policy = UploadPolicy {
            tries: 2,
            max_without_checkpoint: Duration::ZERO,
            ..quick()
        };
        let mut up = Uploader::start_with(store, "r", journal("gap"), "j", policy).unwrap();
        faults.fail_writes(2);
        up.save(10, vec![snap(1.0)], serde_json::json!({})).unwrap();
        let e = format!(
            "{:#}",
            up.save(20, vec![snap(2.0)], serde_json::json!({}))
                .unwrap_err()
        );
        assert!(
            e.contains("checkpoint of step 10 failed after 2 tries")
                && e.contains("no checkpoint of run r committed for")
                && e.contains("injected failure"),
            "{e}"
        );
        // the lease was given back on the way out
        assert!(
            block_on(storage::lease::holder(&base, "r"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn checkpoint_second_writer_of_a_run_is_refused_until_the_first_finishes() {
        let store = Store::open("memory://").unwrap();
        let mut first =
            Uploader::start_with(store.clone(), "r", journal("lease1"), "j", quick()).unwrap();
        let e = Uploader::start_with(store.clone(), "r", journal("lease2"), "j", quick())
            .err()
            .unwrap()
            .to_string();
        let me = format!(
            "{}:{}:",
            storage::lease::Owner::this_process("").host,
            std::process::id()
        );
        assert!(
            e.contains("run r already has a writer") && e.contains(&me),
            "{e}"
        );
        // another run of the same store is free
        Uploader::start_with(store.clone(), "other", journal("lease3"), "j", quick())
            .unwrap()
            .finish()
            .unwrap();
        first
            .save(1, vec![snap(1.0)], serde_json::json!({}))
            .unwrap();
        assert_eq!(first.finish().unwrap(), 1);
        // finished: the lease is released and the run can be written again
        let mut again =
            Uploader::start_with(store.clone(), "r", journal("lease4"), "j", quick()).unwrap();
        again
            .save(2, vec![snap(2.0)], serde_json::json!({}))
            .unwrap();
        assert_eq!(again.finish().unwrap(), 1);
    }

    #[test]
    fn checkpoint_uploader_stops_when_its_lease_is_taken_over() {
        let store = Store::open("memory://").unwrap();
        let policy = UploadPolicy {
            lease_expiry: Duration::from_secs(3600),
            ..quick()
        };
        let mut up =
            Uploader::start_with(store.clone(), "r", journal("stolen"), "j", policy).unwrap();
        // another process took the lease over (as if ours had expired)
        let thief = storage::lease::Owner {
            host: "elsewhere".into(),
            ..storage::lease::Owner::this_process("train")
        };
        let record = serde_json::json!({
            "format": storage::lease::FORMAT, "run": "r", "owner": thief,
            "acquired_unix_ms": 0, "renewed_unix_ms": u64::MAX / 2, "expiry_ms": 60_000,
        });
        let key = storage::object_store::path::Path::from("r/lease.json");
        let body = serde_json::to_vec(&record).unwrap();
        block_on(store.inner.put(&key, body.into())).unwrap();
        up.save(5, vec![snap(1.0)], serde_json::json!({})).unwrap();
        let e = format!("{:#}", up.finish().unwrap_err());
        assert!(e.contains("taken over by elsewhere:"), "{e}");
        assert!(
            block_on(checkpoint::committed_steps(&store, "r"))
                .unwrap()
                .is_empty()
        );
        // the thief's lease stays
        let held = block_on(storage::lease::holder(&store, "r"))
            .unwrap()
            .unwrap();
        assert_eq!(held.owner.host, "elsewhere");
    }

    #[test]
    fn checkpoint_load_latest_falls_back_past_a_corrupt_shard() {
        let dir = tmp("fallback-store");
        let url = dir.display().to_string();
        let store = Store::open(&url).unwrap();
        for step in [10, 20] {
            block_on(checkpoint::write(
                &store,
                "r",
                step,
                &snap(step as f32),
                serde_json::json!({}),
            ))
            .unwrap();
        }
        let m = block_on(checkpoint::read_manifest(&store, "r", 20)).unwrap();
        let shard = dir.join(&m.shards[0].key);
        let mut bytes = std::fs::read(&shard).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&shard, bytes).unwrap();
        let got = load_latest_checked(&url, None).unwrap();
        assert_eq!(got.manifest.step, 10);
        assert_eq!(got.tensors, snap(10.0));
        assert_eq!(got.skipped.len(), 1);
        let why = got.skipped[0].to_string();
        assert!(
            why.contains(&m.shards[0].key) && why.contains("checksum"),
            "{why}"
        );
        let (m, t) = load_latest(&url, Some("r")).unwrap();
        assert_eq!((m.step, t), (10, snap(10.0)));
    }
}
