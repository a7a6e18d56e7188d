//! The TCP link: the `Link` between processes and machines, on std sockets and threads (no async
//! runtime: one accept thread, one reader thread per inbound connection; the caller's thread
//! writes). Envelopes travel as they are (the envelope's header carries the length); each
//! direction between two peers is its own connection, opened lazily on the first send and
//! authenticated by the [`handshake`](crate::handshake).
//!
//! - **No copy of payloads on send**: `send_message` writes header, payload and checksum as one
//!   vectored write, straight from the caller's buffer.
//! - **Back-pressure**: the inbox holds `capacity` envelopes; a full inbox stops the reader
//!   threads, TCP's window fills, and a sender's write blocks until `send_timeout`, then fails
//!   with `Backpressure`.
//! - **Reconnect**: a send on a dropped connection reconnects (to the peer's current address)
//!   and writes again once; only then does it fail.
//! - **Bad input**: a connection that sends a malformed, truncated or oversized envelope, or one
//!   claiming another sender, is closed with an error naming the peer (kept in `errors()`); the
//!   link and the other connections go on.
//! - **Membership**: `set_peer` gives a peer's address and incarnation; a connection from an
//!   older incarnation is refused as stale (its process was replaced).
//! - **Liveness**: `silent_for(peer)`, the time since anything was heard from a peer.

use crate::handshake::{self, Credentials, Identity, Refusal};
use crate::link::{
    CRC_LEN, Counters, HEADER_LEN, Link, LinkConfig, LinkError, LinkStats, MAGIC, Message,
    Received, VERSION, decode_envelope,
};
use std::io::{IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Settings of one TCP endpoint.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    pub link: LinkConfig,
    pub creds: Credentials,
    /// How long a connect plus handshake may take.
    pub connect_timeout: Duration,
}

