//! The run's loop as a sans-IO machine: which step runs next and at which learning rate, when to
//! evaluate, when to write the step's record, when to checkpoint, when the run is finished.
//!
//! The trainer is its driver: it runs each [`RunCommand`] (a step on its engine, an evaluation, a
//! metrics line, a snapshot for the uploader) and feeds back what happened. The policy lives here
//! once, so the same cadence holds for every engine (plain loop, threads, actors) and in the
//! simulator. Its [`LossMonitor`] judges every step: each step command carries the gate the
//! engine checks before applying the update, and a rejected step becomes a rollback command.

use super::monitor::{LossMonitor, MonitorState, Spike, SpikeGate, SpikeRules, Verdict};
use kernels::ops::adamw::LrSchedule;

/// The cadence of one run.
#[derive(Clone, Copy, Debug)]
pub struct RunPlan {
    /// The first step to run (1 for a fresh run, k + 1 after a checkpoint of step k).
    pub first_step: u64,
    /// The last step.
    pub total_steps: u64,
    /// Evaluate every this many steps (≥ 1) and after the last.
    pub eval_every: u64,
    /// Checkpoint every this many steps and after the last; `None`: never.
    pub ckpt_every: Option<u64>,
    pub lr: LrSchedule,
    pub spike: SpikeRules,
}

/// What the driver observed.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RunEvent {
    Start,
    /// Step `step` ran with this training loss and pre-clip gradient norm; `rejected`: the
    /// engine's gate refused its update (the committed state is unchanged).
    StepDone {
        step: u64,
        loss: f64,
        grad_norm: f64,
        rejected: Option<Spike>,
    },
    /// The evaluation after step `step` gave this loss.
    EvalDone {
        step: u64,
        loss: f64,
    },
}

/// What the driver must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RunCommand {
    /// Run step `step` at learning rate `lr`; apply its update only if it passes `gate`.
    Step { step: u64, lr: f32, gate: SpikeGate },
    /// Step `spike_step` was rejected: go back to the committed state of `to_step` (a no-op when
    /// it is the step before) and skip the data of the steps after it, up to the spike.
    Rollback {
        spike_step: u64,
        to_step: u64,
        why: Spike,
    },
    /// Too many rejected steps in a row: stop the run.
    Diverged { step: u64, why: Spike, times: u32 },
    /// Evaluate the model after step `step`.
    Eval { step: u64 },
    /// Write the step's record (metrics line, journal), with the evaluation if one ran.
    Record { step: u64, eval_loss: Option<f64> },
    /// Snapshot the committed state of step `step` for the uploader.
    Checkpoint { step: u64 },
    /// The last step is recorded: finish the run.
    Finish,
}

/// The loop around steps.
#[derive(Clone, Debug)]
pub struct RunController {
    plan: RunPlan,
    /// The last committed step and the newest evaluation loss.
    pub last_step: Option<u64>,
    pub eval_loss: Option<f64>,
    pub monitor: LossMonitor,
    started: bool,
    finished: bool,
}

