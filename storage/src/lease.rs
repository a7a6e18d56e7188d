//! One writer per run: a process that writes a run's checkpoints holds the object
//! `<run>/lease.json` (who holds it, when it was last renewed). A second writer of the same run
//! is refused, naming the holder, until the lease is older than its expiry (the holder stopped
//! renewing it: it died or hangs) or the holder is a process of this machine that is gone.
//!
//! Changes to the lease are conditional where the store can do it (`PutMode::Create` to take a
//! free lease, `PutMode::Update` on the version read to renew or take over a stale one: S3,
//! GCS, Azure, `memory://`). A local directory cannot compare-and-swap: there the last check and
//! the write are two steps, and two processes taking over the same stale lease in the same few
//! milliseconds could both believe they hold it. Ages compare the holder's clock with the
//! reader's: hosts that share a store should keep their clocks in sync (NTP).

use crate::store::Store;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A lease not renewed for this long is taken over by the next writer.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(60);
/// The lease format this build writes and reads.
pub const FORMAT: u32 = 1;

/// The process that holds (or held) a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub host: String,
    pub pid: u32,
    /// When the process started (Unix ms).
    pub started_unix_ms: u64,
    /// What the lease is for: `train`, `gc` …
    pub purpose: String,
    /// Tells two leases taken by one process apart.
    pub nonce: u64,
    /// The kernel boot id and pid namespace of the process, and its start in clock ticks since
    /// boot: with them a process of the same machine can tell whether `pid` still runs.
    #[serde(default)]
    pub boot_id: Option<String>,
    #[serde(default)]
    pub pid_ns: Option<String>,
    #[serde(default)]
    pub start_ticks: Option<u64>,
}

impl Owner {
    /// This process, as the holder of a new lease for `purpose`.
    pub fn this_process(purpose: &str) -> Owner {
        static NONCE: AtomicU64 = AtomicU64::new(0);
        static STARTED: OnceLock<u64> = OnceLock::new();
        let stat = proc_stat("self");
        Owner {
            host: hostname(),
            pid: std::process::id(),
            started_unix_ms: *STARTED.get_or_init(|| process_start_ms().unwrap_or_else(now_ms)),
            purpose: purpose.to_string(),
            nonce: NONCE.fetch_add(1, Ordering::Relaxed),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .ok()
                .map(|p| p.display().to_string()),
            start_ticks: stat.map(|s| s.1),
        }
    }

    /// `host:pid:start`, the holder's identity as a person reads it.
    pub fn id(&self) -> String {
        format!("{}:{}:{}", self.host, self.pid, self.started_unix_ms)
    }

    /// True when the holder is a process of this machine and pid namespace that no longer runs
    /// (its pid is gone, a zombie, or now another process). False when unknown.
    pub fn is_gone_here(&self) -> bool {
        let me = Owner::this_process("");
        let comparable = self.host == me.host
            && self.boot_id.is_some()
            && self.boot_id == me.boot_id
            && self.pid_ns.is_some()
            && self.pid_ns == me.pid_ns;
        if !comparable {
            return false;
        }
        match proc_stat(&self.pid.to_string()) {
            None => true,
            Some((state, ticks)) => {
                matches!(state, 'Z' | 'X') || self.start_ticks.is_some_and(|t| t != ticks)
            }
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} on host {}, pid {}, started {})",
            self.id(),
            self.purpose,
            self.host,
            self.pid,
            utc(self.started_unix_ms)
        )
    }
}

/// The contents of `<run>/lease.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub format: u32,
    pub run: String,
    pub owner: Owner,
    pub acquired_unix_ms: u64,
    pub renewed_unix_ms: u64,
    /// The holder's own expiry: a taker waits at least this long too.
    pub expiry_ms: u64,
}

impl LeaseRecord {
    /// Milliseconds since the last renewal by the reader's clock (0 when the holder's clock is
    /// ahead).
    pub fn age_ms(&self) -> u64 {
        now_ms().saturating_sub(self.renewed_unix_ms)
    }
}

