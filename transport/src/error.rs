//! The vocabulary shared by `codec` and `frame`: `FrameError` (what can be wrong with a frame's
//! bytes) and `Dtype` (the element type a header names, with its wire byte). It sits below both
//! so the import arrow runs one way: error <- codec <- frame.

/// Everything that can be wrong with a frame, each naming what it found.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {found:02x?}: not a phalanx frame (frames start with \"PHXF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported frame version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("truncated frame: the {what} needs {need} bytes but only {have} are present")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("frame has {extra} bytes after its checksum")]
    TrailingBytes { extra: u64 },
    #[error("bad checksum: frame carries crc32c {stored:#010x}, its bytes give {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("unknown dtype byte {0} (known: 1 F32, 2 BF16, 3 FP8 E4M3, 4 FP8 E5M2)")]
    UnknownDtype(u8),
    #[error("unknown scale layout byte {0} (known: 0 none, 1 1x128, 2 128x1, 3 128x128)")]
    UnknownScaleLayout(u8),
    #[error("dtype {dtype:?} with scale layout byte {layout}: FP8 needs a layout, F32/BF16 none")]
    LayoutMismatch { dtype: Dtype, layout: u8 },
    #[error("rank {0} out of range (1..=4 dims)")]
    BadRank(u8),
    #[error("dim {0} does not fit the header's u32 dims")]
    DimTooLarge(u64),
    #[error("shape {shape:?} of {dtype:?} needs {expected} payload bytes, the frame has {actual}")]
    ShapeMismatch {
        shape: Vec<u64>,
        dtype: Dtype,
        expected: u64,
        actual: u64,
    },
}

/// The element type of a frame's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
    Fp8E4m3,
    Fp8E5m2,
}

impl Dtype {
    /// The dtype byte of the frame header.
    pub(crate) fn code(self) -> u8 {
        match self {
            Dtype::F32 => 1,
            Dtype::Bf16 => 2,
            Dtype::Fp8E4m3 => 3,
            Dtype::Fp8E5m2 => 4,
        }
    }
    /// The dtype a header byte names, or `UnknownDtype`.
    pub(crate) fn from_code(c: u8) -> Result<Dtype, FrameError> {
        match c {
            1 => Ok(Dtype::F32),
            2 => Ok(Dtype::Bf16),
            3 => Ok(Dtype::Fp8E4m3),
            4 => Ok(Dtype::Fp8E5m2),
            _ => Err(FrameError::UnknownDtype(c)),
        }
    }
}