impl RunController {
    /// A run from `plan`; `monitor` is the loss monitor's memory (default for a fresh run, the
    /// checkpoint's for a resumed one).
    pub fn new(plan: RunPlan, monitor: MonitorState) -> RunController {
        RunController {
            plan,
            last_step: None,
            eval_loss: None,
            monitor: LossMonitor::new(plan.spike, monitor),
            started: false,
            finished: false,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn step(&self, step: u64) -> RunCommand {
        RunCommand::Step {
            step,
            lr: self.plan.lr.at(step) * self.monitor.lr_factor(step),
            gate: self.monitor.gate(),
        }
    }

    /// Record, maybe checkpoint, then the next step or the end.
    fn close(&mut self, step: u64, eval_loss: Option<f64>) -> Vec<RunCommand> {
        let p = &self.plan;
        let mut out = vec![RunCommand::Record { step, eval_loss }];
        let last = step == p.total_steps;
        if let Some(every) = p.ckpt_every
            && (last || (every > 0 && step.is_multiple_of(every)))
        {
            out.push(RunCommand::Checkpoint { step });
        }
        if last {
            self.finished = true;
            out.push(RunCommand::Finish);
        } else {
            out.push(self.step(step + 1));
        }
        out
    }

    /// Feeds one event; returns what to do, in order. Events out of order (a second Start, a
    /// step that is not the one asked for) are ignored.
    pub fn on(&mut self, event: RunEvent) -> Vec<RunCommand> {
        if self.finished {
            return vec![];
        }
        let expected = self.last_step.map_or(self.plan.first_step, |s| s + 1);
        match event {
            RunEvent::Start if !self.started => {
                self.started = true;
                if self.plan.first_step > self.plan.total_steps {
                    self.finished = true;
                    return vec![RunCommand::Finish];
                }
                vec![self.step(self.plan.first_step)]
            }
            RunEvent::StepDone {
                step,
                loss,
                grad_norm,
                rejected,
            } if step == expected => {
                self.last_step = Some(step);
                let mut out = Vec::new();
                match self.monitor.on_step(step, loss, grad_norm, rejected) {
                    Verdict::Accepted => {}
                    Verdict::Rollback {
                        spike_step,
                        to_step,
                        why,
                    } => out.push(RunCommand::Rollback {
                        spike_step,
                        to_step,
                        why,
                    }),
                    Verdict::Diverged { step, why, times } => {
                        self.finished = true;
                        return vec![RunCommand::Diverged { step, why, times }];
                    }
                }
                let p = &self.plan;
                let due = step == p.total_steps || step.is_multiple_of(p.eval_every.max(1));
                if due {
                    out.push(RunCommand::Eval { step });
                } else {
                    out.extend(self.close(step, None));
                }
                out
            }
            RunEvent::EvalDone { step, loss } if Some(step) == self.last_step => {
                self.eval_loss = Some(loss);
                self.close(step, Some(loss))
            }
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(first: u64, total: u64, ckpt: Option<u64>) -> RunPlan {
        RunPlan {
            first_step: first,
            total_steps: total,
            eval_every: 3,
            ckpt_every: ckpt,
            spike: SpikeRules::default(),
            lr: LrSchedule {
                peak: 1.0,
                warmup: 2,
                decay_start: 100,
                total,
                min_ratio: 0.1,
            },
        }
    }

    /// Drives the controller as a driver would; returns the commands in order.
    fn drive(c: &mut RunController) -> Vec<RunCommand> {
        let mut log = Vec::new();
        let mut queue = c.on(RunEvent::Start);
        while !queue.is_empty() {
            let cmd = queue.remove(0);
            log.push(cmd);
            let next = match cmd {
                RunCommand::Step { step, gate, .. } => {
                    let loss = 1.0 / step as f64;
                    c.on(RunEvent::StepDone {
                        step,
                        loss,
                        grad_norm: 1.0,
                        rejected: gate.judge(loss, 1.0),
                    })
                }
                RunCommand::Eval { step } => c.on(RunEvent::EvalDone {
                    step,
                    loss: 2.0 / step as f64,
                }),
                _ => vec![],
            };
            queue.extend(next);
        }
        log
    }

    #[test]
    fn cadence_of_a_fresh_run() {
        let mut c = RunController::new(plan(1, 7, Some(5)), MonitorState::default());
        let log = drive(&mut c);
        let evals: Vec<u64> = log
            .iter()
            .filter_map(|c| match c {
                RunCommand::Eval { step } => Some(*step),
                _ => None,
            })
            .collect();
        assert_eq!(evals, vec![3, 6, 7], "every 3 steps and after the last");
        let ckpts: Vec<u64> = log
            .iter()
            .filter_map(|c| match c {
                RunCommand::Checkpoint { step } => Some(*step),
                _ => None,
            })
            .collect();
        assert_eq!(ckpts, vec![5, 7]);
        assert_eq!(
            log[0],
            RunCommand::Step {
                step: 1,
                lr: 0.5,
                gate: SpikeGate::open()
            },
            "warm-up: half the peak at step 1 of 2"
        );
        // an evaluation's loss travels with its step's record
        assert!(log.contains(&RunCommand::Record {
            step: 6,
            eval_loss: Some(2.0 / 6.0)
        }));
        assert_eq!(log.last(), Some(&RunCommand::Finish));
        assert!(c.is_finished());
        assert_eq!(c.eval_loss, Some(2.0 / 7.0));
    }

    #[test]
    fn a_resumed_run_starts_after_its_checkpoint_and_ignores_stale_events() {
        let mut c = RunController::new(plan(5, 6, None), MonitorState::default());
        assert_eq!(
            c.on(RunEvent::Start)[0],
            RunCommand::Step {
                step: 5,
                lr: 1.0,
                gate: SpikeGate::open()
            }
        );
        assert!(c.on(RunEvent::Start).is_empty(), "a second start");
        let done = |step| RunEvent::StepDone {
            step,
            loss: 1.0,
            grad_norm: 1.0,
            rejected: None,
        };
        assert!(c.on(done(4)).is_empty(), "not the step asked for");
        let cmds = c.on(done(5));
        assert_eq!(
            cmds,
            vec![
                RunCommand::Record {
                    step: 5,
                    eval_loss: None
                },
                RunCommand::Step {
                    step: 6,
                    lr: 1.0,
                    gate: SpikeGate::open()
                }
            ],
            "no checkpoints without a store"
        );
        // a run whose checkpoint is already its last step has nothing to do
        let mut done = RunController::new(plan(7, 6, Some(1)), MonitorState::default());
        assert_eq!(done.on(RunEvent::Start), vec![RunCommand::Finish]);
    }

    /// A rejected step becomes a rollback, is still recorded, and the run goes on with the next
    /// step at the lowered rate; the monitor's memory decides the same after a resume.
    #[test]
    fn a_rejected_step_rolls_back_and_the_run_goes_on() {
        let mut p = plan(1, 12, None);
        p.spike.lr_factor = 0.5;
        p.spike.lr_steps = 2;
        p.lr.warmup = 0;
        let mut c = RunController::new(p, MonitorState::default());
        let mut queue: Vec<RunCommand> = c.on(RunEvent::Start);
        let mut log = Vec::new();
        while !queue.is_empty() {
            let cmd = queue.remove(0);
            log.push(cmd);
            if let RunCommand::Step { step, gate, .. } = cmd {
                let loss = if step == 9 { 10.0 } else { 1.0 };
                queue.extend(c.on(RunEvent::StepDone {
                    step,
                    loss,
                    grad_norm: 1.0,
                    rejected: gate.judge(loss, 1.0),
                }));
            } else if let RunCommand::Eval { step } = cmd {
                queue.extend(c.on(RunEvent::EvalDone { step, loss: 1.0 }));
            }
        }
        let i = log
            .iter()
            .position(|c| matches!(c, RunCommand::Rollback { .. }))
            .expect("a rollback");
        assert_eq!(
            log[i],
            RunCommand::Rollback {
                spike_step: 9,
                to_step: 8,
                why: Spike::Loss {
                    loss: 10.0,
                    limit: 3.0
                }
            }
        );
        assert!(matches!(log[i + 1], RunCommand::Eval { step: 9 }));
        let lrs: Vec<(u64, f32)> = log
            .iter()
            .filter_map(|c| match c {
                RunCommand::Step { step, lr, .. } if *step >= 9 => Some((*step, *lr)),
                _ => None,
            })
            .collect();
        assert_eq!(lrs, vec![(9, 1.0), (10, 0.5), (11, 0.5), (12, 1.0)]);
        assert_eq!(log.last(), Some(&RunCommand::Finish));
        assert_eq!(c.monitor.state.rollbacks, 1);
    }
}
