//! Where checkpoints live: an object store opened from a URL (`file://DIR` or a plain directory,
//! `memory://`), with a key prefix, and the small runtime its async API runs on.

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use std::sync::Arc;

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
    /// created if missing), or `memory://` (in this process only). Cloud schemes (`s3://`,
    /// `gs://`, `az://`) are refused by name: this build has no cloud client compiled in.
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let unusable = |message: String| StoreError::Unusable {
            url: url.to_string(),
            message,
        };
        let inner: Arc<dyn ObjectStore> = match url.split_once("://") {
            Some(("memory", "")) => Arc::new(InMemory::new()),
            Some(("memory", _)) => return Err(unusable("memory:// takes no path".into())),
            Some(("file", dir)) => Arc::new(local(dir).map_err(unusable)?),
            Some((scheme @ ("s3" | "gs" | "az" | "http" | "https"), _)) => {
                return Err(unusable(format!(
                    "{scheme}:// stores are not built into this binary yet; use file:// or a directory"
                )));
            }
            Some((scheme, _)) => {
                return Err(unusable(format!(
                    "unknown scheme {scheme}:// (expected file:// or memory://)"
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

fn local(dir: &str) -> Result<LocalFileSystem, String> {
    if dir.is_empty() {
        return Err("file:// needs a directory".into());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create directory {dir}: {e}"))?;
    LocalFileSystem::new_with_prefix(dir).map_err(|e| e.to_string())
}

/// Runs one future of the store's async API to completion on a current-thread runtime. Call it
/// from a plain thread (the trainer's loop, a test, a background uploader), never from a task.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime needs no resources that can be missing")
        .block_on(f)
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
            ("s3://bucket/x", "s3:// stores are not built"),
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
