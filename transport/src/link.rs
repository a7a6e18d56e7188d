//! Links: moving framed messages between numbered peers. Owns the link envelope (the bytes a
//! link carries around a caller's payload), the `Link` trait every link implements, and the
//! in-process link (bounded per-peer queues on std `Mutex` + `Condvar`, no async runtime).
//!
//! Envelope layout (offsets in bytes, integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `PHXL` |
//! | 4 | 2 | version (1) |
//! | 6 | 4 | sender peer id |
//! | 10 | 4 | tag: the message kind, chosen by the caller |
//! | 14 | 4 | payload length in bytes |
//! | 18 | len | payload (for tensors: an encoded `Frame`) |
//! | 18+len | 4 | CRC32C of everything before it |
//!
//! `decode_envelope` checks, in order: magic, version, payload length against the limit, total
//! length (truncated / trailing bytes), checksum. Every malformed input is an error naming what
//! it found; nothing panics.
//!
//! **Fault injection.** `Link::send` takes the envelope already encoded and does not re-check
//! it, so a test can encode with `encode_envelope`, flip or cut bytes, and send the result: the
//! receiver decodes it, refuses it (`Received::Refused`) and counts it in `LinkStats::refused`,
//! exactly as it would a frame damaged on a wire. `Link::send_message` is the ordinary path
//! (encode with this endpoint as sender, then send).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The four bytes every envelope starts with.
pub const MAGIC: [u8; 4] = *b"PHXL";
/// The envelope version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes in front of the payload: magic, version, sender, tag, length.
pub const HEADER_LEN: usize = 18;
/// Bytes of the trailing checksum.
pub const CRC_LEN: usize = 4;
/// Bytes an envelope adds to its payload.
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + CRC_LEN;
/// The payload limit a network gets unless its config says otherwise: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 20;

/// Everything that can go wrong on a link, each naming what it found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("bad magic {found:02x?}: not a phalanx link envelope (envelopes start with \"PHXL\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported envelope version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("payload of {len} bytes is over this link's limit of {max} bytes")]
    PayloadTooLarge { len: u64, max: u64 },
    #[error("truncated envelope: the {what} needs {need} bytes but only {have} are present")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("envelope has {extra} bytes after its checksum")]
    TrailingBytes { extra: u64 },
    #[error(
        "bad checksum: envelope carries crc32c {stored:#010x}, its bytes give {computed:#010x}"
    )]
    BadChecksum { stored: u32, computed: u32 },
    #[error("back-pressure: peer {peer}'s queue stayed full ({capacity} messages) for {waited:?}")]
    Backpressure {
        peer: usize,
        capacity: usize,
        waited: Duration,
    },
    #[error("unknown peer {peer}: this network has peers 0..{peers}")]
    UnknownPeer { peer: usize, peers: usize },
    #[error("peer {peer} is closed: its endpoint was dropped or cannot be reached")]
    PeerClosed { peer: usize },
    #[error("refused as a stale incarnation: {reason}")]
    Stale { reason: String },
    #[error("invalid link config: {field} = {value}: {why}")]
    InvalidConfig {
        field: &'static str,
        value: u64,
        why: &'static str,
    },
}

/// A decoded envelope borrowing its payload from the bytes it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub sender: u32,
    pub tag: u32,
    pub payload: &'a [u8],
}

