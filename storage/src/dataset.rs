//! Training data: the built-in synthetic corpus and memory-mapped token files (raw text as bytes,
//! little-endian u16/u32 `.bin` as in nanoGPT/llm.c), split into train and held-out eval windows.

use kernels::rng::Rng;
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// How to read a `--data` file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// By extension: `.txt` text, `.u32` u32, `.bin`/`.u16` u16 (llm.c header detected).
    Auto,
    /// Raw bytes, one token per byte (byte-level; vocab ≥ 256).
    Text,
    U16,
    U32,
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataFormat::Auto => "auto",
            DataFormat::Text => "text",
            DataFormat::U16 => "u16",
            DataFormat::U32 => "u32",
        })
    }
}

impl std::str::FromStr for DataFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DataFormat::Auto),
            "text" => Ok(DataFormat::Text),
            "u16" => Ok(DataFormat::U16),
            "u32" => Ok(DataFormat::U32),
            _ => Err(format!(
                "unknown data format {s:?} (expected auto, text, u16 or u32)"
            )),
        }
    }
}

/// A data file that cannot be used, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("data file {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

enum Tokens {
    Memory(Vec<u32>),
    Mapped {
        map: Mmap,
        offset: usize,
        width: usize,
        len: usize,
    },
}

impl Tokens {
    fn len(&self) -> usize {
        match self {
            Tokens::Memory(v) => v.len(),
            Tokens::Mapped { len, .. } => *len,
        }
    }

    fn get(&self, i: usize) -> u32 {
        match self {
            Tokens::Memory(v) => v[i],
            Tokens::Mapped {
                map, offset, width, ..
            } => {
                let at = offset + i * width;
                match width {
                    1 => map[at] as u32,
                    2 => u16::from_le_bytes([map[at], map[at + 1]]) as u32,
                    _ => u32::from_le_bytes([map[at], map[at + 1], map[at + 2], map[at + 3]]),
                }
            }
        }
    }
}

/// A token stream with a train part and a held-out part.
pub struct Dataset {
    tokens: Tokens,
    train_len: usize,
    pub description: String,
    /// Training steps whose batch is a pathological one (see [`Dataset::poison`]).
    poisoned: std::collections::BTreeSet<u64>,
    /// The largest token id + 1 the model accepts.
    vocab: usize,
}

/// llm.c's `.bin` header: 256 little-endian i32, magic 20240520, version 1 (u16) or 2 (u32).
const LLMC_MAGIC: u32 = 20240520;
const LLMC_HEADER_BYTES: usize = 256 * 4;

impl Dataset {
    /// The built-in synthetic corpus (see `synthetic_stream`), `train_tokens` for training plus a
    /// held-out stream drawn from the same process with another seed.
    pub fn synthetic(vocab: usize, seed: u64, train_tokens: usize) -> Dataset {
        let eval_tokens = (train_tokens / 32).max(1 << 14);
        let mut v = synthetic_stream(vocab, seed, train_tokens, "train");
        v.extend(synthetic_stream(vocab, seed, eval_tokens, "eval"));
        Dataset {
            tokens: Tokens::Memory(v),
            train_len: train_tokens,
            description: format!(
                "synthetic corpus ({train_tokens} train + {eval_tokens} held-out tokens, vocab {})",
                vocab.min(SYNTH_VOCAB_CAP)
            ),
            poisoned: Default::default(),
            vocab,
        }
    }

