//! The formation's payload store: where the large values of a step (its micro-batches, the
//! committed state, parameters to install, gradient sums, the new state) wait while a plain
//! message carries only their [`PayloadKey`], as a control message between machines would carry
//! a buffer handle while the data plane moves the bytes. The store outlives every actor (it sits
//! in the formation's context), so a replacement coordinator finds what its predecessor was
//! handed. Every slot is tagged with the step it belongs to; a new step releases the older ones,
//! so a message lost on the way leaks nothing past its step.

use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The name of a value in the [`Payloads`] store: what a message carries instead of the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PayloadKey(pub u64);

struct Slot {
    step: u64,
    value: Arc<dyn Any + Send + Sync>,
}

/// Values by key, each tagged with its step.
#[derive(Default)]
pub struct Payloads {
    next: AtomicU64,
    slots: Mutex<HashMap<u64, Slot>>,
}

impl Payloads {
    /// Stores `value` (of step `step`) for readers that share it; returns its key.
    pub fn share<T: Any + Send + Sync>(&self, step: u64, value: Arc<T>) -> PayloadKey {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.slots.lock() {
            s.insert(key, Slot { step, value });
        }
        PayloadKey(key)
    }

    /// Stores `value` for one receiver, who [`Payloads::take`]s it.
    pub fn put<T: Any + Send + Sync>(&self, step: u64, value: T) -> PayloadKey {
        self.share(step, Arc::new(value))
    }

    /// The value under `key`, left in place (None: released, or of another type).
    pub fn get<T: Any + Send + Sync>(&self, key: PayloadKey) -> Option<Arc<T>> {
        let v = self.slots.lock().ok()?.get(&key.0)?.value.clone();
        v.downcast::<T>().ok()
    }

    /// The values under `keys`, in order (None when one is gone).
    pub fn get_all<T: Any + Send + Sync>(&self, keys: &[PayloadKey]) -> Option<Vec<Arc<T>>> {
        keys.iter().map(|&k| self.get(k)).collect()
    }

    /// The value under `key`, moved out of the store. None when it is gone (taken already: a
    /// duplicate message) or of another type. A reader that still holds it shared costs a copy
    /// through `clone_shared`, never a wrong value.
    pub fn take_or<T: Any + Send + Sync>(
        &self,
        key: PayloadKey,
        clone_shared: impl FnOnce(&T) -> T,
    ) -> Option<T> {
        let slot = self.slots.lock().ok()?.remove(&key.0)?;
        let v = slot.value.downcast::<T>().ok()?;
        Some(Arc::try_unwrap(v).unwrap_or_else(|shared| clone_shared(&shared)))
    }

    /// [`Payloads::take_or`] for values nobody else reads (None also when one does).
    pub fn take<T: Any + Send + Sync>(&self, key: PayloadKey) -> Option<T> {
        let slot = self.slots.lock().ok()?.remove(&key.0)?;
        match slot.value.downcast::<T>() {
            Ok(v) => Arc::try_unwrap(v).ok(),
            Err(_) => None,
        }
    }

    /// Drops the value under `key` (readers holding it keep their reference).
    pub fn release(&self, key: PayloadKey) {
        if let Ok(mut s) = self.slots.lock() {
            s.remove(&key.0);
        }
    }

    /// Drops every value of a step before `step`.
    pub fn release_before(&self, step: u64) {
        if let Ok(mut s) = self.slots.lock() {
            s.retain(|_, slot| slot.step >= step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_named_taken_once_and_released_by_step() {
        let p = Payloads::default();
        let a = p.put(3, vec![1.0f32, 2.0]);
        let b = p.share(4, Arc::new(String::from("batches")));
        assert_ne!(a, b);
        // the wrong type reads as nothing and leaves the value
        assert!(p.get::<String>(a).is_none());
        assert_eq!(*p.get::<Vec<f32>>(a).unwrap(), vec![1.0, 2.0]);
        assert_eq!(p.take::<Vec<f32>>(a), Some(vec![1.0, 2.0]));
        // a second take (a duplicated message) finds nothing
        assert_eq!(p.take::<Vec<f32>>(a), None);
        // a shared value still read elsewhere is copied out
        let held = p.get::<String>(b).unwrap();
        assert_eq!(
            p.take_or::<String>(b, |s| s.clone()).as_deref(),
            Some("batches")
        );
        assert_eq!(*held, "batches");
        let c = p.put(5, 7u64);
        let d = p.put(6, 8u64);
        p.release_before(6);
        assert!(p.get::<u64>(c).is_none());
        assert_eq!(p.get::<u64>(d).as_deref(), Some(&8));
        p.release(d);
        assert!(p.get::<u64>(d).is_none());
        assert_eq!(p.get_all::<u64>(&[c, d]), None);
    }
}