/// A lease that cannot be taken, kept or read, naming the run, the store and the holder.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "{url}: run {run} already has a writer: {holder}; its lease {url}/{run}/lease.json was renewed {age_s:.1} s ago and expires {expiry_s:.0} s after its last renewal (stop that process, or wait until it stops renewing)"
    )]
    Held {
        url: String,
        run: String,
        holder: String,
        age_s: f64,
        expiry_s: f64,
    },
    #[error(
        "{url}: run {run}: the lease was taken over by {holder} (this process did not renew it within its expiry); it must stop writing checkpoints"
    )]
    Lost {
        url: String,
        run: String,
        holder: String,
    },
    #[error("{url}/{key}: {source}")]
    Store {
        url: String,
        key: String,
        source: object_store::Error,
    },
    #[error("{url}/{key}: {message}")]
    Corrupt {
        url: String,
        key: String,
        message: String,
    },
}

/// A held lease. Renew it at least every [`Lease::heartbeat`]; release it when done (a lease
/// dropped without release stays until it expires or its process is seen gone).
#[derive(Debug)]
pub struct Lease {
    store: Store,
    run: String,
    owner: Owner,
    expiry: Duration,
    acquired_unix_ms: u64,
}

/// What is stored at a lease key.
enum Found {
    Nothing,
    Record(LeaseRecord, UpdateVersion),
    /// Not a lease this build reads; its age in ms by the store's modification time.
    Unreadable(String, u64, UpdateVersion),
}

fn lease_key(run: &str) -> ObjPath {
    Store::key(&[run, "lease.json"])
}

impl Lease {
    /// Takes the lease of `run` for this process (see [`Lease::acquire_as`]).
    pub async fn acquire(
        store: &Store,
        run: &str,
        purpose: &str,
        expiry: Duration,
    ) -> Result<Lease, LeaseError> {
        Lease::acquire_as(store, run, Owner::this_process(purpose), expiry).await
    }

