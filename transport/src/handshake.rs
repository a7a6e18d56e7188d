//! The TCP link's handshake: who is on the other end of a fresh connection, and whether it may
//! talk to us. Versioned, mutual, and the shared secret never crosses the wire: each side proves
//! it holds the secret with an HMAC-SHA256 over the other side's random nonce.
//!
//! Messages (integers little-endian):
//!
//! 1. client hello: `PHXH`, version u16, job id (u16 length + UTF-8), peer u32, incarnation u64,
//!    client nonce (32 bytes).
//! 2. server reply: `PHXH`, version u16, status u8; on 0: peer u32, incarnation u64, server nonce
//!    (32), server proof (32) = HMAC(secret, "server" ‖ client nonce ‖ server nonce ‖ job ‖ server
//!    peer ‖ server incarnation); otherwise a reason (u16 length + UTF-8) and the connection ends.
//! 3. client proof (32) = HMAC(secret, "client" ‖ server nonce ‖ client nonce ‖ job ‖ client peer
//!    ‖ client incarnation).
//! 4. server verdict: status u8, reason (u16 length + UTF-8; empty when accepted).
//!
//! A refusal always carries a status naming the rule and a sentence; both sides can log it.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::io::{Read, Write};

/// The four bytes a handshake message starts with.
pub const MAGIC: [u8; 4] = *b"PHXH";
/// The handshake version this code speaks.
pub const VERSION: u16 = 1;
const NONCE: usize = 32;
const PROOF: usize = 32;
/// Longest job id accepted.
pub const MAX_JOB_ID: usize = 256;

/// Who a side of a connection is: its peer id in the job and which incarnation of that peer
/// (a restarted process is the next incarnation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub peer: u32,
    pub incarnation: u64,
}

/// What both sides must agree on: the job and the shared secret.
#[derive(Clone)]
pub struct Credentials {
    pub job: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("job", &self.job)
            .field("secret", &"<hidden>")
            .finish()
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a phalanx handshake: bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("handshake version {found}, this build speaks {supported}")]
    Version { found: u16, supported: u16 },
    #[error("refused by the other side ({code}): {reason}")]
    Refused { code: Refusal, reason: String },
    #[error("the other side failed authentication: its proof does not match the shared secret")]
    BadProof,
    #[error("job id of {0} bytes is over the limit of {MAX_JOB_ID}")]
    JobTooLong(usize),
    #[error("the job id is not UTF-8")]
    JobNotUtf8,
    #[error("expected peer {expected}, the other side is peer {found}")]
    WrongPeer { expected: u32, found: u32 },
    #[error("cannot read random bytes for a nonce: {0}")]
    Random(std::io::Error),
}

/// The rule a refusal names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Version = 1,
    Job = 2,
    Auth = 3,
    Stale = 4,
    UnknownPeer = 5,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Version => "version",
            Refusal::Job => "job id",
            Refusal::Auth => "authentication",
            Refusal::Stale => "stale incarnation",
            Refusal::UnknownPeer => "unknown peer",
        })
    }
}

impl Refusal {
    fn from_code(c: u8) -> Refusal {
        match c {
            1 => Refusal::Version,
            2 => Refusal::Job,
            3 => Refusal::Auth,
            4 => Refusal::Stale,
            _ => Refusal::UnknownPeer,
        }
    }
}

fn nonce() -> Result<[u8; NONCE], HandshakeError> {
    let mut n = [0u8; NONCE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(HandshakeError::Random)?;
    Ok(n)
}

fn proof(
    secret: &[u8],
    side: &[u8],
    theirs: &[u8; NONCE],
    mine: &[u8; NONCE],
    job: &str,
    who: Identity,
) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(side);
    mac.update(theirs);
    mac.update(mine);
    mac.update(job.as_bytes());
    mac.update(&who.peer.to_le_bytes());
    mac.update(&who.incarnation.to_le_bytes());
    mac
}

fn read_arr<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_text(r: &mut impl Read, max: usize) -> Result<String, HandshakeError> {
    let len = u16::from_le_bytes(read_arr(r)?) as usize;
    if len > max {
        return Err(HandshakeError::JobTooLong(len));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| HandshakeError::JobNotUtf8)
}