/// Wraps `payload` in an envelope from `sender` with message kind `tag`. Fails only if the
/// payload does not fit the u32 length field.
pub fn encode_envelope(sender: u32, tag: u32, payload: &[u8]) -> Result<Vec<u8>, LinkError> {
    let Ok(len) = u32::try_from(payload.len()) else {
        return Err(LinkError::PayloadTooLarge {
            len: payload.len() as u64,
            max: u32::MAX as u64,
        });
    };
    let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&sender.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Little-endian u16 at `at`; the caller has checked that `bytes` is long enough.
fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Little-endian u32 at `at`; the caller has checked that `bytes` is long enough.
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses and verifies one envelope occupying all of `bytes`, refusing payloads longer than
/// `max_payload`. Never panics.
pub fn decode_envelope(bytes: &[u8], max_payload: usize) -> Result<Envelope<'_>, LinkError> {
    let have = bytes.len() as u64;
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        let found = [bytes[0], bytes[1], bytes[2], bytes[3]];
        return Err(LinkError::BadMagic { found });
    }
    if bytes.len() < HEADER_LEN {
        return Err(LinkError::Truncated {
            what: "header",
            need: HEADER_LEN as u64,
            have,
        });
    }
    let version = le_u16(bytes, 4);
    if version != VERSION {
        return Err(LinkError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let (sender, tag, len) = (le_u32(bytes, 6), le_u32(bytes, 10), le_u32(bytes, 14));
    if len as u64 > max_payload as u64 {
        return Err(LinkError::PayloadTooLarge {
            len: len as u64,
            max: max_payload as u64,
        });
    }
    let need = len as u64 + ENVELOPE_OVERHEAD as u64;
    if have < need {
        return Err(LinkError::Truncated {
            what: "payload and checksum",
            need,
            have,
        });
    }
    if have > need {
        return Err(LinkError::TrailingBytes { extra: have - need });
    }
    let body = bytes.len() - CRC_LEN;
    let stored = le_u32(bytes, body);
    let computed = crc32c::crc32c(&bytes[..body]);
    if stored != computed {
        return Err(LinkError::BadChecksum { stored, computed });
    }
    Ok(Envelope {
        sender,
        tag,
        payload: &bytes[HEADER_LEN..body],
    })
}

/// A message a link delivered: who sent it, its kind, its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub sender: usize,
    pub tag: u32,
    pub payload: Vec<u8>,
}

/// What a receive produced: a message, or an envelope that failed decoding and was dropped
/// (counted in `LinkStats::refused`; the error says why).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    Message(Message),
    Refused(LinkError),
}

/// Counters of one endpoint. `sent`/`bytes_sent` count envelopes its peers' queues accepted;
/// `received` counts envelopes that decoded, `refused` those that did not (lost messages);
/// `bytes_received` counts the bytes of both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sent: u64,
    pub received: u64,
    pub refused: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Moving envelopes between numbered peers, seen from one peer (an endpoint).
pub trait Link: Send + Sync {
    /// This endpoint's peer id.
    fn me(&self) -> usize;

    /// How many peers the network has (ids `0..peers()`).
    fn peers(&self) -> usize;

    /// The largest payload this link carries, in bytes.
    fn max_payload(&self) -> usize;

    /// Queues already-encoded envelope `bytes` for peer `to`. Blocks while `to`'s queue is
    /// full, up to the link's send timeout, then fails with `Backpressure`. Fails with
    /// `UnknownPeer` / `PeerClosed` for a peer that does not exist or is gone, and with
    /// `PayloadTooLarge` if `bytes` is longer than an envelope of `max_payload()` bytes. The
    /// bytes are not checked otherwise: a tampered envelope travels and is refused on receipt.
    fn send(&self, to: usize, bytes: Vec<u8>) -> Result<(), LinkError>;

    /// Waits up to `timeout` for the next envelope addressed to this endpoint and decodes it.
    /// `Ok(None)` when nothing came; `Ok(Some(Received::Refused(e)))` for an envelope that did
    /// not decode. `Err` only when the link itself is broken.
    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Received>, LinkError>;

    /// This endpoint's counters so far.
    fn stats(&self) -> LinkStats;

    /// Encodes `payload` as an envelope from this endpoint with kind `tag` and sends it.
    fn send_message(&self, to: usize, tag: u32, payload: &[u8]) -> Result<(), LinkError> {
        let max = self.max_payload();
        if payload.len() > max {
            return Err(LinkError::PayloadTooLarge {
                len: payload.len() as u64,
                max: max as u64,
            });
        }
        let sender = u32::try_from(self.me()).map_err(|_| LinkError::InvalidConfig {
            field: "me",
            value: self.me() as u64,
            why: "peer ids must fit the envelope's u32 sender field",
        })?;
        self.send(to, encode_envelope(sender, tag, payload)?)
    }
}

