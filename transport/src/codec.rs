//! The byte codec of frames: a fixed 56-byte little-endian header, written by `Writer` and read
//! back by `Reader`, which reports running out of bytes as `FrameError::Truncated`, never panics.
//!
//! Header layout (offsets in bytes, all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `PHXF` |
//! | 4 | 2 | version (1) |
//! | 6 | 1 | dtype: 1 F32, 2 BF16, 3 FP8 E4M3, 4 FP8 E5M2 |
//! | 7 | 1 | scale layout: 0 none, 1 1×128, 2 128×1, 3 128×128 |
//! | 8 | 1 | rank (number of dims, 1..=4) |
//! | 9 | 3 | reserved, zero |
//! | 12 | 4 | micro-batch |
//! | 16 | 8 | step |
//! | 24 | 4 | source |
//! | 28 | 4 | destination |
//! | 32 | 16 | dims, 4 × u32 (unused ones zero) |
//! | 48 | 8 | payload length in bytes |
//!
//! The payload follows, then a CRC32C of header + payload (u32).

use crate::error::FrameError;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"PHXF";
/// The header version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 56;
/// Bytes of the trailing checksum.
pub const CRC_LEN: usize = 4;
/// Most dims a frame's shape can have.
pub const MAX_RANK: usize = 4;

/// The header as it sits on the wire: fields are raw, `frame` gives them meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawHeader {
    pub version: u16,
    pub dtype: u8,
    pub layout: u8,
    pub rank: u8,
    pub micro_batch: u32,
    pub step: u64,
    pub source: u32,
    pub destination: u32,
    pub dims: [u32; MAX_RANK],
    pub payload_len: u64,
}

/// Appends little-endian fields to a byte buffer.
pub struct Writer<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut Vec<u8>) -> Writer<'a> {
        Writer { buf }
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// f32 values as little-endian IEEE bits.
    pub fn f32s(&mut self, v: &[f32]) {
        self.buf.reserve(v.len() * 4);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    /// u16 values (BF16 bits) little-endian.
    pub fn u16s(&mut self, v: impl IntoIterator<Item = u16>) {
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Reads little-endian fields from a byte slice; `what` names the part being read in errors.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, pos: 0, what }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(FrameError::Truncated {
                what: self.what,
                need: n as u64,
                have: have as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, FrameError> {
        self.array().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Result<u32, FrameError> {
        self.array().map(u32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Result<u64, FrameError> {
        self.array().map(u64::from_le_bytes)
    }
    /// `n` little-endian f32 values.
    pub fn f32s(&mut self, n: usize) -> Result<Vec<f32>, FrameError> {
        let b = self.take(n.checked_mul(4).ok_or(self.overflow())?)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    /// `n` little-endian u16 values.
    pub fn u16s(&mut self, n: usize) -> Result<Vec<u16>, FrameError> {
        let b = self.take(n.checked_mul(2).ok_or(self.overflow())?)?;
        Ok(b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect())
    }
    fn overflow(&self) -> FrameError {
        FrameError::Truncated {
            what: self.what,
            need: u64::MAX,
            have: (self.buf.len() - self.pos) as u64,
        }
    }
}

/// Appends the 56-byte header.
pub fn encode_header(h: &RawHeader, out: &mut Vec<u8>) {
    let mut w = Writer::new(out);
    w.bytes(&MAGIC);
    w.u16(h.version);
    w.u8(h.dtype);
    w.u8(h.layout);
    w.u8(h.rank);
    w.bytes(&[0; 3]);
    w.u32(h.micro_batch);
    w.u64(h.step);
    w.u32(h.source);
    w.u32(h.destination);
    for d in h.dims {
        w.u32(d);
    }
    w.u64(h.payload_len);
}

/// Reads the header at the start of `bytes`: checks the magic and the version, nothing else
/// (the checksum has not been verified yet, so field values are not trusted here).
pub fn decode_header(bytes: &[u8]) -> Result<RawHeader, FrameError> {
    if bytes.len() >= MAGIC.len() && bytes[..4] != MAGIC {
        let found = [bytes[0], bytes[1], bytes[2], bytes[3]];
        return Err(FrameError::BadMagic { found });
    }
    let mut r = Reader::new(bytes, "header");
    r.take(HEADER_LEN)?;
    let mut r = Reader::new(&bytes[..HEADER_LEN], "header");
    r.take(4)?;
    let version = r.u16()?;
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let (dtype, layout, rank) = (r.u8()?, r.u8()?, r.u8()?);
    r.take(3)?;
    let micro_batch = r.u32()?;
    let step = r.u64()?;
    let (source, destination) = (r.u32()?, r.u32()?);
    let mut dims = [0u32; MAX_RANK];
    for d in &mut dims {
        *d = r.u32()?;
    }
    let payload_len = r.u64()?;
    Ok(RawHeader {
        version,
        dtype,
        layout,
        rank,
        micro_batch,
        step,
        source,
        destination,
        dims,
        payload_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_at_fixed_offsets() {
        let h = RawHeader {
            version: VERSION,
            dtype: 3,
            layout: 1,
            rank: 2,
            micro_batch: 7,
            step: 0x0102_0304_0506_0708,
            source: 11,
            destination: 12,
            dims: [128, 4096, 0, 0],
            payload_len: 540_672,
        };
        let mut buf = Vec::new();
        encode_header(&h, &mut buf);
        assert_eq!(buf.len(), HEADER_LEN);
        assert_eq!(&buf[..4], b"PHXF");
        assert_eq!(buf[6], 3);
        assert_eq!(&buf[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&buf[36..40], &4096u32.to_le_bytes());
        assert_eq!(decode_header(&buf).unwrap(), h);
    }

    #[test]
    fn reader_reports_truncation() {
        let mut r = Reader::new(&[1, 2, 3], "payload");
        assert_eq!(r.u16().unwrap(), 0x0201);
        let e = r.u32().unwrap_err();
        assert_eq!(
            e,
            FrameError::Truncated {
                what: "payload",
                need: 4,
                have: 1
            }
        );
        assert!(Reader::new(&[0; 8], "x").f32s(usize::MAX).is_err());
    }
}
