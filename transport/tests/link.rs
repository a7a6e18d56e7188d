//! The in-process link seen from outside the crate: delivery between endpoints, refusal and
//! counting of tampered envelopes, payload limits, back-pressure, closed and unknown peers, and
//! tensor frames carried as envelope payloads.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use transport::link::{CRC_LEN, ENVELOPE_OVERHEAD, HEADER_LEN};
use transport::{
    Frame, FrameMeta, InProcEndpoint, Link, LinkConfig, LinkError, LinkStats, Message, Received,
    encode_envelope, in_process_network,
};

const SHORT: Duration = Duration::from_millis(50);
const LONG: Duration = Duration::from_secs(10);

fn pair(config: LinkConfig) -> (InProcEndpoint, InProcEndpoint) {
    let mut eps = in_process_network(2, config).unwrap();
    let b = eps.pop().unwrap();
    let a = eps.pop().unwrap();
    (a, b)
}

fn message(r: Option<Received>) -> Message {
    match r {
        Some(Received::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn refusal(r: Option<Received>) -> LinkError {
    match r {
        Some(Received::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Rewrites bytes `at..` of an envelope and recomputes its checksum, so only the check aimed at
/// that field can catch it.
fn patched(mut bytes: Vec<u8>, at: usize, with: &[u8]) -> Vec<u8> {
    bytes[at..at + with.len()].copy_from_slice(with);
    let body = bytes.len() - CRC_LEN;
    let crc = crc32c::crc32c(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn messages_round_trip_in_order_between_two_endpoints() {
    let (a, b) = pair(LinkConfig::default());
    assert_eq!((a.me(), b.me(), a.peers()), (0, 1, 2));
    a.send_message(1, 10, b"first").unwrap();
    a.send_message(1, 11, b"second").unwrap();
    b.send_message(0, 12, &[]).unwrap();

    let m = message(b.recv_timeout(LONG).unwrap());
    assert_eq!(
        m,
        Message {
            sender: 0,
            tag: 10,
            payload: b"first".to_vec()
        }
    );
    assert_eq!(message(b.recv_timeout(LONG).unwrap()).tag, 11);
    assert_eq!(b.recv_timeout(Duration::ZERO).unwrap(), None);
    let m = message(a.recv_timeout(LONG).unwrap());
    assert_eq!((m.sender, m.tag, m.payload.len()), (1, 12, 0));

    let bytes = (2 * ENVELOPE_OVERHEAD + 11) as u64;
    assert_eq!(
        a.stats(),
        LinkStats {
            sent: 2,
            received: 1,
            refused: 0,
            bytes_sent: bytes,
            bytes_received: ENVELOPE_OVERHEAD as u64
        }
    );
    assert_eq!((b.stats().received, b.stats().bytes_received), (2, bytes));
}

#[test]
fn an_endpoint_can_send_to_itself_and_times_out_when_idle() {
    let eps = in_process_network(1, LinkConfig::default()).unwrap();
    eps[0].send_message(0, 1, b"loop").unwrap();
    assert_eq!(message(eps[0].recv_timeout(LONG).unwrap()).payload, b"loop");
    let t = Instant::now();
    assert_eq!(eps[0].recv_timeout(SHORT).unwrap(), None);
    assert!(t.elapsed() >= SHORT);
}

#[test]
fn a_tensor_frame_travels_as_an_envelope_payload() {
    let (a, b) = pair(LinkConfig::default());
    let meta = FrameMeta {
        step: 5,
        micro_batch: 2,
        source: 0,
        destination: 1,
    };
    let x: Vec<f32> = (0..4 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    let frames = [
        Frame::from_f32(meta, &[4, 256], x.clone()).unwrap(),
        Frame::fp8_from_f32(meta, &[4, 256], &x, kernels::fp8::quant::ScaleFormat::F32).unwrap(),
    ];
    const ACTIVATION: u32 = 1;
    for f in &frames {
        a.send_message(1, ACTIVATION, &f.encode()).unwrap();
    }
    for f in &frames {
        let m = message(b.recv_timeout(LONG).unwrap());
        assert_eq!(m.tag, ACTIVATION);
        assert_eq!(&Frame::decode(&m.payload).unwrap(), f);
    }
}

#[test]
fn a_tampered_envelope_is_refused_and_counted_as_lost() {
    let (a, b) = pair(LinkConfig::default());
    let mut bytes = encode_envelope(0, 3, &[7; 100]).unwrap();
    bytes[HEADER_LEN + 50] ^= 0x40;
    a.send(1, bytes).unwrap();
    a.send_message(1, 4, b"after").unwrap();

    let e = refusal(b.recv_timeout(LONG).unwrap());
    assert!(matches!(e, LinkError::BadChecksum { .. }), "{e}");
    assert_eq!(message(b.recv_timeout(LONG).unwrap()).payload, b"after");
    let s = b.stats();
    assert_eq!((s.received, s.refused), (1, 1));
    assert_eq!(a.stats().sent, 2);
}

#[test]
fn unknown_version_and_oversized_length_are_refused_on_receipt() {
    let config = LinkConfig {
        max_payload: 1000,
        ..LinkConfig::default()
    };
    let (a, b) = pair(config);
    let good = encode_envelope(0, 1, &[1; 16]).unwrap();
    a.send(1, patched(good.clone(), 4, &7u16.to_le_bytes()))
        .unwrap();
    a.send(1, patched(good.clone(), 14, &5000u32.to_le_bytes()))
        .unwrap();
    a.send(1, b"not an envelope".to_vec()).unwrap();

    let e = refusal(b.recv_timeout(LONG).unwrap());
    assert_eq!(
        e,
        LinkError::UnsupportedVersion {
            found: 7,
            supported: 1
        }
    );
    let e = refusal(b.recv_timeout(LONG).unwrap());
    assert_eq!(
        e,
        LinkError::PayloadTooLarge {
            len: 5000,
            max: 1000
        }
    );
    let e = refusal(b.recv_timeout(LONG).unwrap());
    assert!(
        matches!(e, LinkError::BadMagic { found } if found == *b"not "),
        "{e}"
    );
    assert_eq!((b.stats().refused, b.stats().received), (3, 0));
}

#[test]
fn payloads_over_the_limit_are_refused_on_send() {
    let config = LinkConfig {
        max_payload: 1000,
        ..LinkConfig::default()
    };
    let (a, b) = pair(config);
    assert_eq!(
        a.send_message(1, 0, &[0; 1001]).unwrap_err(),
        LinkError::PayloadTooLarge {
            len: 1001,
            max: 1000
        }
    );
    let big = encode_envelope(0, 0, &[0; 1001]).unwrap();
    assert_eq!(
        a.send(1, big).unwrap_err(),
        LinkError::PayloadTooLarge {
            len: 1001,
            max: 1000
        }
    );
    a.send_message(1, 0, &[0; 1000]).unwrap();
    assert_eq!(message(b.recv_timeout(LONG).unwrap()).payload.len(), 1000);
    assert_eq!(a.stats().sent, 1);
}

#[test]
fn a_full_queue_makes_send_time_out_with_backpressure() {
    let config = LinkConfig {
        capacity: 2,
        send_timeout: SHORT,
        ..LinkConfig::default()
    };
    let (a, b) = pair(config);
    a.send_message(1, 0, b"1").unwrap();
    a.send_message(1, 0, b"2").unwrap();
    let t = Instant::now();
    let e = a.send_message(1, 0, b"3").unwrap_err();
    assert!(t.elapsed() >= SHORT, "gave up after {:?}", t.elapsed());
    assert_eq!(
        e,
        LinkError::Backpressure {
            peer: 1,
            capacity: 2,
            waited: SHORT
        }
    );
    assert!(e.to_string().contains("back-pressure"), "{e}");
    assert_eq!(a.stats().sent, 2);

    // Draining one makes room again.
    assert_eq!(message(b.recv_timeout(LONG).unwrap()).payload, b"1");
    a.send_message(1, 0, b"3").unwrap();
}

#[test]
fn a_blocked_sender_proceeds_once_the_receiver_drains() {
    let config = LinkConfig {
        capacity: 1,
        send_timeout: LONG,
        ..LinkConfig::default()
    };
    let (a, b) = pair(config);
    const N: u32 = 500;
    let producer = thread::spawn(move || {
        for i in 0..N {
            a.send_message(1, i, &i.to_le_bytes()).unwrap();
        }
        a.stats()
    });
    for i in 0..N {
        let m = message(b.recv_timeout(LONG).unwrap());
        assert_eq!(
            (m.sender, m.tag, m.payload),
            (0, i, i.to_le_bytes().to_vec())
        );
    }
    assert_eq!(producer.join().unwrap().sent, N as u64);
    assert_eq!(b.stats().received, N as u64);
}

#[test]
fn sending_to_a_dropped_or_unknown_peer_is_an_error() {
    let (a, b) = pair(LinkConfig::default());
    a.send_message(1, 0, b"queued").unwrap();
    drop(b);
    assert_eq!(
        a.send_message(1, 0, b"x").unwrap_err(),
        LinkError::PeerClosed { peer: 1 }
    );
    let e = a.send(2, vec![]).unwrap_err();
    assert_eq!(e, LinkError::UnknownPeer { peer: 2, peers: 2 });
    assert!(e.to_string().contains("unknown peer 2"), "{e}");
    assert_eq!(a.stats().sent, 1);
}

#[test]
fn a_sender_blocked_on_a_full_queue_learns_when_the_peer_drops() {
    let config = LinkConfig {
        capacity: 1,
        send_timeout: LONG,
        ..LinkConfig::default()
    };
    let (a, b) = pair(config);
    a.send_message(1, 0, b"fills the queue").unwrap();
    let a = Arc::new(a);
    let sender = {
        let a = Arc::clone(&a);
        thread::spawn(move || {
            let t = Instant::now();
            (a.send_message(1, 0, b"waits"), t.elapsed())
        })
    };
    thread::sleep(SHORT);
    drop(b);
    let (r, waited) = sender.join().unwrap();
    assert_eq!(r.unwrap_err(), LinkError::PeerClosed { peer: 1 });
    assert!(waited < LONG, "waited {waited:?}");
}

#[test]
fn endpoints_work_behind_the_trait_object() {
    let links: Vec<Arc<dyn Link>> = in_process_network(3, LinkConfig::with_capacity(4))
        .unwrap()
        .into_iter()
        .map(|e| Arc::new(e) as Arc<dyn Link>)
        .collect();
    let handles: Vec<_> = (0..3)
        .map(|me| {
            let link = Arc::clone(&links[me]);
            thread::spawn(move || {
                let to = (me + 1) % 3;
                link.send_message(to, me as u32, b"ring").unwrap();
                message(link.recv_timeout(LONG).unwrap()).sender
            })
        })
        .collect();
    let senders: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(senders, vec![2, 0, 1]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any single flipped byte, anywhere in the envelope, reaches the receiver as a refusal and
    /// a count in `refused`, never as a message.
    #[test]
    fn any_flipped_byte_in_flight_is_refused(
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let (a, b) = pair(LinkConfig::default());
        let mut bytes = encode_envelope(0, 9, &payload).unwrap();
        let i = at.index(bytes.len());
        bytes[i] ^= flip;
        a.send(1, bytes).unwrap();
        let r = b.recv_timeout(LONG).unwrap();
        prop_assert!(matches!(r, Some(Received::Refused(_))), "byte {} flipped: {:?}", i, r);
        prop_assert_eq!((b.stats().refused, b.stats().received), (1, 0));
    }

    /// Cutting an envelope short anywhere is refused as truncated.
    #[test]
    fn any_truncation_in_flight_is_refused(
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        keep in any::<prop::sample::Index>(),
    ) {
        let (a, b) = pair(LinkConfig::default());
        let mut bytes = encode_envelope(0, 9, &payload).unwrap();
        bytes.truncate(keep.index(bytes.len()));
        a.send(1, bytes).unwrap();
        let r = b.recv_timeout(LONG).unwrap();
        prop_assert!(
            matches!(r, Some(Received::Refused(LinkError::Truncated { .. }))),
            "{:?}", r
        );
        prop_assert_eq!(b.stats().refused, 1);
    }
}
