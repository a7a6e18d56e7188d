//! The on-disk cache of compiled kernels: one cubin per (source text, architecture, NVRTC
//! options, NVRTC version), so that a process that opens the device again (the next run, a
//! restarted worker) loads the cubins instead of compiling every source again.
//!
//! Where: `PHALANX_KERNEL_CACHE` (a directory; `off` disables the cache), else
//! `$XDG_CACHE_HOME/phalanx/kernels`, else `$HOME/.cache/phalanx/kernels`. A file is
//! `<source>-<key prefix>.cubin`: a header (magic, the full key, the cubin's length and SHA-256),
//! then the cubin, written to a temporary file and renamed into place, so a reader sees a whole
//! file or none. A file that is missing, truncated, corrupt or made for another key is a miss.
//! Reading or writing the cache never fails a run: a miss compiles as without the cache.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"PHXKRNL1";

/// A directory of compiled kernels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCache {
    pub dir: PathBuf,
}

impl KernelCache {
    pub fn at(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: dir.into() }
    }

    /// The cache the environment names (see the module doc), or None when it is off or no
    /// directory can be named.
    pub fn from_env() -> Option<KernelCache> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(v) = var("PHALANX_KERNEL_CACHE") {
            return (v != "off").then(|| KernelCache::at(v));
        }
        let base = var("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))?;
        Some(KernelCache::at(base.join("phalanx").join("kernels")))
    }

    /// The key of one compilation: SHA-256 over everything that decides the cubin, in hex.
    pub fn key(
        name: &str,
        source: &str,
        arch: &str,
        options: &[String],
        nvrtc: (i32, i32),
    ) -> String {
        let mut h = Sha256::new();
        for part in [name, source, arch] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        for o in options {
            h.update((o.len() as u64).to_le_bytes());
            h.update(o.as_bytes());
        }
        h.update(nvrtc.0.to_le_bytes());
        h.update(nvrtc.1.to_le_bytes());
        hex(&h.finalize())
    }

    pub fn path(&self, name: &str, key: &str) -> PathBuf {
        self.dir
            .join(format!("{name}-{}.cubin", &key[..16.min(key.len())]))
    }

    /// The cubin stored under `key`, if a whole and matching one is there.
    pub fn load(&self, name: &str, key: &str) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path(name, key)).ok()?;
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (stored_key, rest) = rest.split_at_checked(64)?;
        if stored_key != key.as_bytes() {
            return None;
        }
        let (len, rest) = rest.split_at_checked(8)?;
        let len = u64::from_le_bytes(len.try_into().ok()?) as usize;
        let (sum, cubin) = rest.split_at_checked(32)?;
        (cubin.len() == len && Sha256::digest(cubin).as_slice() == sum).then(|| cubin.to_vec())
    }

    /// Stores `cubin` under `key` (temporary file, then rename).
    pub fn store(&self, name: &str, key: &str, cubin: &[u8]) -> std::io::Result<()> {
        if key.len() != 64 {
            return Err(std::io::Error::other(format!(
                "a kernel cache key is 64 hex digits, not {key:?}"
            )));
        }
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(name, key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut out = Vec::with_capacity(MAGIC.len() + 104 + cubin.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(cubin));
        out.extend_from_slice(cubin);
        std::fs::write(&tmp, &out)?;
        std::fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> KernelCache {
        let dir = std::env::temp_dir().join(format!("phalanx-kcache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        KernelCache::at(dir)
    }

    fn key(source: &str) -> String {
        KernelCache::key("rope", source, "sm_90", &["--fmad=false".into()], (13, 0))
    }

    #[test]
    fn a_stored_cubin_loads_back_under_its_key_only() {
        let c = scratch("roundtrip");
        let (k, cubin) = (key("a"), vec![1u8, 2, 3, 250]);
        assert_eq!(c.load("rope", &k), None, "an empty cache misses");
        c.store("rope", &k, &cubin).unwrap();
        assert_eq!(c.load("rope", &k), Some(cubin));
        // another source, arch, option or compiler version is another key
        let others = [
            key("b"),
            KernelCache::key("rope", "a", "sm_100", &["--fmad=false".into()], (13, 0)),
            KernelCache::key("rope", "a", "sm_90", &[], (13, 0)),
            KernelCache::key("rope", "a", "sm_90", &["--fmad=false".into()], (13, 1)),
        ];
        for o in &others {
            assert_ne!(o, &k);
        }
        assert_eq!(c.load("rope", &others[0]), None);
        let _ = std::fs::remove_dir_all(&c.dir);
    }

    #[test]
    fn damaged_files_are_misses_and_are_replaced() {
        let c = scratch("damaged");
        let (k, cubin) = (key("a"), vec![7u8; 100]);
        c.store("rope", &k, &cubin).unwrap();
        let path = c.path("rope", &k);
        let whole = std::fs::read(&path).unwrap();
        // truncated
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert_eq!(c.load("rope", &k), None);
        // one byte of the cubin flipped
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(c.load("rope", &k), None);
        // not a cache file at all
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(c.load("rope", &k), None);
        // storing again repairs it, and no temporary file is left behind
        c.store("rope", &k, &cubin).unwrap();
        assert_eq!(c.load("rope", &k), Some(cubin));
        let names: Vec<_> = std::fs::read_dir(&c.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let _ = std::fs::remove_dir_all(&c.dir);
    }

    #[test]
    fn a_cache_that_cannot_be_written_says_why() {
        let c = scratch("blocked");
        // the cache directory's place is taken by a file
        std::fs::write(&c.dir, b"a file").unwrap();
        assert!(c.store("rope", &key("a"), &[1]).is_err());
        assert_eq!(c.load("rope", &key("a")), None);
        let _ = std::fs::remove_file(&c.dir);
        assert!(c.store("rope", "short", &[1]).is_err());
    }
}
