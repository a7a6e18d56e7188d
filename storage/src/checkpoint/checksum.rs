//! Shard checksums. This build writes CRC-64/NVME (S3's default integrity checksum; computed at
//! tens of GB/s, so hashing a shard while it streams out costs the upload nothing) and still
//! checks the SHA-256 that manifests of earlier builds carry.

use super::ShardEntry;
use sha2::{Digest, Sha256};

/// A running checksum of one of the two kinds.
pub enum Checksum {
    Crc64(Box<crc_fast::Digest>),
    Sha256(Box<Sha256>),
}

impl Checksum {
    /// The kind this build writes.
    pub fn new() -> Checksum {
        Checksum::Crc64(Box::new(crc_fast::Digest::new(
            crc_fast::CrcAlgorithm::Crc64Nvme,
        )))
    }

    /// The kind `shard`'s manifest entry carries (CRC-64/NVME when it has both).
    pub fn for_entry(shard: &ShardEntry) -> Checksum {
        if shard.crc64nvme.is_empty() && !shard.sha256.is_empty() {
            Checksum::Sha256(Box::default())
        } else {
            Checksum::new()
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Checksum::Crc64(d) => d.update(bytes),
            Checksum::Sha256(h) => h.update(bytes),
        }
    }

    /// The checksum as lowercase hex.
    pub fn finish(self) -> String {
        match self {
            Checksum::Crc64(d) => format!("{:016x}", d.finalize()),
            Checksum::Sha256(h) => super::hex(&h.finalize()),
        }
    }

    /// Its name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Checksum::Crc64(_) => "CRC-64/NVME",
            Checksum::Sha256(_) => "SHA-256",
        }
    }
}

impl Default for Checksum {
    fn default() -> Checksum {
        Checksum::new()
    }
}

impl ShardEntry {
    /// The checksum the manifest gives for this shard, of the kind [`Checksum::for_entry`] makes.
    pub fn checksum(&self) -> &str {
        if self.crc64nvme.is_empty() {
            &self.sha256
        } else {
            &self.crc64nvme
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kinds_and_their_known_values() {
        // the CRC-64/NVME check value: "123456789"
        let mut c = Checksum::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), "ae8b14860a799888");
        let old = ShardEntry {
            key: "k".into(),
            bytes: 3,
            sha256: "x".into(),
            crc64nvme: String::new(),
            tensors: vec![],
        };
        let mut s = Checksum::for_entry(&old);
        assert_eq!(s.name(), "SHA-256");
        s.update(b"abc");
        assert_eq!(
            s.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(old.checksum(), "x");
    }
}