/// Settings of one network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Envelopes a peer's queue holds before senders block (at least 1).
    pub capacity: usize,
    /// How long `send` waits on a full queue before `Backpressure`.
    pub send_timeout: Duration,
    /// Largest payload carried, enforced on send and on receive (at most u32::MAX).
    pub max_payload: usize,
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig {
            capacity: 64,
            send_timeout: Duration::from_secs(1),
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl LinkConfig {
    /// The default config with queues of `capacity` envelopes.
    pub fn with_capacity(capacity: usize) -> LinkConfig {
        LinkConfig {
            capacity,
            ..LinkConfig::default()
        }
    }

    fn validate(&self) -> Result<(), LinkError> {
        if self.capacity == 0 {
            return Err(LinkError::InvalidConfig {
                field: "capacity",
                value: 0,
                why: "a queue must hold at least one envelope",
            });
        }
        if self.max_payload as u64 > u32::MAX as u64 {
            return Err(LinkError::InvalidConfig {
                field: "max_payload",
                value: self.max_payload as u64,
                why: "the envelope's length field is a u32",
            });
        }
        Ok(())
    }
}

/// One peer's incoming queue.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    /// Signalled when an envelope arrives or the inbox closes.
    arrived: Condvar,
    /// Signalled when an envelope leaves or the inbox closes.
    freed: Condvar,
}

#[derive(Default)]
struct InboxState {
    queue: VecDeque<Vec<u8>>,
    closed: bool,
}

impl Inbox {
    /// The state, also after a panic elsewhere poisoned the lock (the queue stays consistent:
    /// no code here panics while holding it).
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.queue.clear();
        drop(state);
        self.arrived.notify_all();
        self.freed.notify_all();
    }
}

/// An endpoint's counters (what `Link::stats` reports), shared by the link kinds.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
}

impl Counters {
    pub(crate) fn stats(&self) -> LinkStats {
        LinkStats {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
        }
    }
}

/// A network of `peers` endpoints in one process; endpoint `i` is peer `i`. Each endpoint owns
/// its incoming queue: dropping it closes that queue (senders then get `PeerClosed`). Fails for
/// an invalid config or more peers than the u32 sender field can name.
pub fn in_process_network(
    peers: usize,
    config: LinkConfig,
) -> Result<Vec<InProcEndpoint>, LinkError> {
    config.validate()?;
    if peers as u64 > u32::MAX as u64 + 1 {
        return Err(LinkError::InvalidConfig {
            field: "peers",
            value: peers as u64,
            why: "peer ids must fit the envelope's u32 sender field",
        });
    }
    let inboxes: Arc<[Inbox]> = (0..peers).map(|_| Inbox::default()).collect();
    Ok((0..peers)
        .map(|me| InProcEndpoint {
            me,
            inboxes: Arc::clone(&inboxes),
            config,
            counters: Counters::default(),
        })
        .collect())
}

/// One peer of an in-process network (see `in_process_network`). Share it between threads
/// behind an `Arc`; it is `Send + Sync`.
pub struct InProcEndpoint {
    me: usize,
    inboxes: Arc<[Inbox]>,
    config: LinkConfig,
    counters: Counters,
}

impl InProcEndpoint {
    /// The network's settings.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }
}

impl std::fmt::Debug for InProcEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcEndpoint")
            .field("me", &self.me)
            .field("peers", &self.inboxes.len())
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Link for InProcEndpoint {
    fn me(&self) -> usize {
        self.me
    }

    fn peers(&self) -> usize {
        self.inboxes.len()
    }

    fn max_payload(&self) -> usize {
        self.config.max_payload
    }

    fn send(&self, to: usize, bytes: Vec<u8>) -> Result<(), LinkError> {
        let Some(inbox) = self.inboxes.get(to) else {
            return Err(LinkError::UnknownPeer {
                peer: to,
                peers: self.inboxes.len(),
            });
        };
        let max = self.config.max_payload;
        if bytes.len().saturating_sub(ENVELOPE_OVERHEAD) > max {
            return Err(LinkError::PayloadTooLarge {
                len: (bytes.len() - ENVELOPE_OVERHEAD) as u64,
                max: max as u64,
            });
        }
        let capacity = self.config.capacity;
        let waited = self.config.send_timeout;
        let state = inbox.lock();
        let (mut state, _) = inbox
            .freed
            .wait_timeout_while(state, waited, |s| !s.closed && s.queue.len() >= capacity)
            .unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return Err(LinkError::PeerClosed { peer: to });
        }
        if state.queue.len() >= capacity {
            return Err(LinkError::Backpressure {
                peer: to,
                capacity,
                waited,
            });
        }
        let len = bytes.len() as u64;
        state.queue.push_back(bytes);
        drop(state);
        inbox.arrived.notify_one();
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_sent.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Received>, LinkError> {
        let inbox = &self.inboxes[self.me];
        let state = inbox.lock();
        let (mut state, _) = inbox
            .arrived
            .wait_timeout_while(state, timeout, |s| !s.closed && s.queue.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        let Some(mut bytes) = state.queue.pop_front() else {
            return Ok(None);
        };
        drop(state);
        inbox.freed.notify_one();
        self.counters
            .bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let (sender, tag, len) = match decode_envelope(&bytes, self.config.max_payload) {
            Ok(e) => (e.sender, e.tag, e.payload.len()),
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(Received::Refused(e)));
            }
        };
        // Keep the payload in the envelope's own buffer: cut the checksum, then the header.
        bytes.truncate(HEADER_LEN + len);
        bytes.drain(..HEADER_LEN);
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Received::Message(Message {
            sender: sender as usize,
            tag,
            payload: bytes,
        })))
    }

    fn stats(&self) -> LinkStats {
        self.counters.stats()
    }
}