fn text(s: &str) -> Vec<u8> {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    let mut out = (b.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(b);
    out
}

fn read_header(r: &mut impl Read) -> Result<(), HandshakeError> {
    let magic: [u8; 4] = read_arr(r)?;
    if magic != MAGIC {
        return Err(HandshakeError::BadMagic(magic));
    }
    let version = u16::from_le_bytes(read_arr(r)?);
    if version != VERSION {
        return Err(HandshakeError::Version {
            found: version,
            supported: VERSION,
        });
    }
    Ok(())
}

fn refuse(s: &mut impl Write, code: Refusal, reason: &str) -> HandshakeError {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(code as u8);
    out.extend(text(reason));
    let _ = s.write_all(&out);
    HandshakeError::Refused {
        code,
        reason: reason.to_string(),
    }
}

/// The connecting side. `expect` is the peer we meant to reach. Returns the server's identity.
pub fn client<S: Read + Write>(
    s: &mut S,
    creds: &Credentials,
    me: Identity,
    expect: u32,
) -> Result<Identity, HandshakeError> {
    if creds.job.len() > MAX_JOB_ID {
        return Err(HandshakeError::JobTooLong(creds.job.len()));
    }
    let cn = nonce()?;
    let mut hello = Vec::with_capacity(64 + creds.job.len());
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend(text(&creds.job));
    hello.extend_from_slice(&me.peer.to_le_bytes());
    hello.extend_from_slice(&me.incarnation.to_le_bytes());
    hello.extend_from_slice(&cn);
    s.write_all(&hello)?;
    read_header(s)?;
    let [status] = read_arr::<1>(s)?;
    if status != 0 {
        let reason = read_text(s, u16::MAX as usize)?;
        return Err(HandshakeError::Refused {
            code: Refusal::from_code(status),
            reason,
        });
    }
    let them = Identity {
        peer: u32::from_le_bytes(read_arr(s)?),
        incarnation: u64::from_le_bytes(read_arr(s)?),
    };
    let sn: [u8; NONCE] = read_arr(s)?;
    let sp: [u8; PROOF] = read_arr(s)?;
    let server_ok = proof(&creds.secret, b"server", &cn, &sn, &creds.job, them)
        .verify_slice(&sp)
        .is_ok();
    // our proof goes out either way (it reveals nothing), so that the server can log a wrong
    // secret as such rather than as a connection that hung up
    let mine = proof(&creds.secret, b"client", &sn, &cn, &creds.job, me)
        .finalize()
        .into_bytes();
    s.write_all(&mine)?;
    if !server_ok {
        return Err(HandshakeError::BadProof);
    }
    if them.peer != expect {
        return Err(HandshakeError::WrongPeer {
            expected: expect,
            found: them.peer,
        });
    }
    read_header(s)?;
    let [verdict] = read_arr::<1>(s)?;
    let reason = read_text(s, u16::MAX as usize)?;
    if verdict != 0 {
        return Err(HandshakeError::Refused {
            code: Refusal::from_code(verdict),
            reason,
        });
    }
    Ok(them)
}

/// The accepting side. `admit` decides on the claimed identity (peer id known, incarnation not
/// stale) before any proof is exchanged. Returns the client's proven identity.
pub fn server<S: Read + Write>(
    s: &mut S,
    creds: &Credentials,
    me: Identity,
    admit: impl Fn(Identity) -> Result<(), (Refusal, String)>,
) -> Result<Identity, HandshakeError> {
    read_header(s).map_err(|e| match e {
        HandshakeError::Version { found, .. } => refuse(
            s,
            Refusal::Version,
            &format!("handshake version {found}, this peer speaks {VERSION}"),
        ),
        e => e,
    })?;
    let job = read_text(s, MAX_JOB_ID)?;
    let them = Identity {
        peer: u32::from_le_bytes(read_arr(s)?),
        incarnation: u64::from_le_bytes(read_arr(s)?),
    };
    let cn: [u8; NONCE] = read_arr(s)?;
    if job != creds.job {
        return Err(refuse(
            s,
            Refusal::Job,
            &format!("job id {job:?} is not this job ({:?})", creds.job),
        ));
    }
    if let Err((code, why)) = admit(them) {
        return Err(refuse(s, code, &why));
    }
    let sn = nonce()?;
    let mut reply = Vec::with_capacity(90);
    reply.extend_from_slice(&MAGIC);
    reply.extend_from_slice(&VERSION.to_le_bytes());
    reply.push(0);
    reply.extend_from_slice(&me.peer.to_le_bytes());
    reply.extend_from_slice(&me.incarnation.to_le_bytes());
    reply.extend_from_slice(&sn);
    reply.extend_from_slice(
        &proof(&creds.secret, b"server", &cn, &sn, &creds.job, me)
            .finalize()
            .into_bytes(),
    );
    s.write_all(&reply)?;
    let cp: [u8; PROOF] = read_arr(s)?;
    if proof(&creds.secret, b"client", &sn, &cn, &creds.job, them)
        .verify_slice(&cp)
        .is_err()
    {
        return Err(refuse(
            s,
            Refusal::Auth,
            &format!(
                "peer {} failed authentication: wrong shared secret",
                them.peer
            ),
        ));
    }
    let mut ok = Vec::new();
    ok.extend_from_slice(&MAGIC);
    ok.extend_from_slice(&VERSION.to_le_bytes());
    ok.push(0);
    ok.extend(text(""));
    s.write_all(&ok)?;
    Ok(them)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn creds(job: &str, secret: &str) -> Credentials {
        Credentials {
            job: job.into(),
            secret: secret.as_bytes().to_vec(),
        }
    }

    fn pair(
        client_creds: Credentials,
        server_creds: Credentials,
        admit: fn(Identity) -> Result<(), (Refusal, String)>,
    ) -> (
        Result<Identity, HandshakeError>,
        Result<Identity, HandshakeError>,
        Vec<u8>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let me = Identity {
                peer: 0,
                incarnation: 3,
            };
            server(&mut s, &server_creds, me, admit)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let me = Identity {
            peer: 2,
            incarnation: 1,
        };
        let r = client(&mut c, &client_creds, me, 0);
        // a client that gave up closes its end, as the link does
        drop(c);
        (r, srv.join().unwrap(), client_creds.secret)
    }

    fn any(_: Identity) -> Result<(), (Refusal, String)> {
        Ok(())
    }

    #[test]
    fn matching_credentials_are_admitted_both_ways() {
        let (c, s, _) = pair(creds("job-a", "s3cret"), creds("job-a", "s3cret"), any);
        assert_eq!(
            c.unwrap(),
            Identity {
                peer: 0,
                incarnation: 3
            }
        );
        assert_eq!(
            s.unwrap(),
            Identity {
                peer: 2,
                incarnation: 1
            }
        );
    }

    #[test]
    fn a_wrong_secret_is_refused_by_both_sides() {
        let (c, s, _) = pair(creds("job-a", "wrong"), creds("job-a", "s3cret"), any);
        // the client checks the server's proof first and stops there
        assert!(matches!(c, Err(HandshakeError::BadProof)), "{c:?}");
        assert!(s.is_err(), "{s:?}");
    }

    #[test]
    fn a_wrong_job_is_refused_naming_both_ids() {
        let (c, s, _) = pair(creds("job-b", "s3cret"), creds("job-a", "s3cret"), any);
        match c {
            Err(HandshakeError::Refused { code, reason }) => {
                assert_eq!(code, Refusal::Job);
                assert!(
                    reason.contains("job-b") && reason.contains("job-a"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s,
            Err(HandshakeError::Refused {
                code: Refusal::Job,
                ..
            })
        ));
    }

    #[test]
    fn a_stale_incarnation_is_refused_before_any_proof() {
        fn stale(who: Identity) -> Result<(), (Refusal, String)> {
            Err((
                Refusal::Stale,
                format!("peer {} incarnation {} is stale", who.peer, who.incarnation),
            ))
        }
        let (c, _, _) = pair(creds("j", "k"), creds("j", "k"), stale);
        match c {
            Err(HandshakeError::Refused { code, reason }) => {
                assert_eq!(code, Refusal::Stale);
                assert!(reason.contains("incarnation 1"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_secret_never_crosses_the_wire() {
        // a recording stream: everything the client writes
        struct Tap(Vec<u8>, std::io::Cursor<Vec<u8>>);
        impl Read for Tap {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.1.read(b)
            }
        }
        impl Write for Tap {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let secret = "a-very-distinct-shared-secret";
        let mut tap = Tap(Vec::new(), std::io::Cursor::new(Vec::new()));
        let me = Identity {
            peer: 1,
            incarnation: 0,
        };
        // the server side never answers: the client fails reading, after writing its hello
        let _ = client(&mut tap, &creds("j", secret), me, 0);
        assert!(!tap.0.is_empty());
        assert!(!tap.0.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
}