impl TcpConfig {
    pub fn new(job: &str, secret: &[u8]) -> TcpConfig {
        TcpConfig {
            link: LinkConfig::default(),
            creds: Credentials {
                job: job.to_string(),
                secret: secret.to_vec(),
            },
            connect_timeout: Duration::from_secs(3),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Slot {
    addr: Mutex<Option<SocketAddr>>,
    incarnation: AtomicU64,
    /// Our connection for sending to this peer.
    out: Mutex<Option<TcpStream>>,
    /// The peer's connection to us (kept to close it when the peer is replaced).
    inbound: Mutex<Option<TcpStream>>,
    heard: Mutex<Option<Instant>>,
}

struct Shared {
    me: Identity,
    cfg: TcpConfig,
    slots: Vec<Slot>,
    inbox: SyncSender<Received>,
    counters: Counters,
    /// Reconnections made by sends after a dropped connection.
    reconnects: AtomicU64,
    closed: AtomicBool,
    errors: Mutex<Vec<String>>,
    /// Until then this endpoint acts cut off from the network (a partition, for tests).
    cut_until: Mutex<Option<Instant>>,
}

impl Shared {
    fn is_cut(&self) -> bool {
        lock(&self.cut_until).is_some_and(|t| Instant::now() < t)
    }
}

impl Shared {
    fn error(&self, e: String) {
        tracing::warn!("{e}");
        let mut v = lock(&self.errors);
        if v.len() < 1000 {
            v.push(e);
        }
    }
}

/// One process's endpoint of a TCP network of `peers` numbered peers.
pub struct TcpLink {
    shared: Arc<Shared>,
    inbox: Mutex<Receiver<Received>>,
    local: SocketAddr,
}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink")
            .field("me", &self.shared.me)
            .field("local", &self.local)
            .finish()
    }
}

impl TcpLink {
    /// Listens on `listen` (give an explicit interface: `127.0.0.1:0` picks a free loopback
    /// port) as peer `me`, incarnation `incarnation`, of a network of `peers`.
    pub fn bind(
        me: usize,
        incarnation: u64,
        peers: usize,
        listen: SocketAddr,
        cfg: TcpConfig,
    ) -> Result<TcpLink, LinkError> {
        if me >= peers {
            return Err(LinkError::UnknownPeer { peer: me, peers });
        }
        let listener = TcpListener::bind(listen).map_err(|e| LinkError::InvalidConfig {
            field: "listen",
            value: u64::from(listen.port()),
            why: if e.kind() == std::io::ErrorKind::AddrInUse {
                "the address is already in use"
            } else {
                "cannot listen on that address"
            },
        })?;
        let local = listener
            .local_addr()
            .map_err(|_| LinkError::PeerClosed { peer: me })?;
        let (tx, rx) = sync_channel(cfg.link.capacity.max(1));
        let shared = Arc::new(Shared {
            me: Identity {
                peer: me as u32,
                incarnation,
            },
            cfg,
            slots: (0..peers).map(|_| Slot::default()).collect(),
            inbox: tx,
            counters: Counters::default(),
            reconnects: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
            cut_until: Mutex::new(None),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name(format!("tcp-accept-{me}"))
            .spawn(move || accept_loop(sh, listener))
            .map_err(|_| LinkError::PeerClosed { peer: me })?;
        Ok(TcpLink {
            shared,
            inbox: Mutex::new(rx),
            local,
        })
    }

    /// The address this endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// This endpoint's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.shared.me.incarnation
    }

    /// Where peer `peer` listens and which incarnation it is. A newer incarnation replaces the
    /// connections to the older one.
    pub fn set_peer(&self, peer: usize, addr: SocketAddr, incarnation: u64) {
        let Some(slot) = self.shared.slots.get(peer) else {
            return;
        };
        let old = slot.incarnation.fetch_max(incarnation, Ordering::SeqCst);
        let changed = lock(&slot.addr).replace(addr) != Some(addr);
        if (incarnation > old || changed)
            && let Some(s) = lock(&slot.out).take()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The incarnation of `peer` this endpoint knows.
    pub fn peer_incarnation(&self, peer: usize) -> u64 {
        self.shared
            .slots
            .get(peer)
            .map_or(0, |s| s.incarnation.load(Ordering::SeqCst))
    }

    /// Closes both connections with `peer` (as a network fault would); the next send reconnects.
    pub fn drop_connections(&self, peer: usize) {
        if let Some(slot) = self.shared.slots.get(peer) {
            for c in [lock(&slot.out).take(), lock(&slot.inbound).take()]
                .into_iter()
                .flatten()
            {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Cuts this endpoint off the network for `d`, as a partition would: every connection is
    /// closed, sends fail, connections from peers are closed on arrival. Afterwards sends
    /// reconnect as after any dropped connection.
    pub fn partition(&self, d: Duration) {
        *lock(&self.shared.cut_until) = Some(Instant::now() + d);
        for p in 0..self.shared.slots.len() {
            self.drop_connections(p);
        }
    }

    /// Time since anything was heard from `peer` (`None`: never).
    pub fn silent_for(&self, peer: usize) -> Option<Duration> {
        let slot = self.shared.slots.get(peer)?;
        lock(&slot.heard).map(|t| t.elapsed())
    }

    /// Connections closed or refused so far, each a sentence naming the peer.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.errors).clone()
    }

    /// Reconnections made by sends after a dropped connection.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    fn connect(&self, to: usize) -> Result<TcpStream, LinkError> {
        let sh = &self.shared;
        let addr = lock(&sh.slots[to].addr).ok_or(LinkError::PeerClosed { peer: to })?;
        let mut s = TcpStream::connect_timeout(&addr, sh.cfg.connect_timeout)
            .map_err(|_| LinkError::PeerClosed { peer: to })?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(sh.cfg.connect_timeout))
            .and_then(|_| s.set_write_timeout(Some(sh.cfg.connect_timeout)))
            .map_err(|_| LinkError::PeerClosed { peer: to })?;
        match handshake::client(&mut s, &sh.cfg.creds, sh.me, to as u32) {
            Ok(them) => {
                let known = sh.slots[to].incarnation.load(Ordering::SeqCst);
                if them.incarnation < known {
                    return Err(LinkError::PeerClosed { peer: to });
                }
                sh.slots[to]
                    .incarnation
                    .fetch_max(them.incarnation, Ordering::SeqCst);
            }
            Err(e) => {
                sh.error(format!("connecting to peer {to} at {addr}: {e}"));
                if let handshake::HandshakeError::Refused {
                    code: Refusal::Stale,
                    reason,
                } = &e
                {
                    return Err(LinkError::Stale {
                        reason: reason.clone(),
                    });
                }
                return Err(LinkError::PeerClosed { peer: to });
            }
        }
        s.set_read_timeout(None)
            .and_then(|_| s.set_write_timeout(Some(sh.cfg.link.send_timeout)))
            .map_err(|_| LinkError::PeerClosed { peer: to })?;
        Ok(s)
    }

    /// Writes one envelope to `to`, reconnecting once after a failed write.
    fn write_body(&self, to: usize, body: Body<'_>) -> Result<(), LinkError> {
        let sh = &self.shared;
        if to >= sh.slots.len() {
            return Err(LinkError::UnknownPeer {
                peer: to,
                peers: sh.slots.len(),
            });
        }
        if sh.is_cut() {
            return Err(LinkError::PeerClosed { peer: to });
        }
        let total = body.len();
        let mut out = lock(&sh.slots[to].out);
        for attempt in 0..2 {
            if out.is_none() {
                if attempt > 0 {
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                *out = Some(self.connect(to)?);
            }
            let s = out.as_mut().expect("connected above");
            let started = Instant::now();
            match body.write(s) {
                Ok(()) => {
                    sh.counters.sent.fetch_add(1, Ordering::Relaxed);
                    sh.counters
                        .bytes_sent
                        .fetch_add(total as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    // a partial envelope may be on the wire: this connection is done
                    if let Some(s) = out.take() {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    return Err(LinkError::Backpressure {
                        peer: to,
                        capacity: sh.cfg.link.capacity,
                        waited: started.elapsed(),
                    });
                }
                Err(_) => {
                    if let Some(s) = out.take() {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
        }
        Err(LinkError::PeerClosed { peer: to })
    }
}

/// Payloads above this are written and read in chunks of it, each checksummed while it is in
/// cache (the checksum is the envelope's trailer, so it can follow the bytes).
const STREAM_CHUNK: usize = 1 << 20;

/// An envelope to write: already encoded, or a header and payload parts whose checksum is
/// computed on the way out.
#[derive(Clone, Copy)]
enum Body<'a> {
    Raw(&'a [u8]),
    Framed {
        header: &'a [u8; HEADER_LEN],
        parts: &'a [&'a [u8]],
    },
}

impl Body<'_> {
    fn len(&self) -> usize {
        match self {
            Body::Raw(b) => b.len(),
            Body::Framed { parts, .. } => {
                HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>() + CRC_LEN
            }
        }
    }

    fn write(&self, s: &mut TcpStream) -> std::io::Result<()> {
        let (header, parts) = match *self {
            Body::Raw(b) => return s.write_all(b),
            Body::Framed { header, parts } => (header, parts),
        };
        let mut crc = Crc::new();
        crc.update(header);
        if self.len() <= STREAM_CHUNK {
            for p in parts {
                crc.update(p);
            }
            let crc = crc.value().to_le_bytes();
            let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 2);
            all.push(header);
            all.extend_from_slice(parts);
            all.push(&crc);
            return write_all_vectored(s, &all);
        }
        let mut first = true;
        for p in parts {
            for c in p.chunks(STREAM_CHUNK) {
                crc.update(c);
                if std::mem::take(&mut first) {
                    write_all_vectored(s, &[header, c])?;
                } else {
                    s.write_all(c)?;
                }
            }
        }
        if first {
            s.write_all(header)?;
        }
        s.write_all(&crc.value().to_le_bytes())
    }
}

/// CRC-32C (the envelope's checksum, as `crc32c` computes it) over pieces, through crc-fast's
/// carry-less-multiply folding: on this machine several times the speed of the crc32
/// instruction, which matters here because the link checksums every byte on both sides.
struct Crc(crc_fast::Digest);

impl Crc {
    fn new() -> Crc {
        Crc(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
    }

    fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }

    fn value(&self) -> u32 {
        self.0.finalize() as u32
    }
}

fn write_all_vectored(s: &mut TcpStream, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(&parts[idx][off..])
            .chain(parts[idx + 1..].iter().copied())
            .map(IoSlice::new)
            .collect();
        let mut n = s.write_vectored(&slices)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while idx < parts.len() && n > 0 {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

fn accept_loop(sh: Arc<Shared>, listener: TcpListener) {
    for conn in listener.incoming() {
        if sh.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(s) = conn else { continue };
        if sh.is_cut() {
            let _ = s.shutdown(Shutdown::Both);
            continue;
        }
        let sh = sh.clone();
        let _ = std::thread::Builder::new()
            .name("tcp-conn".into())
            .spawn(move || serve_connection(sh, s));
    }
}

fn serve_connection(sh: Arc<Shared>, mut s: TcpStream) {
    let from = s
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(sh.cfg.connect_timeout));
    let _ = s.set_write_timeout(Some(sh.cfg.connect_timeout));
    let peers = sh.slots.len();
    let admit = |who: Identity| {
        let p = who.peer as usize;
        if p >= peers || p == sh.me.peer as usize {
            return Err((
                Refusal::UnknownPeer,
                format!("peer id {p} is not another peer of this network of {peers}"),
            ));
        }
        let known = sh.slots[p].incarnation.load(Ordering::SeqCst);
        if who.incarnation < known {
            return Err((
                Refusal::Stale,
                format!(
                    "peer {p} incarnation {} is stale: incarnation {known} replaced it; exit",
                    who.incarnation
                ),
            ));
        }
        Ok(())
    };
    let them = match handshake::server(&mut s, &sh.cfg.creds, sh.me, admit) {
        Ok(t) => t,
        Err(e) => {
            sh.error(format!("refused a connection from {from}: {e}"));
            return;
        }
    };
    let p = them.peer as usize;
    let slot = &sh.slots[p];
    slot.incarnation
        .fetch_max(them.incarnation, Ordering::SeqCst);
    if let Ok(c) = s.try_clone()
        && let Some(old) = lock(&slot.inbound).replace(c)
    {
        let _ = old.shutdown(Shutdown::Both);
    }
    *lock(&slot.heard) = Some(Instant::now());
    let _ = s.set_read_timeout(None);
    let max = sh.cfg.link.max_payload;
    loop {
        let mut header = [0u8; HEADER_LEN];
        if let Err(e) = s.read_exact(&mut header) {
            if e.kind() != std::io::ErrorKind::UnexpectedEof && !sh.closed.load(Ordering::SeqCst) {
                tracing::debug!("connection from peer {p} ended: {e}");
            }
            return;
        }
        let len = u32::from_le_bytes(header[14..18].try_into().expect("4 bytes")) as usize;
        // the header alone decides: a bad magic, version or length closes the connection
        if header[0..4] != MAGIC
            || u16::from_le_bytes([header[4], header[5]]) != VERSION
            || len > max
        {
            let why = decode_envelope(&header, max)
                .err()
                .map_or_else(|| "bad header".to_string(), |e| e.to_string());
            sh.counters.refused.fetch_add(1, Ordering::Relaxed);
            sh.error(format!(
                "closed the connection from peer {p} ({from}): {why}"
            ));
            let _ = s.shutdown(Shutdown::Both);
            return;
        }
        // the payload is read into its own buffer, which becomes the message: no copy; the
        // checksum follows each chunk while it is in cache
        let mut payload = Vec::with_capacity(len + CRC_LEN);
        let mut crc = Crc::new();
        crc.update(&header);
        let mut read = Ok(());
        // payload chunks, then the 4-byte checksum, into the spare capacity (no zeroing)
        let chunks = (0..len)
            .step_by(STREAM_CHUNK)
            .map(|at| (at, (len - at).min(STREAM_CHUNK)));
        for (at, want) in chunks.chain([(len, CRC_LEN)]) {
            match (&mut s).take(want as u64).read_to_end(&mut payload) {
                Ok(n) if n == want => {
                    if at < len {
                        crc.update(&payload[at..at + n]);
                    }
                }
                Ok(n) => {
                    read = Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{n} of {want} bytes at offset {at}"),
                    ));
                    break;
                }
                Err(e) => {
                    read = Err(e);
                    break;
                }
            }
        }
        if let Err(e) = read {
            sh.counters.refused.fetch_add(1, Ordering::Relaxed);
            sh.error(format!(
                "closed the connection from peer {p} ({from}): truncated envelope of {len} payload bytes: {e}"
            ));
            return;
        }
        *lock(&slot.heard) = Some(Instant::now());
        sh.counters
            .bytes_received
            .fetch_add((HEADER_LEN + len + CRC_LEN) as u64, Ordering::Relaxed);
        let stored = u32::from_le_bytes(payload[len..].try_into().expect("4 bytes"));
        let computed = crc.value();
        payload.truncate(len);
        let sender = u32::from_le_bytes(header[6..10].try_into().expect("4 bytes"));
        let item = if stored != computed {
            // a damaged envelope within a sound stream: refused, the connection goes on
            sh.counters.refused.fetch_add(1, Ordering::Relaxed);
            Received::Refused(LinkError::BadChecksum { stored, computed })
        } else if sender as usize != p {
            sh.counters.refused.fetch_add(1, Ordering::Relaxed);
            sh.error(format!(
                "closed the connection from peer {p} ({from}): an envelope claims sender {sender}"
            ));
            let _ = s.shutdown(Shutdown::Both);
            return;
        } else {
            sh.counters.received.fetch_add(1, Ordering::Relaxed);
            Received::Message(Message {
                sender: p,
                tag: u32::from_le_bytes(header[10..14].try_into().expect("4 bytes")),
                payload,
            })
        };
        let mut item = item;
        loop {
            match sh.inbox.try_send(item) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    if sh.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    item = back;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

impl Link for TcpLink {
    fn me(&self) -> usize {
        self.shared.me.peer as usize
    }

    fn peers(&self) -> usize {
        self.shared.slots.len()
    }

    fn max_payload(&self) -> usize {
        self.shared.cfg.link.max_payload
    }

    fn send(&self, to: usize, bytes: Vec<u8>) -> Result<(), LinkError> {
        let max = self.shared.cfg.link.max_payload;
        if bytes.len() > max + crate::link::ENVELOPE_OVERHEAD {
            return Err(LinkError::PayloadTooLarge {
                len: bytes.len() as u64,
                max: max as u64,
            });
        }
        self.write_body(to, Body::Raw(&bytes))
    }

    fn recv_timeout(&self, timeout: Duration) -> Result<Option<Received>, LinkError> {
        match lock(&self.inbox).recv_timeout(timeout) {
            Ok(r) => Ok(Some(r)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(LinkError::PeerClosed { peer: self.me() }),
        }
    }

    fn stats(&self) -> LinkStats {
        self.shared.counters.stats()
    }

    /// Header, payload and checksum in one vectored write: the payload is not copied.
    fn send_message(&self, to: usize, tag: u32, payload: &[u8]) -> Result<(), LinkError> {
        self.send_parts(to, tag, &[payload])
    }
}

impl TcpLink {
    /// One envelope whose payload is `parts` back to back (e.g. a message head and a tensor
    /// frame), written with one vectored write: no part is copied.
    pub fn send_parts(&self, to: usize, tag: u32, parts: &[&[u8]]) -> Result<(), LinkError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let max = self.max_payload();
        if len > max {
            return Err(LinkError::PayloadTooLarge {
                len: len as u64,
                max: max as u64,
            });
        }
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&VERSION.to_le_bytes());
        header[6..10].copy_from_slice(&self.shared.me.peer.to_le_bytes());
        header[10..14].copy_from_slice(&tag.to_le_bytes());
        header[14..18].copy_from_slice(&(len as u32).to_le_bytes());
        self.write_body(
            to,
            Body::Framed {
                header: &header,
                parts,
            },
        )
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        for slot in &self.shared.slots {
            for c in [lock(&slot.out).take(), lock(&slot.inbound).take()]
                .into_iter()
                .flatten()
            {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        // wake the accept loop so that it sees `closed`
        let _ = TcpStream::connect_timeout(&self.local, Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::Crc;

    #[test]
    fn the_fast_crc_is_the_envelopes_crc32c_over_any_split() {
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for cut in [0, 1, 17, 4096, 65_537, 99_999, 100_000] {
            let mut c = Crc::new();
            c.update(&data[..cut]);
            c.update(&data[cut..]);
            assert_eq!(c.value(), crc32c::crc32c(&data), "cut at {cut}");
        }
        assert_eq!(Crc::new().value(), crc32c::crc32c(&[]));
    }
}