    /// Memory-maps a token file; every token is checked against `vocab`. The last 5% is held out.
    pub fn open(path: &Path, format: DataFormat, vocab: usize) -> Result<Dataset, DataError> {
        let io = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |message: String| DataError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only; phalanx never writes to data files while training.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let format = match format {
            DataFormat::Auto => match ext {
                "u32" => DataFormat::U32,
                "bin" | "u16" => DataFormat::U16,
                _ => DataFormat::Text,
            },
            f => f,
        };
        let (mut offset, mut width) = match format {
            DataFormat::Text => (0, 1),
            DataFormat::U16 => (0, 2),
            _ => (0, 4),
        };
        if format != DataFormat::Text
            && map.len() >= LLMC_HEADER_BYTES
            && u32::from_le_bytes(map[..4].try_into().unwrap()) == LLMC_MAGIC
        {
            let version = u32::from_le_bytes(map[4..8].try_into().unwrap());
            width = match version {
                1 => 2,
                2 => 4,
                v => return Err(invalid(format!("llm.c header has unknown version {v}"))),
            };
            offset = LLMC_HEADER_BYTES;
        }
        let body = map.len() - offset;
        if body % width != 0 {
            return Err(invalid(format!(
                "{body} bytes is not a whole number of {width}-byte tokens"
            )));
        }
        let len = body / width;
        if format == DataFormat::Text && vocab < 256 {
            return Err(invalid(format!(
                "text is read as bytes (256 token ids) but the model's vocab_size is {vocab}"
            )));
        }
        let tokens = Tokens::Mapped {
            map,
            offset,
            width,
            len,
        };
        for i in 0..len {
            let t = tokens.get(i);
            if t as usize >= vocab {
                return Err(invalid(format!(
                    "token {t} at position {i} is outside the vocabulary (vocab_size {vocab})"
                )));
            }
        }
        let train_len = len - len / 20;
        Ok(Dataset {
            tokens,
            train_len,
            description: format!(
                "{} ({len} tokens of {width} byte(s); last {} held out)",
                path.display(),
                len - train_len
            ),
            poisoned: Default::default(),
            vocab,
        })
    }

    pub fn train_len(&self) -> usize {
        self.train_len
    }

    pub fn eval_len(&self) -> usize {
        self.tokens.len() - self.train_len
    }

    /// `batch` windows of `seq + 1` tokens for training step `step` (1-based), at offsets drawn
    /// from a stream seeded by (seed, step): any step can be reproduced on its own.
    pub fn train_batch(
        &self,
        seed: u64,
        step: u64,
        batch: usize,
        seq: usize,
    ) -> Result<Vec<u32>, String> {
        let w = seq + 1;
        if self.train_len < w {
            return Err(format!(
                "the training split has {} tokens, fewer than one window of {w}",
                self.train_len
            ));
        }
        if self.poisoned.contains(&step) {
            // one token repeated: the last id, which neither corpus kind is made of
            return Ok(vec![self.vocab.saturating_sub(1) as u32; batch * w]);
        }
        let mut rng = Rng::stream(seed ^ step.wrapping_mul(0x9E37_79B9), "data");
        let mut out = Vec::with_capacity(batch * w);
        for _ in 0..batch {
            let start = rng.below((self.train_len - w + 1) as u64) as usize;
            out.extend((start..start + w).map(|i| self.tokens.get(i)));
        }
        Ok(out)
    }

    /// Makes step `step`'s training batch a pathological one, every token the last id of the
    /// vocabulary (a bad data shard, the usual cause of a loss spike): `--inject`'s `loss_spike`.
    pub fn poison(&mut self, step: u64) {
        self.poisoned.insert(step);
    }

    /// The i-th held-out batch: consecutive non-overlapping windows from the start of the eval split.
    pub fn eval_batch(&self, i: usize, batch: usize, seq: usize) -> Option<Vec<u32>> {
        let w = seq + 1;
        let start = self.train_len + i * batch * w;
        if start + batch * w > self.tokens.len() {
            return None;
        }
        Some(
            (start..start + batch * w)
                .map(|j| self.tokens.get(j))
                .collect(),
        )
    }

    /// Every token of the whole file, in order (for evaluating a model over a file).
    pub fn all_tokens(&self) -> Vec<u32> {
        (0..self.tokens.len()).map(|i| self.tokens.get(i)).collect()
    }
}

const SYNTH_VOCAB_CAP: usize = 512;

