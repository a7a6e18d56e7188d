//! `phalanx bench transport`: the TCP link's throughput on loopback beside a plain tokio socket
//! moving the same bytes, and what one training step puts on the wire (activation frames with
//! FP8 or F32, and the gradients, parameters and mirrors the coordinator exchanges).

use super::protocol::{Activation, head};
use crate::core::executor::Arrival;
use crate::formation::compute::Wire;
use crate::schedule::{ScheduleKind, build, check};
use anyhow::{Context, Result, anyhow};
use kernels::model::RunConfig;
use kernels::model::stage::{Stage, partition};
use std::time::{Duration, Instant};
use transport::link::{ENVELOPE_OVERHEAD, Link, Received};
use transport::tcp::{TcpConfig, TcpLink};

/// One frame size's throughput.
#[derive(Clone, Debug)]
pub struct LinkThroughput {
    pub frame_bytes: usize,
    pub frames: usize,
    pub link_gb_s: f64,
    pub tokio_gb_s: f64,
}

/// Best of `reps` runs of `frames` frames of `frame_bytes` through the TCP link (authenticated
/// connection, envelope, checksum both ways, a fresh buffer per received frame) and through a
/// plain tokio socket (write_all, read_exact into one reused buffer).
pub fn link_throughput(frame_bytes: usize, frames: usize, reps: usize) -> Result<LinkThroughput> {
    let mut cfg = TcpConfig::new("bench", b"bench-secret");
    cfg.link.max_payload = frame_bytes.max(1 << 20);
    cfg.link.send_timeout = Duration::from_secs(30);
    let any = "127.0.0.1:0".parse().expect("literal");
    let a = TcpLink::bind(0, 0, 2, any, cfg.clone()).map_err(|e| anyhow!("{e}"))?;
    let b = TcpLink::bind(1, 0, 2, any, cfg).map_err(|e| anyhow!("{e}"))?;
    a.set_peer(1, b.local_addr(), 0);
    let payload = vec![0x5Au8; frame_bytes];
    let mut link_best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let sender = s.spawn(|| -> Result<()> {
                for _ in 0..frames {
                    a.send_message(1, 1, &payload).map_err(|e| anyhow!("{e}"))?;
                }
                Ok(())
            });
            let mut got = 0;
            while got < frames {
                match b
                    .recv_timeout(Duration::from_secs(30))
                    .map_err(|e| anyhow!("{e}"))?
                {
                    Some(Received::Message(m)) => {
                        anyhow::ensure!(m.payload.len() == frame_bytes, "short frame");
                        got += 1;
                    }
                    other => return Err(anyhow!("bench link: {other:?}")),
                }
            }
            sender.join().map_err(|_| anyhow!("sender panicked"))??;
            Ok(())
        })?;
        link_best = link_best.min(t.elapsed().as_secs_f64());
    }
    let tokio_best = tokio_copy(frame_bytes, frames, reps)?;
    let bytes = (frame_bytes * frames) as f64;
    Ok(LinkThroughput {
        frame_bytes,
        frames,
        link_gb_s: bytes / link_best / 1e9,
        tokio_gb_s: bytes / tokio_best / 1e9,
    })
}

/// Best seconds of a plain tokio loopback copy of the same frames.
fn tokio_copy(frame_bytes: usize, frames: usize, reps: usize) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let reader = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await?;
                let mut buf = vec![0u8; frame_bytes];
                for _ in 0..frames {
                    s.read_exact(&mut buf).await?;
                }
                Ok::<_, std::io::Error>(())
            });
            let mut w = tokio::net::TcpStream::connect(addr).await?;
            w.set_nodelay(true)?;
            let payload = vec![0x5Au8; frame_bytes];
            let t = Instant::now();
            for _ in 0..frames {
                w.write_all(&payload).await?;
            }
            reader.await.map_err(|e| anyhow!("{e}"))??;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    })
}

/// What one step of a layout puts on the wire.
#[derive(Clone, Debug)]
pub struct WireBytes {
    pub config: String,
    pub pp: usize,
    pub microbatches: usize,
    /// Cross-rank activation and gradient messages per step.
    pub messages: usize,
    pub f32_bytes: u64,
    pub fp8_bytes: u64,
    /// Gradients to the coordinator, new parameters back and the committed mirror (f32), per
    /// step.
    pub coordinator_bytes: u64,
}

/// Bytes per step of `config` as `--pp pp --schedule dualpipe` with `2·pp` micro-batches: every
/// message's envelope, head and frame as the workers send them.
pub fn wire_bytes_per_step(config: &str, batch: usize, seq: usize, pp: usize) -> Result<WireBytes> {
    let run = RunConfig::load(std::path::Path::new(config)).map_err(|e| anyhow!("{e}"))?;
    let m = 2 * pp;
    let schedule = build(ScheduleKind::DualPipe, pp, m)?;
    let report = check(&schedule).map_err(|e| anyhow!("{e}"))?;
    let d = run.model.hidden_size;
    let values = (batch / m).max(1) * seq * d;
    let arrival = Arrival::Activation { stage: 0, mb: 0 };
    let h = head(&Activation {
        step: 1,
        attempt: 0,
        arrival,
    })?
    .len();
    let per =
        |w: Wire| (ENVELOPE_OVERHEAD + h + w.encode(arrival, vec![0.5; values], d).len()) as u64;
    let model = kernels::model::DeepSeekV3::new(&run.model, 0.02, 0);
    let stages = schedule.kind.model_stages(pp);
    let ranges = partition(model.cfg.num_hidden_layers, stages);
    let len = |g: usize| model.params.tensors[g].data.len() as u64;
    let mut coordinator = 0u64;
    for rank in 0..pp {
        let mut held = std::collections::BTreeSet::new();
        for copy in schedule.stages_on(rank) {
            let st = Stage::from_model(&model, &ranges, schedule.stages[copy].model_stage);
            // up: the copy's running sum of the one half of the micro-batches it ran
            coordinator += 4 * st.global.iter().map(|g| len(g.0)).sum::<u64>();
            held.extend(st.global.iter().map(|g| g.0));
        }
        // down: the new values of every tensor the rank holds, then its mirror of the
        // committed state (values again, and both moments of the trainable ones)
        for &g in &held {
            let moments = if model.params.trainable[g] { 2 } else { 0 };
            coordinator += 4 * len(g) * (2 + moments);
        }
    }
    Ok(WireBytes {
        config: config.to_string(),
        pp,
        microbatches: m,
        messages: report.messages,
        f32_bytes: report.messages as u64 * per(Wire::F32),
        fp8_bytes: report.messages as u64 * per(Wire::Fp8),
        coordinator_bytes: coordinator,
    })
}