    /// Takes the lease of `run` for `owner`: granted when there is none, when it is `owner`'s
    /// own, when its last renewal is older than `expiry` (or the holder's own expiry, whichever
    /// is longer), or when its holder is a process of this machine that is gone. Otherwise
    /// [`LeaseError::Held`], naming the holder.
    pub async fn acquire_as(
        store: &Store,
        run: &str,
        owner: Owner,
        expiry: Duration,
    ) -> Result<Lease, LeaseError> {
        let lease = Lease {
            store: store.clone(),
            run: run.to_string(),
            owner,
            expiry,
            acquired_unix_ms: now_ms(),
        };
        // a round is lost only to a writer that changed the lease between our read and write
        for _ in 0..5 {
            let version = match lease.read().await? {
                Found::Nothing => None,
                Found::Record(r, v) => {
                    if r.owner != lease.owner {
                        let limit = lease.expiry.max(Duration::from_millis(r.expiry_ms));
                        let gone = r.owner.is_gone_here();
                        if r.age_ms() as u128 <= limit.as_millis() && !gone {
                            return Err(LeaseError::Held {
                                url: store.url.clone(),
                                run: run.to_string(),
                                holder: r.owner.to_string(),
                                age_s: r.age_ms() as f64 / 1e3,
                                expiry_s: limit.as_secs_f64(),
                            });
                        }
                        let why = if gone {
                            "its process is gone".to_string()
                        } else {
                            format!("not renewed for {:.1} s", r.age_ms() as f64 / 1e3)
                        };
                        tracing::warn!(
                            store = %store.url,
                            run,
                            "taking over the lease of run {run} from {} ({why})",
                            r.owner
                        );
                    }
                    Some(v)
                }
                Found::Unreadable(message, age_ms, v) => {
                    if age_ms as u128 <= lease.expiry.as_millis() {
                        return Err(lease.corrupt(format!(
                            "{message}; not a lease this build reads, written {:.1} s ago (taken over once older than {:.0} s)",
                            age_ms as f64 / 1e3,
                            lease.expiry.as_secs_f64()
                        )));
                    }
                    Some(v)
                }
            };
            match lease.write(version).await {
                Ok(()) => return Ok(lease),
                Err(LeaseError::Store {
                    source:
                        object_store::Error::AlreadyExists { .. }
                        | object_store::Error::Precondition { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(lease.corrupt("changed by another writer at every try; try again".into()))
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    /// How often to renew: a quarter of the expiry.
    pub fn heartbeat(&self) -> Duration {
        (self.expiry / 4).max(Duration::from_millis(10))
    }

    /// Renews the lease (a fresh `renewed` time). [`LeaseError::Lost`] when another holder has
    /// taken it over meanwhile.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        for _ in 0..3 {
            let version = match self.read().await? {
                // removed by hand: ours again, create-only
                Found::Nothing => None,
                Found::Record(r, v) if r.owner == self.owner => Some(v),
                Found::Record(r, _) => return Err(self.lost(r.owner.to_string())),
                Found::Unreadable(message, _, _) => return Err(self.corrupt(message)),
            };
            match self.write(version).await {
                Ok(()) => return Ok(()),
                Err(LeaseError::Store {
                    source:
                        object_store::Error::AlreadyExists { .. }
                        | object_store::Error::Precondition { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(self.lost("another writer".into()))
    }

    /// Gives the lease up (removes `<run>/lease.json` if it is still ours).
    pub async fn release(self) -> Result<(), LeaseError> {
        match self.read().await? {
            Found::Record(r, _) if r.owner == self.owner => {}
            Found::Record(r, _) => {
                tracing::warn!(
                    store = %self.store.url,
                    run = %self.run,
                    "not releasing the lease of run {}: it is held by {} now",
                    self.run,
                    r.owner
                );
                return Ok(());
            }
            _ => return Ok(()),
        }
        let key = lease_key(&self.run);
        match self.store.inner.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.store_err(source)),
        }
    }

    /// Runs `work` while renewing the lease every [`Lease::heartbeat`] (a long upload keeps its
    /// lease). Renewals that fail for want of the store are logged and tried again at the next
    /// beat; a lost lease stops the work (it is dropped) and is returned.
    pub async fn hold_while<F: std::future::Future>(
        &mut self,
        work: F,
    ) -> Result<F::Output, LeaseError> {
        let every = self.heartbeat();
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tokio::time::sleep(every) => match self.renew().await {
                    Ok(()) => {}
                    Err(e @ LeaseError::Lost { .. }) => return Err(e),
                    Err(e) => tracing::warn!("cannot renew the lease of run {}: {e}", self.run),
                },
            }
        }
    }

    async fn read(&self) -> Result<Found, LeaseError> {
        read(&self.store, &self.run).await
    }

    /// Writes our record: create-only when `version` is None, else replacing that version
    /// (conditional where the store supports it).
    async fn write(&self, version: Option<UpdateVersion>) -> Result<(), LeaseError> {
        let record = LeaseRecord {
            format: FORMAT,
            run: self.run.clone(),
            owner: self.owner.clone(),
            acquired_unix_ms: self.acquired_unix_ms,
            renewed_unix_ms: now_ms(),
            expiry_ms: self.expiry.as_millis() as u64,
        };
        let json = serde_json::to_vec_pretty(&record).expect("a lease serialises");
        let key = lease_key(&self.run);
        let put = |mode| {
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            self.store
                .inner
                .put_opts(&key, PutPayload::from(json.clone()), opts)
        };
        let result = match version {
            None => put(PutMode::Create).await,
            Some(v) if v.e_tag.is_some() || v.version.is_some() => {
                match put(PutMode::Update(v)).await {
                    // a local directory cannot compare-and-swap (see the module docs)
                    Err(object_store::Error::NotImplemented { .. }) => {
                        put(PutMode::Overwrite).await
                    }
                    r => r,
                }
            }
            Some(_) => put(PutMode::Overwrite).await,
        };
        result.map(|_| ()).map_err(|source| self.store_err(source))
    }

    fn store_err(&self, source: object_store::Error) -> LeaseError {
        LeaseError::Store {
            url: self.store.url.clone(),
            key: lease_key(&self.run).to_string(),
            source,
        }
    }

    fn corrupt(&self, message: String) -> LeaseError {
        LeaseError::Corrupt {
            url: self.store.url.clone(),
            key: lease_key(&self.run).to_string(),
            message,
        }
    }

    fn lost(&self, holder: String) -> LeaseError {
        LeaseError::Lost {
            url: self.store.url.clone(),
            run: self.run.clone(),
            holder,
        }
    }
}

async fn read(store: &Store, run: &str) -> Result<Found, LeaseError> {
    let key = lease_key(run);
    let err = |source| LeaseError::Store {
        url: store.url.clone(),
        key: key.to_string(),
        source,
    };
    let r = match store.inner.get(&key).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Ok(Found::Nothing),
        Err(source) => return Err(err(source)),
    };
    let version = UpdateVersion {
        e_tag: r.meta.e_tag.clone(),
        version: r.meta.version.clone(),
    };
    let modified_ms = r.meta.last_modified.timestamp_millis().max(0) as u64;
    let bytes = match r.bytes().await {
        Ok(b) => b,
        Err(object_store::Error::NotFound { .. }) => return Ok(Found::Nothing),
        Err(source) => return Err(err(source)),
    };
    let age = now_ms().saturating_sub(modified_ms);
    Ok(match serde_json::from_slice::<LeaseRecord>(&bytes) {
        Ok(rec) if rec.format == FORMAT && rec.run == run => Found::Record(rec, version),
        Ok(rec) => Found::Unreadable(
            format!("lease of run {} in format {}", rec.run, rec.format),
            age,
            version,
        ),
        Err(e) => Found::Unreadable(format!("not a lease: {e}"), age, version),
    })
}

/// The lease record of `run`, if there is one (for listings and `gc`).
pub async fn holder(store: &Store, run: &str) -> Result<Option<LeaseRecord>, LeaseError> {
    Ok(match read(store, run).await? {
        Found::Record(r, _) => Some(r),
        _ => None,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
        .or_else(|| read_trimmed("/etc/hostname"))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// State letter and start time (clock ticks since boot) of process `pid` from `/proc`.
fn proc_stat(pid: &str) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) may hold spaces and parentheses: fields resume after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // field 22 overall is starttime: the 20th after the command name
    let ticks = fields.get(19)?.parse().ok()?;
    Some((state, ticks))
}

/// This process's start (Unix ms) from `/proc` (boot time + start ticks at 100 Hz, Linux's
/// USER_HZ).
fn process_start_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let (_, ticks) = proc_stat("self")?;
    Some(btime * 1000 + ticks * 10)
}

/// `YYYY-MM-DD HH:MM:SS UTC` of a Unix time in ms.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil-from-days (Howard Hinnant's algorithm), days since 1970-01-01
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_767_225_599_000), "2025-12-31 23:59:59 UTC");
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_gone() {
        let me = Owner::this_process("train");
        assert!(!me.is_gone_here());
        assert!(me.id().contains(&format!(":{}:", std::process::id())));
        // a child that has exited and been reaped: its pid is gone (or, reused, names a process
        // that started at another tick)
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let ticks = proc_stat(&pid.to_string()).map(|s| s.1);
        let alive = Owner {
            pid,
            start_ticks: ticks,
            ..me.clone()
        };
        assert!(!alive.is_gone_here());
        child.kill().unwrap();
        child.wait().unwrap();
        let dead = alive;
        if me.boot_id.is_some() && me.pid_ns.is_some() {
            assert!(dead.is_gone_here(), "{dead:?}");
        }
        // another machine's process is never judged from here
        let elsewhere = Owner {
            host: "elsewhere".into(),
            ..dead
        };
        assert!(!elsewhere.is_gone_here());
    }
}