/// The synthetic corpus: documents of 64–512 tokens. Each document picks one of 8 "topics"; a topic
/// is a sparse order-1 Markov chain in which every token has 4 successors with probabilities
/// 0.5/0.25/0.15/0.1. With probability 0.03 per position the next 8 tokens instead copy a phrase seen
/// earlier in the document (an induction pattern only attention can learn). Documents are separated
/// by token 0. Uniform guessing costs ln(V); the Markov part alone has entropy ≈ 1.2 nats.
pub fn synthetic_stream(vocab: usize, seed: u64, len: usize, split: &str) -> Vec<u32> {
    let v = vocab.clamp(2, SYNTH_VOCAB_CAP) as u64;
    let topics = 8;
    // the grammar depends on the seed only, not on the split
    let mut g = Rng::stream(seed, "synthetic-grammar");
    let succ: Vec<u32> = (0..topics * v as usize * 4)
        .map(|_| 1 + g.below(v - 1) as u32)
        .collect();
    let mut rng = Rng::stream(seed, split);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        out.push(0);
        let topic = rng.below(topics as u64) as usize;
        let doc_len = 64 + rng.below(449) as usize;
        let start = out.len();
        let mut cur = 1 + rng.below(v - 1) as u32;
        while out.len() - start < doc_len && out.len() < len {
            let here = out.len() - start;
            if here >= 16 && rng.uniform() < 0.03 {
                let from = start + rng.below((here - 8) as u64) as usize;
                for j in 0..8 {
                    let t = out[from + j];
                    out.push(t);
                }
                cur = *out.last().unwrap();
                continue;
            }
            let r = rng.uniform();
            let pick = if r < 0.5 {
                0
            } else if r < 0.75 {
                1
            } else if r < 0.9 {
                2
            } else {
                3
            };
            cur = succ[((topic * v as usize) + cur as usize) * 4 + pick];
            out.push(cur);
        }
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_in_vocab() {
        let a = synthetic_stream(512, 1, 10_000, "train");
        assert_eq!(a, synthetic_stream(512, 1, 10_000, "train"));
        assert_ne!(a, synthetic_stream(512, 2, 10_000, "train"));
        assert_ne!(a, synthetic_stream(512, 1, 10_000, "eval"));
        assert!(a.iter().all(|&t| t < 512));
        let small = synthetic_stream(64, 1, 1000, "train");
        assert!(small.iter().all(|&t| t < 64));
    }

    #[test]
    fn synthetic_has_structure() {
        // successors of a token are concentrated: the most frequent bigram continuation of token
        // `x` is far above the uniform 1/V share.
        let s = synthetic_stream(512, 3, 200_000, "train");
        let mut counts = std::collections::BTreeMap::<(u32, u32), u32>::new();
        for w in s.windows(2) {
            *counts.entry((w[0], w[1])).or_default() += 1;
        }
        let distinct = counts.len();
        assert!(
            distinct < 512 * 60,
            "{distinct} distinct bigrams: too close to uniform"
        );
    }

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("phalanx-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn token_files() {
        let toks: Vec<u32> = (0..100).map(|i| i % 50).collect();
        let bytes: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
        let p = tmp("a.u32", &bytes);
        let d = Dataset::open(&p, DataFormat::Auto, 64).unwrap();
        assert_eq!(d.all_tokens(), toks);
        assert_eq!(d.train_len() + d.eval_len(), 100);
        let e = Dataset::open(&p, DataFormat::Auto, 40)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("a.u32") && e.contains("token 40 at position 40"),
            "{e}"
        );
        let b16: Vec<u8> = toks
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect();
        let p = tmp("a.bin", &b16);
        assert_eq!(
            Dataset::open(&p, DataFormat::Auto, 64)
                .unwrap()
                .all_tokens(),
            toks
        );
        let p = tmp("odd.u32", &bytes[..7]);
        assert!(
            Dataset::open(&p, DataFormat::Auto, 64)
                .err()
                .unwrap()
                .to_string()
                .contains("whole number")
        );
        let p = tmp("t.txt", b"hello");
        assert_eq!(
            Dataset::open(&p, DataFormat::Auto, 256)
                .unwrap()
                .all_tokens(),
            b"hello".iter().map(|&b| b as u32).collect::<Vec<_>>()
        );
        let missing = Dataset::open(Path::new("/nonexistent/x.bin"), DataFormat::Auto, 64)
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("/nonexistent/x.bin"), "{missing}");
    }

    #[test]
    fn llmc_header_is_skipped() {
        let mut bytes = vec![0u8; LLMC_HEADER_BYTES];
        bytes[..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        for t in [5u16, 6, 7] {
            bytes.extend(t.to_le_bytes());
        }
        let p = tmp("h.bin", &bytes);
        assert_eq!(
            Dataset::open(&p, DataFormat::Auto, 64)
                .unwrap()
                .all_tokens(),
            vec![5, 6, 7]
        );
    }
}
