//! The DataLoader: serves each step's micro-batches, a pure function of (seed, step), so a
//! restarted loader serves the same ones. Its answer (to the coordinator) names the batches in
//! the payload store and carries a CRC32C of their tokens that the coordinator checks; a damaged
//! or missing answer is asked for again.

use super::protocol::{Checked, CoordMsg, DataMsg};
use super::{Ctx, fire};
use crate::inject::{FaultKind, Phase, Target};
use crate::trainer;
use kernels::model::Batch;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::Arc;
use std::time::{Duration, Instant};
use storage::dataset::Dataset;

pub struct DataLoader;

#[derive(Clone)]
pub struct DataArgs {
    pub ctx: Arc<Ctx>,
    pub data: Arc<Dataset>,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
    pub microbatches: usize,
}

/// The checksum of a step's micro-batches (inputs and targets of each, in order).
pub fn batches_crc(b: &[Batch]) -> u32 {
    let mut crc = 0u32;
    for mb in b {
        for t in [&mb.inputs, &mb.targets] {
            let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
            crc = crc32c::crc32c_append(crc, &bytes);
        }
    }
    crc
}

impl Actor for DataLoader {
    type Msg = DataMsg;
    type State = (DataArgs, Option<(u64, Arc<Vec<Batch>>)>);
    type Arguments = DataArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DataMsg>,
        a: DataArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((a, None))
    }

    async fn handle(
        &self,
        _myself: ActorRef<DataMsg>,
        msg: DataMsg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let DataMsg::Get { step } = msg;
        let (a, cache) = st;
        let started = Instant::now();
        let mut faults = Vec::new();
        while let Some(f) = a
            .ctx
            .faults
            .take(step, Phase::Forward, Target::Dataloader, 0)
        {
            if matches!(f.kind, FaultKind::Panic | FaultKind::Hang) {
                fire(f, format!("data loader at step {step}"), Duration::ZERO).await;
            }
            faults.push(f);
        }
        let r = match cache.as_ref() {
            Some((s, b)) if *s == step => Ok(b.clone()),
            _ => trainer::microbatches(&a.data, a.seed, step, a.batch, a.seq, a.microbatches)
                .map(Arc::new)
                .map_err(|e| format!("{e:#}")),
        };
        if let Ok(b) = &r {
            *cache = Some((step, b.clone()));
        }
        let mut r = r.map(|b| (batches_crc(&b), b));
        let mut copies = 1;
        for f in faults {
            match f.kind {
                FaultKind::Slow => {
                    let took = started.elapsed().max(Duration::from_millis(20));
                    fire(f, format!("data loader at step {step}"), took).await;
                }
                FaultKind::Drop => {
                    tracing::warn!(step, "injected drop of the data loader's answer");
                    copies = 0;
                }
                FaultKind::Corrupt => {
                    // a flipped token after the checksum was taken: the coordinator refuses it
                    if let Ok((_, b)) = &mut r {
                        let mut damaged = (**b).clone();
                        if let Some(t) = damaged.first_mut().and_then(|mb| mb.inputs.first_mut()) {
                            *t ^= 1;
                        }
                        *b = Arc::new(damaged);
                    }
                    tracing::warn!(step, "injected corruption of the data loader's answer");
                }
                // a second delivery of the same answer: the coordinator takes the first
                FaultKind::Dup => {
                    tracing::warn!(step, "injected duplicate of the data loader's answer");
                    copies *= 2;
                }
                FaultKind::Panic
                | FaultKind::Hang
                | FaultKind::LossSpike
                | FaultKind::StoreOutage => {}
            }
        }
        let answer = r.map(|(crc, b)| Checked {
            crc,
            batches: a.ctx.payloads.share(step, b),
        });
        for _ in 0..copies {
            a.ctx.to_coord(CoordMsg::Batches {
                step,
                result: answer.clone(),
            });
        }
        Ok(())
    }
}
