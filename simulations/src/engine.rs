//! The discrete-event loop: events in virtual time (integer nanoseconds), taken in time order,
//! ties broken by the order they were scheduled in, so a scenario and a seed always give the
//! same sequence. Random numbers come from one stream per purpose (`kernels::rng`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Virtual time in nanoseconds.
pub type Nanos = u64;

pub const SECOND: Nanos = 1_000_000_000;

pub fn secs(s: f64) -> Nanos {
    (s.max(0.0) * SECOND as f64).round() as Nanos
}

pub fn to_secs(t: Nanos) -> f64 {
    t as f64 / SECOND as f64
}

/// Pending events, earliest first; equal times in scheduling order.
#[derive(Debug)]
pub struct Queue<E> {
    heap: BinaryHeap<Reverse<(Nanos, u64)>>,
    events: std::collections::BTreeMap<u64, E>,
    seq: u64,
    /// Events taken so far.
    pub taken: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            heap: BinaryHeap::new(),
            events: Default::default(),
            seq: 0,
            taken: 0,
        }
    }
}

impl<E> Queue<E> {
    /// Schedules `ev` at `at`; returns its id (for [`Queue::cancel`]).
    pub fn at(&mut self, at: Nanos, ev: E) -> u64 {
        let id = self.seq;
        self.seq += 1;
        self.heap.push(Reverse((at, id)));
        self.events.insert(id, ev);
        id
    }

    /// Drops a scheduled event (a no-op for one already taken).
    pub fn cancel(&mut self, id: u64) {
        self.events.remove(&id);
    }

    /// The next event and its time.
    pub fn pop(&mut self) -> Option<(Nanos, E)> {
        while let Some(Reverse((t, id))) = self.heap.pop() {
            if let Some(ev) = self.events.remove(&id) {
                self.taken += 1;
                return Some((t, ev));
            }
        }
        None
    }
}

/// Seeded draws for one purpose: f64 uniforms, exponentials, lognormals.
#[derive(Clone, Debug)]
pub struct Draws(kernels::rng::Rng);

impl Draws {
    pub fn new(seed: u64, purpose: &str) -> Draws {
        Draws(kernels::rng::Rng::stream(seed, purpose))
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }

    /// Lognormal with the given median and log-space standard deviation.
    pub fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        let (u1, u2) = (1.0 - self.uniform(), self.uniform());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        median * (sigma * z).exp()
    }

    /// An index drawn with the given weights.
    pub fn pick(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = self.uniform() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_order_then_scheduling_order() {
        let mut q = Queue::default();
        q.at(5, "c");
        q.at(1, "a");
        let dropped = q.at(3, "x");
        q.at(5, "d");
        q.at(3, "b");
        q.cancel(dropped);
        let got: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(got, vec![(1, "a"), (3, "b"), (5, "c"), (5, "d")]);
        assert_eq!(q.taken, 4);
    }

    #[test]
    fn draws_are_seeded_and_have_their_means() {
        let mut a = Draws::new(1, "x");
        let mut b = Draws::new(1, "x");
        let mut c = Draws::new(2, "x");
        let (va, vb, vc) = (a.uniform(), b.uniform(), c.uniform());
        assert_eq!(va.to_bits(), vb.to_bits());
        assert_ne!(va.to_bits(), vc.to_bits());
        let n = 200_000;
        let mean = (0..n).map(|_| a.exponential(3.0)).sum::<f64>() / n as f64;
        // 4σ of a mean of 200,000 draws: 4 · 3 / √200000 = 0.027
        assert!((mean - 3.0).abs() < 0.027, "{mean}");
        let mut l: Vec<f64> = (0..n).map(|_| a.lognormal(10.0, 0.5)).collect();
        l.sort_by(f64::total_cmp);
        let median = l[n / 2];
        println!("exponential mean {mean} (3.0), lognormal median {median} (10.0)");
        // 4σ of a sample median: 4 · 10 · 1.2533 · 0.5 / √200000 = 0.056
        assert!((median - 10.0).abs() < 0.056, "{median}");
    }
}
