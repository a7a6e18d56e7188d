//! One stage copy's weight gradients over a step, summed while its W passes run: one running sum
//! per half of the step's micro-batches, micro-batches in order (a W that runs early waits, as
//! its queued jobs, for its turn), and the jobs on shared tensors kept per micro-batch for the
//! reduce. A copy holds at most two gradient buffers, never one per micro-batch.

use super::Stage;
use crate::model::params::{WeightGrad, WeightGradQueue};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::ops::Range;

/// Micro-batches of half `h` (0 or 1) of a step of `microbatches`: `0..⌈m/2⌉`, then the rest.
/// DualPipe runs the first half on its forward lane and the second on its reverse lane.
pub fn half_range(h: usize, microbatches: usize) -> Range<usize> {
    let mid = microbatches.div_ceil(2);
    if h == 0 { 0..mid } else { mid..microbatches }
}

/// The half (0 or 1) that micro-batch `mb` of `microbatches` belongs to.
pub fn half_of(mb: usize, microbatches: usize) -> usize {
    usize::from(mb >= microbatches.div_ceil(2))
}

/// The order W runs in within a step: per half of the micro-batches, the next one whose W may
/// run; a W that comes early waits, its item kept, until its predecessors in the half have run.
/// The CPU runner's [`GradSums`] and a device stage keep their W in this one order.
#[derive(Debug)]
pub struct HalfOrder<T> {
    microbatches: usize,
    next: [usize; 2],
    waiting: BTreeMap<usize, T>,
}

impl<T> HalfOrder<T> {
    pub fn new(microbatches: usize) -> HalfOrder<T> {
        HalfOrder {
            microbatches,
            next: [
                half_range(0, microbatches).start,
                half_range(1, microbatches).start,
            ],
            waiting: BTreeMap::new(),
        }
    }

    /// The W of micro-batch `mb` (its `item`) arrives: the items that may run now, in order
    /// (`mb`'s and every waiting successor's), or none when it must wait. A micro-batch out of
    /// range or whose W came before is refused.
    pub fn arrive(&mut self, mb: usize, item: T) -> Result<Vec<(usize, T)>, String> {
        let m = self.microbatches;
        if mb >= m {
            return Err(format!("W of micro-batch {mb} of {m}"));
        }
        let h = half_of(mb, m);
        if mb < self.next[h] || self.waiting.contains_key(&mb) {
            return Err(format!("W of micro-batch {mb} ran twice"));
        }
        if mb != self.next[h] {
            self.waiting.insert(mb, item);
            return Ok(Vec::new());
        }
        let end = half_range(h, m).end;
        let mut ready = vec![(mb, item)];
        self.next[h] += 1;
        while self.next[h] < end {
            let Some(item) = self.waiting.remove(&self.next[h]) else {
                break;
            };
            ready.push((self.next[h], item));
            self.next[h] += 1;
        }
        Ok(ready)
    }

    /// The micro-batch whose W runs next in half `h` (the half's end once all have).
    pub fn next(&self, h: usize) -> usize {
        self.next[h]
    }

    /// Micro-batches whose W came before an earlier one's and still waits.
    pub fn waiting(&self) -> impl Iterator<Item = usize> + '_ {
        self.waiting.keys().copied()
    }
}

/// The running sum of one half: every W job of its micro-batches so far, in micro-batch order.
#[derive(Debug)]
pub struct HalfSum {
    /// Per local tensor, zero-initialised.
    pub sums: Vec<Tensor>,
    /// The next micro-batch whose W may run into `sums` (the half's end once all have).
    pub next: usize,
}

/// A stage copy's gradients of the open step.
#[derive(Debug)]
pub struct GradSums {
    microbatches: usize,
    pub halves: [Option<HalfSum>; 2],
    /// The order W runs in; W queues that came before their turn wait in it.
    order: HalfOrder<WeightGradQueue>,
    /// Per micro-batch: this stage's jobs on shared tensors (local ids), in queue order.
    pub shared: BTreeMap<usize, Vec<WeightGrad>>,
}

impl GradSums {
    pub fn new(microbatches: usize) -> GradSums {
        GradSums {
            microbatches,
            halves: [None, None],
            order: HalfOrder::new(microbatches),
            shared: BTreeMap::new(),
        }
    }

    /// The sums of a copy rebuilt from their parts (as another process sent them): nothing
    /// waits, every W that came has run.
    pub fn from_parts(
        microbatches: usize,
        halves: [Option<HalfSum>; 2],
        shared: BTreeMap<usize, Vec<WeightGrad>>,
    ) -> GradSums {
        GradSums {
            microbatches,
            halves,
            order: HalfOrder::new(microbatches),
            shared,
        }
    }

    pub fn microbatches(&self) -> usize {
        self.microbatches
    }

    /// The jobs on shared tensors moved out into sums of their own (None when there are none),
    /// so that the stage owning those tensors can reduce them while this copy's own stage
    /// reduces the rest.
    pub fn split_shared(&mut self) -> Option<GradSums> {
        let shared = std::mem::take(&mut self.shared);
        (!shared.is_empty()).then(|| GradSums::from_parts(self.microbatches, [None, None], shared))
    }

    /// W of micro-batch `mb` (its queued jobs `q`): runs now when `mb` is next in its half, then
    /// every waiting successor; otherwise waits.
    pub fn weight(&mut self, stage: &Stage, mb: usize, q: WeightGradQueue) {
        let m = self.microbatches;
        let ready = self
            .order
            .arrive(mb, q)
            .unwrap_or_else(|e| panic!("stage {}: {e}", stage.index));
        let h = half_of(mb, m);
        let half = self.halves[h].get_or_insert_with(|| HalfSum {
            sums: stage.params.zeros_like(),
            next: half_range(h, m).start,
        });
        for (mb, mut q) in ready {
            let handed = stage.backward_weight(&mut q, &mut half.sums);
            if !handed.is_empty() {
                self.shared.insert(mb, handed);
            }
        }
        half.next = self.order.next(h);
    }

    /// Micro-batches whose W came before an earlier one's and still waits.
    pub fn waiting(&self) -> impl Iterator<Item = usize> + '_ {
        self.order.waiting()
    }
}
