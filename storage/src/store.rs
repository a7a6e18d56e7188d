//! Where checkpoints live: an object store opened from a URL (a directory or `file://DIR`,
//! `memory://`, `s3://`, `gs://`, `az://`), under the URL's path, and the runtime its API runs on.

use futures_util::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A store URL that cannot be opened, naming the URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {url}: {message}")]
    Unusable { url: String, message: String },
}

/// An opened object store. Keys are relative to the store's root.
#[derive(Clone, Debug)]
pub struct Store {
    pub url: String,
    pub inner: Arc<dyn ObjectStore>,
}

impl Store {
    /// Opens `url`: `file:///abs/dir`, `file://rel/dir` or a plain path (a local directory,
    /// created if missing), `memory://` (in this process only), or a cloud bucket with a key
    /// prefix, `s3://bucket/prefix` (any S3-compatible endpoint), `gs://…`, `az://…`, configured
    /// from the environment as object_store reads it (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`,
    /// `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, …).
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let prefixes = ["AWS_", "GOOGLE_", "AZURE_"];
        let env = std::env::vars()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.to_ascii_lowercase(), v));
        Store::open_with(url, env)
    }

    /// [`Store::open`] with the cloud options given (object_store's keys, e.g. `aws_endpoint`,
    /// `aws_access_key_id`, `aws_allow_http`) instead of read from the environment.
    pub fn open_with(
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Store, StoreError> {
        let unusable = |message: String| StoreError::Unusable {
            url: url.to_string(),
            message,
        };
        let inner: Arc<dyn ObjectStore> = match url.split_once("://") {
            Some(("memory", "")) => Arc::new(InMemory::new()),
            Some(("memory", _)) => return Err(unusable("memory:// takes no path".into())),
            Some(("file", dir)) => Arc::new(local(dir).map_err(unusable)?),
            Some(("s3" | "gs" | "az", _)) => cloud(url, options).map_err(unusable)?,
            Some((scheme, _)) => {
                return Err(unusable(format!(
                    "unknown scheme {scheme}:// (expected file://, memory://, s3://, gs:// or az://)"
                )));
            }
            None if url.is_empty() => return Err(unusable("empty store URL".into())),
            None => Arc::new(local(url).map_err(unusable)?),
        };
        Ok(Store {
            url: url.to_string(),
            inner,
        })
    }

    /// The key `a/b/c` from its parts.
    pub fn key(parts: &[&str]) -> ObjPath {
        ObjPath::from_iter(parts.iter().copied())
    }
}

/// A bucket store, narrowed to the URL's path.
fn cloud(
    url: &str,
    options: impl IntoIterator<Item = (String, String)>,
) -> Result<Arc<dyn ObjectStore>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if parsed.host_str().unwrap_or("").is_empty() {
        return Err("names no bucket".into());
    }
    let (store, prefix) =
        object_store::parse_url_opts(&parsed, options).map_err(|e| e.to_string())?;
    let store: Arc<dyn ObjectStore> = Arc::from(store);
    Ok(if prefix.as_ref().is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    })
}

fn local(dir: &str) -> Result<LocalFileSystem, String> {
    if dir.is_empty() {
        return Err("file:// needs a directory".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create directory {dir}: {e}"))?;
    // fsync on: a shard must be on disk before its manifest is, or a power cut could leave a
    // committed checkpoint without its data (remote stores promise this by themselves)
    LocalFileSystem::new_with_prefix(dir)
        .map(|fs| fs.with_fsync(true))
        .map_err(|e| e.to_string())
}

/// Runs one future of the store's async API to completion on a current-thread runtime (with the
/// timers and sockets the cloud clients need). Call it
/// from a plain thread (the trainer's loop, a test, a background uploader), never from a task.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime needs no resources that can be missing")
        .block_on(f)
}

/// A store that fails on purpose: the next `n` writes (puts and multipart uploads) or reads
/// (gets) whose key contains a given text fail with a generic (transient-looking) error before
/// reaching the wrapped store. For tests of retries, fallbacks and missed checkpoints.
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    only: String,
    writes: AtomicUsize,
    reads: AtomicUsize,
    failed: AtomicUsize,
    /// Every request fails until then (an outage of the whole store).
    down_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Faulty {
    /// Wraps `store`; only keys containing `only` can fail (`""`: every key). Returns the wrapped
    /// store (same URL) and the handle that arms the failures.
    pub fn wrap(store: &Store, only: &str) -> (Store, Arc<Faulty>) {
        let faulty = Arc::new(Faulty {
            inner: store.inner.clone(),
            only: only.to_string(),
            writes: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            down_until: std::sync::Mutex::new(None),
        });
        let wrapped = Store {
            url: store.url.clone(),
            inner: faulty.clone(),
        };
        (wrapped, faulty)
    }

    /// The next `n` matching writes fail.
    pub fn fail_writes(&self, n: usize) {
        self.writes.store(n, Ordering::SeqCst);
    }

    /// The next `n` matching reads fail.
    pub fn fail_reads(&self, n: usize) {
        self.reads.store(n, Ordering::SeqCst);
    }

    /// Every request (any key: reads, writes, lists, copies, deletes) fails for `d` from now.
    pub fn outage(&self, d: std::time::Duration) {
        if let Ok(mut until) = self.down_until.lock() {
            *until = Some(std::time::Instant::now() + d);
        }
    }

    fn down(&self, op: &str, key: &str) -> object_store::Result<()> {
        let down = self
            .down_until
            .lock()
            .ok()
            .and_then(|u| *u)
            .is_some_and(|t| std::time::Instant::now() < t);
        if !down {
            return Ok(());
        }
        self.failed.fetch_add(1, Ordering::SeqCst);
        Err(object_store::Error::Generic {
            store: "Faulty",
            source: format!("store outage (injected): {op} {key}").into(),
        })
    }

    /// How many requests failed on purpose so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    fn trip(&self, counter: &AtomicUsize, op: &str, key: &ObjPath) -> object_store::Result<()> {
        self.down(op, key.as_ref())?;
        if !key.as_ref().contains(&self.only) {
            return Ok(());
        }
        let armed = counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !armed {
            return Ok(());
        }
        self.failed.fetch_add(1, Ordering::SeqCst);
        Err(object_store::Error::Generic {
            store: "Faulty",
            source: format!("injected failure of {op} {key}").into(),
        })
    }
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.trip(&self.writes, "put", location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.trip(&self.writes, "multipart upload", location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.trip(&self.reads, "get", location)?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        if let Err(e) = self.down("delete", "") {
            return Box::pin(futures_util::stream::once(async move { Err(e) }));
        }
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if let Err(e) = self.down("list", prefix.map_or("", |p| p.as_ref())) {
            return Box::pin(futures_util::stream::once(async move { Err(e) }));
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        self.down("list", prefix.map_or("", |p| p.as_ref()))?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.down("copy", from.as_ref())?;
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let dir = std::env::temp_dir().join(format!("phalanx-store-{}", std::process::id()));
        let d = dir.to_str().unwrap();
        assert!(Store::open(d).is_ok());
        assert!(Store::open(&format!("file://{d}")).is_ok());
        assert!(Store::open("memory://").is_ok());
        for (url, says) in [
            ("s3:///x", "names no bucket"),
            ("ftp://x", "unknown scheme ftp://"),
            ("memory://x", "takes no path"),
            ("", "empty store URL"),
            ("file://", "needs a directory"),
        ] {
            let e = Store::open(url).unwrap_err().to_string();
            assert!(e.contains(says) && e.starts_with("store "), "{url}: {e}");
        }
    }
}
