//! The formation: the trainer as a pipeline of stage copies, run by a thread executor or by
//! supervised actors, with step transactions, fault injection, restart and replay.
//!
//! Sans-IO parts: [`executor`] (which instruction a rank may run next), [`txn`] (the step
//! transaction) and [`restart`] (the restart policy). Shells: [`threads`] (one OS thread per rank,
//! no failures) and the ractor formation.

pub mod compute;
pub mod executor;
pub mod restart;
pub mod threads;
pub mod txn;

pub use compute::Wire;

use crate::schedule::{ScheduleKind, build};
use crate::trainer::{self, StepRecord, TrainOptions, TrainSummary};
use anyhow::{Result, anyhow, bail};
use std::sync::Arc;

/// How the model is laid out over the formation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Pipeline ranks (`--pp`); DualPipeV runs `2·pp` model stages on them.
    pub pp: usize,
    /// Expert groups (`--ep`); only 1 is supported so far.
    pub ep: usize,
    pub schedule: ScheduleKind,
    /// Micro-batches per step; the batch size must be a multiple.
    pub microbatches: usize,
    pub wire: Wire,
}

impl Default for Layout {
    /// One rank, 1F1B, one micro-batch, f32 wire: the single-process step.
    fn default() -> Layout {
        Layout {
            pp: 1,
            ep: 1,
            schedule: ScheduleKind::OneFOneB,
            microbatches: 1,
            wire: Wire::F32,
        }
    }
}

impl Layout {
    /// Checks the layout against the options; errors name the flag.
    pub fn validate(&self, opts: &TrainOptions) -> Result<()> {
        let t = &opts.config.training;
        if self.pp == 0 {
            bail!("--pp must be at least 1");
        }
        if self.ep != 1 {
            bail!(
                "--ep {}: expert parallelism is not built yet (only --ep 1)",
                self.ep
            );
        }
        if self.microbatches == 0 || !t.batch_size.is_multiple_of(self.microbatches) {
            bail!(
                "--microbatches {}: the batch size {} must be a positive multiple of it",
                self.microbatches,
                t.batch_size
            );
        }
        build(self.schedule, self.pp, self.microbatches)
            .map_err(|e| anyhow!("--schedule {} --pp {}: {e}", self.schedule, self.pp))?;
        Ok(())
    }
}

/// Trains with the formation: the model cut into the stage copies of `layout.schedule` on
/// `layout.pp` ranks, `layout.microbatches` per step. With `inject`, faults are injected and
/// healed (restart, restore, replay); the summary counts restarts and replayed steps.
pub fn train(
    opts: &TrainOptions,
    layout: &Layout,
    inject: Option<inject::InjectPlan>,
    on_step: impl FnMut(&StepRecord, u64),
) -> Result<TrainSummary> {
    layout.validate(opts)?;
    let data = Arc::new(trainer::open_data(opts)?);
    tracing::info!(data = %data.description, "data ready");
    let model = trainer::build_model(opts)?;
    let t = &opts.config.training;
    let schedule = build(layout.schedule, layout.pp, layout.microbatches)?;
    match inject {
        None => {
            let pipeline =
                threads::Pipeline::new(&model, schedule, t.mtp_loss_weight, layout.wire)?;
            let mut engine = threads::ThreadEngine {
                pipeline,
                data: data.clone(),
                seed: opts.seed,
                batch: t.batch_size,
                seq: t.seq_len,
            };
            trainer::run(opts, &data, model, &mut engine, on_step)
        }
        Some(_) => bail!("fault injection needs the actor formation, which is not built yet"),
    }
}

pub mod inject {
    //! Placeholder until the fault-injection plan lands.
    /// Faults to inject into a run.
    #[derive(Clone, Debug, Default, PartialEq)]
    pub struct InjectPlan;
}