impl Drop for InProcEndpoint {
    fn drop(&mut self) {
        if let Some(inbox) = self.inboxes.get(self.me) {
            inbox.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Rewrites bytes `at..` of a valid envelope and recomputes the checksum, to reach the checks
    /// behind it.
    fn patched(mut bytes: Vec<u8>, at: usize, with: &[u8]) -> Vec<u8> {
        bytes[at..at + with.len()].copy_from_slice(with);
        let body = bytes.len() - CRC_LEN;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn envelope_round_trips_at_fixed_offsets() {
        let bytes = encode_envelope(7, 0xABCD, b"hello").unwrap();
        assert_eq!(bytes.len(), ENVELOPE_OVERHEAD + 5);
        assert_eq!(&bytes[..4], b"PHXL");
        assert_eq!(&bytes[4..6], &1u16.to_le_bytes());
        assert_eq!(&bytes[6..10], &7u32.to_le_bytes());
        assert_eq!(&bytes[10..14], &0xABCDu32.to_le_bytes());
        assert_eq!(&bytes[14..18], &5u32.to_le_bytes());
        assert_eq!(&bytes[18..23], b"hello");
        let e = decode_envelope(&bytes, 5).unwrap();
        assert_eq!(
            e,
            Envelope {
                sender: 7,
                tag: 0xABCD,
                payload: b"hello"
            }
        );
        let empty = encode_envelope(0, 0, &[]).unwrap();
        assert_eq!(decode_envelope(&empty, 0).unwrap().payload, b"");
    }

    #[test]
    fn each_error_names_what_it_found() {
        let good = encode_envelope(1, 2, &[9; 10]).unwrap();

        let mut bad = good.clone();
        bad[0] = b'X';
        let e = decode_envelope(&bad, 64).unwrap_err();
        assert_eq!(e, LinkError::BadMagic { found: *b"XHXL" });
        assert!(e.to_string().contains("magic"), "{e}");

        let e = decode_envelope(&patched(good.clone(), 4, &[2, 0]), 64).unwrap_err();
        assert_eq!(
            e,
            LinkError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        assert!(e.to_string().contains("version 2"), "{e}");

        let e = decode_envelope(&good, 9).unwrap_err();
        assert_eq!(e, LinkError::PayloadTooLarge { len: 10, max: 9 });
        let huge = patched(good.clone(), 14, &u32::MAX.to_le_bytes());
        let e = decode_envelope(&huge, DEFAULT_MAX_PAYLOAD).unwrap_err();
        assert_eq!(
            e,
            LinkError::PayloadTooLarge {
                len: u32::MAX as u64,
                max: DEFAULT_MAX_PAYLOAD as u64
            }
        );
        assert!(e.to_string().contains("limit"), "{e}");

        let e = decode_envelope(&good[..good.len() - 1], 64).unwrap_err();
        assert_eq!(
            e,
            LinkError::Truncated {
                what: "payload and checksum",
                need: 32,
                have: 31
            }
        );
        let e = decode_envelope(&good[..3], 64).unwrap_err();
        assert_eq!(
            e,
            LinkError::Truncated {
                what: "header",
                need: 18,
                have: 3
            }
        );
        assert!(e.to_string().contains("truncated"), "{e}");

        let mut long = good.clone();
        long.extend_from_slice(&[0, 0]);
        let e = decode_envelope(&long, 64).unwrap_err();
        assert_eq!(e, LinkError::TrailingBytes { extra: 2 });

        let mut bad = good.clone();
        bad[HEADER_LEN + 3] ^= 0x01;
        let e = decode_envelope(&bad, 64).unwrap_err();
        assert!(matches!(e, LinkError::BadChecksum { .. }), "{e}");
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn config_is_checked_at_the_edge() {
        let e = in_process_network(2, LinkConfig::with_capacity(0)).unwrap_err();
        assert!(matches!(
            e,
            LinkError::InvalidConfig {
                field: "capacity",
                ..
            }
        ));
        let config = LinkConfig {
            max_payload: u32::MAX as usize + 1,
            ..LinkConfig::default()
        };
        let e = in_process_network(2, config).unwrap_err();
        assert!(e.to_string().contains("max_payload"), "{e}");
        assert_eq!(
            in_process_network(0, LinkConfig::default()).unwrap().len(),
            0
        );
    }

    fn arb_envelope() -> impl Strategy<Value = (u32, u32, Vec<u8>)> {
        (
            any::<u32>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_random_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            max in prop_oneof![Just(0usize), 0usize..300, Just(DEFAULT_MAX_PAYLOAD)],
        ) {
            let _ = decode_envelope(&bytes, max);
        }

        /// Random bytes behind a valid magic and version, so the length and checksum checks see
        /// arbitrary values.
        #[test]
        fn decode_never_panics_behind_a_valid_header(
            rest in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&VERSION.to_le_bytes());
            bytes.extend_from_slice(&rest);
            if let Ok(e) = decode_envelope(&bytes, DEFAULT_MAX_PAYLOAD) {
                prop_assert_eq!(encode_envelope(e.sender, e.tag, e.payload).unwrap(), bytes);
            }
        }

        #[test]
        fn valid_envelopes_round_trip((sender, tag, payload) in arb_envelope()) {
            let bytes = encode_envelope(sender, tag, &payload).unwrap();
            let e = decode_envelope(&bytes, payload.len()).unwrap();
            prop_assert_eq!(e, Envelope { sender, tag, payload: &payload });
        }

        /// A flipped byte anywhere is an error: the checks in front of the checksum catch some
        /// as their own errors, CRC32C catches every other single-byte error.
        #[test]
        fn a_flipped_byte_never_decodes(
            (sender, tag, payload) in arb_envelope(),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut bytes = encode_envelope(sender, tag, &payload).unwrap();
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            let r = decode_envelope(&bytes, DEFAULT_MAX_PAYLOAD);
            prop_assert!(r.is_err(), "flipping byte {} by {:#04x} decoded: {:?}", i, flip, r);
        }

        /// Several random corruptions may collide with the CRC only with odds of about 2^-32;
        /// whatever happens, decoding must not hand back a different payload.
        #[test]
        fn corruption_never_decodes_to_another_payload(
            (sender, tag, payload) in arb_envelope(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        ) {
            let mut bytes = encode_envelope(sender, tag, &payload).unwrap();
            for (at, flip) in &flips {
                let i = at.index(bytes.len());
                bytes[i] ^= flip;
            }
            if let Ok(e) = decode_envelope(&bytes, DEFAULT_MAX_PAYLOAD) {
                prop_assert_eq!(e, Envelope { sender, tag, payload: &payload });
            }
        }

        #[test]
        fn every_truncation_is_reported_as_truncated(
            (sender, tag, payload) in arb_envelope(),
            keep in any::<prop::sample::Index>(),
        ) {
            let bytes = encode_envelope(sender, tag, &payload).unwrap();
            let keep = keep.index(bytes.len());
            let r = decode_envelope(&bytes[..keep], DEFAULT_MAX_PAYLOAD);
            prop_assert!(matches!(r, Err(LinkError::Truncated { .. })), "kept {}: {:?}", keep, r);
        }
    }
}
