//! Weight operands prepared once per step: a backend keeps the BF16 rounding or FP8 quantisation
//! of a weight it was handed while the model holds its weights ([`Backend::hold_weights`]), so
//! the backward's input gradient (and every later micro-batch of the step) reuses what the
//! forward made instead of rounding or quantising the same W again.
//!
//! A weight is known by its storage (address and length) and the form it was prepared in. That
//! is sound only while no weight is written or freed: the holder's promise between
//! `hold_weights` and the matching `release_weights` (a freed buffer's address may be handed to
//! the next allocation of the same size). Holds nest; the copies go at the last release, and
//! outside a hold nothing is kept, so a forgotten hold costs time, never bits.
//!
//! [`Backend::hold_weights`]: super::Backend::hold_weights

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The form a weight was prepared in (part of its key: one W may be kept in several forms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Form {
    /// Every value rounded to BF16.
    Bf16,
    /// E4M3 codes with f32 scales in 128×128 blocks (`[dout, din]`).
    Fp8Blocks { dout: usize, din: usize },
}

/// Where a weight (or a batch of weights, e.g. a MoE layer's experts of one projection) lives:
/// the address of each buffer, and the elements of each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Storage {
    pub addrs: Vec<u64>,
    pub len: usize,
}

impl Storage {
    /// One buffer at `addr` of `len` elements.
    pub fn one(addr: u64, len: usize) -> Storage {
        Storage {
            addrs: vec![addr],
            len,
        }
    }
}

#[derive(Debug)]
struct State<V> {
    holds: usize,
    kept: BTreeMap<(Form, Storage), Arc<V>>,
    hits: u64,
    misses: u64,
}

/// A backend's prepared weights of type `V` (per backend instance; not shared between threads).
#[derive(Debug)]
pub struct WeightCache<V> {
    state: RefCell<State<V>>,
}

impl<V> Default for WeightCache<V> {
    fn default() -> Self {
        WeightCache {
            state: RefCell::new(State {
                holds: 0,
                kept: BTreeMap::new(),
                hits: 0,
                misses: 0,
            }),
        }
    }
}

impl<V> WeightCache<V> {
    /// One more hold: weights are kept until the matching [`release`](Self::release).
    pub fn hold(&self) {
        self.state.borrow_mut().holds += 1;
    }

    /// Ends one hold; at the last, every kept weight is dropped. A release without a hold is
    /// ignored.
    pub fn release(&self) {
        let mut s = self.state.borrow_mut();
        s.holds = s.holds.saturating_sub(1);
        if s.holds == 0 {
            s.kept.clear();
        }
    }

    /// Whether weights are held now.
    pub fn held(&self) -> bool {
        self.state.borrow().holds > 0
    }

    /// The weight at `at` in `form`: the kept one while held (a hit), else `make`'s, which is
    /// kept when held (a miss). Outside a hold `make` runs every time and nothing is counted.
    pub fn get<E>(
        &self,
        form: Form,
        at: Storage,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        let key = (form, at);
        {
            let mut s = self.state.borrow_mut();
            if s.holds == 0 {
                drop(s);
                return make().map(Arc::new);
            }
            if let Some(v) = s.kept.get(&key).cloned() {
                s.hits += 1;
                return Ok(v);
            }
        }
        // `make` may call back into the backend: no borrow is held across it
        let v = Arc::new(make()?);
        let mut s = self.state.borrow_mut();
        s.misses += 1;
        if s.holds > 0 {
            s.kept.insert(key, v.clone());
        }
        Ok(v)
    }

    /// (hits, misses) since the backend was made.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.state.borrow();
        (s.hits, s.misses)
    }

    /// Weights kept now.
    pub fn kept(&self) -> usize {
        self.state.borrow().kept.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(calls: &RefCell<u32>, v: u32) -> Result<u32, ()> {
        *calls.borrow_mut() += 1;
        Ok(v)
    }

    #[test]
    fn keeps_only_while_held_and_by_form_and_storage() {
        let c = WeightCache::<u32>::default();
        let calls = RefCell::new(0);
        let at = || Storage::one(0x1000, 64);
        // not held: made every time, nothing kept or counted
        for _ in 0..2 {
            assert_eq!(*c.get(Form::Bf16, at(), || make(&calls, 7)).unwrap(), 7);
        }
        assert_eq!((*calls.borrow(), c.counts(), c.kept()), (2, (0, 0), 0));
        c.hold();
        assert_eq!(*c.get(Form::Bf16, at(), || make(&calls, 8)).unwrap(), 8);
        // the kept value, not a new one
        assert_eq!(*c.get(Form::Bf16, at(), || make(&calls, 9)).unwrap(), 8);
        // another form, another length or another address is another weight
        let blocks = Form::Fp8Blocks { dout: 8, din: 8 };
        assert_eq!(*c.get(blocks, at(), || make(&calls, 10)).unwrap(), 10);
        let longer = Storage::one(0x1000, 65);
        assert_eq!(*c.get(Form::Bf16, longer, || make(&calls, 11)).unwrap(), 11);
        let batch = Storage {
            addrs: vec![0x1000, 0x2000],
            len: 64,
        };
        assert_eq!(*c.get(Form::Bf16, batch, || make(&calls, 12)).unwrap(), 12);
        assert_eq!((*calls.borrow(), c.counts(), c.kept()), (6, (1, 4), 4));
        // nested: the inner release keeps everything, the outer one drops it
        c.hold();
        c.release();
        assert_eq!(c.kept(), 4);
        c.release();
        assert!(!c.held());
        assert_eq!(c.kept(), 0);
        assert_eq!(*c.get(Form::Bf16, at(), || make(&calls, 13)).unwrap(), 13);
        // an unmatched release is ignored, and a failure keeps nothing
        c.release();
        c.hold();
        assert!(c.get(Form::Bf16, at(), || Err::<u32, _>("no")).is_err());
        assert_eq!(c.kept(), 0);
        assert_eq!(*c.get(Form::Bf16, at(), || make(&calls, 14)).unwrap(), 14);
        assert_eq!(c.counts(), (1, 5));
    }
}
