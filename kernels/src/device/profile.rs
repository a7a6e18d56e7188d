//! Where a device step's time goes: named regions of the step (attention, the MoE layer's
//! routing, routed and shared experts, the head, the optimizer, …), each timed between two
//! `Backend::synchronize` calls so that a GPU's queued work is charged to the region that queued
//! it. Regions nest (an MTP module's blocks run inside the tail); each region is charged its
//! *self* time, its nested regions' time apart, so the shares add up to the profiled time.
//!
//! Profiling is off unless asked for (`DeviceModel::set_profiling`): the synchronisations stop
//! the host from queueing ahead, so a profiled step is slower than a timed one, and
//! `phalanx bench train --device cuda --profile` profiles one extra step after the timed ones.

use super::backend::{Backend, BackendResult};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// One region's totals.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RegionTotal {
    pub calls: u64,
    /// Seconds in the region, its nested regions excluded.
    pub self_s: f64,
}

/// The regions of the steps profiled so far.
#[derive(Debug, Default)]
pub struct StepProfile {
    totals: RefCell<BTreeMap<&'static str, RegionTotal>>,
    /// For each open region, the time its finished nested regions took.
    nested: RefCell<Vec<f64>>,
}

/// An open region (`Span::end` closes it; one dropped open, on an error's way out, is
/// forgotten).
pub(crate) struct Span<'p> {
    prof: &'p StepProfile,
    label: &'static str,
    start: Instant,
    open: bool,
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if self.open {
            self.prof.nested.borrow_mut().pop();
        }
    }
}

impl StepProfile {
    pub fn new() -> StepProfile {
        StepProfile::default()
    }

    /// A region opens.
    fn enter(&self) {
        self.nested.borrow_mut().push(0.0);
    }

    /// The innermost open region, `label`, closes after `elapsed_s` (its nested regions
    /// included): it is charged the rest, and its enclosing region learns of the whole.
    pub(crate) fn leave(&self, label: &'static str, elapsed_s: f64) {
        let mut nested = self.nested.borrow_mut();
        let inner = nested.pop().unwrap_or(0.0);
        if let Some(outer) = nested.last_mut() {
            *outer += elapsed_s;
        }
        let mut totals = self.totals.borrow_mut();
        let t = totals.entry(label).or_default();
        t.calls += 1;
        t.self_s += (elapsed_s - inner).max(0.0);
    }

    /// The totals by region.
    pub fn totals(&self) -> BTreeMap<&'static str, RegionTotal> {
        self.totals.borrow().clone()
    }

    /// The regions' self time added up.
    pub fn profiled_s(&self) -> f64 {
        self.totals.borrow().values().map(|t| t.self_s).sum()
    }

    /// A table of the regions, the largest first: calls, milliseconds and the share of `wall_s`
    /// (the profiled steps' wall time); a last line for the time no region holds.
    pub fn table(&self, wall_s: f64) -> String {
        let mut rows: Vec<(&str, RegionTotal)> =
            self.totals.borrow().iter().map(|(k, v)| (*k, *v)).collect();
        rows.sort_by(|a, b| b.1.self_s.total_cmp(&a.1.self_s));
        let share = |s: f64| {
            if wall_s > 0.0 {
                100.0 * s / wall_s
            } else {
                0.0
            }
        };
        let mut out = format!(
            "{:<46} {:>6} {:>10} {:>7}\n",
            "region", "calls", "ms", "share"
        );
        for (label, t) in &rows {
            out += &format!(
                "{label:<46} {:>6} {:>10.2} {:>6.1}%\n",
                t.calls,
                t.self_s * 1e3,
                share(t.self_s)
            );
        }
        let rest = (wall_s - self.profiled_s()).max(0.0);
        out += &format!(
            "{:<46} {:>6} {:>10.2} {:>6.1}%\n",
            "(outside the regions)",
            "",
            rest * 1e3,
            share(rest)
        );
        out
    }

    /// The `n` largest regions as `label share%` pairs joined by `; ` (one line, for a table).
    pub fn top(&self, n: usize, wall_s: f64) -> String {
        let mut rows: Vec<(&str, f64)> = self
            .totals
            .borrow()
            .iter()
            .map(|(k, v)| (*k, v.self_s))
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        rows.iter()
            .take(n)
            .map(|(l, s)| format!("{l} {:.0}%", 100.0 * s / wall_s.max(f64::MIN_POSITIVE)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Opens region `label` when profiling: the device's queued work is finished first, so it is
/// not charged to this region.
pub(crate) fn span<'p, B: Backend>(
    prof: Option<&'p StepProfile>,
    b: &B,
    label: &'static str,
) -> BackendResult<Option<Span<'p>>> {
    let Some(prof) = prof else {
        return Ok(None);
    };
    b.synchronize()?;
    prof.enter();
    Ok(Some(Span {
        prof,
        label,
        start: Instant::now(),
        open: true,
    }))
}

impl Span<'_> {
    /// Closes the region once the device has finished what it queued.
    pub(crate) fn end<B: Backend>(mut self, b: &B) -> BackendResult<()> {
        b.synchronize()?;
        self.open = false;
        self.prof
            .leave(self.label, self.start.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Closes `span` if it is open.
pub(crate) fn end<B: Backend>(span: Option<Span<'_>>, b: &B) -> BackendResult<()> {
    match span {
        Some(s) => s.end(b),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_regions_are_charged_their_self_time() {
        let p = StepProfile::new();
        // block (10 s) holding attention (3 s) and experts (4 s), then head (2 s) alone
        p.enter();
        p.enter();
        p.leave("attention", 3.0);
        p.enter();
        p.leave("experts", 4.0);
        p.leave("block", 10.0);
        p.enter();
        p.leave("head", 2.0);
        let t = p.totals();
        assert_eq!(t["attention"].self_s, 3.0);
        assert_eq!(t["experts"].self_s, 4.0);
        assert_eq!(t["block"].self_s, 3.0);
        assert_eq!(t["head"].self_s, 2.0);
        assert_eq!(p.profiled_s(), 12.0);
        assert!(p.nested.borrow().is_empty());
        // the table: largest first, the rest of 16 s outside
        let table = p.table(16.0);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("experts"), "{table}");
        assert!(lines[1].ends_with("25.0%"), "{table}");
        assert!(lines[5].starts_with("(outside the regions)"), "{table}");
        assert!(lines[5].ends_with("25.0%"), "{table}");
        assert_eq!(p.top(2, 16.0), "experts 25%; attention 19%");
    }

    #[test]
    fn a_region_left_open_by_an_error_is_forgotten() {
        use crate::device::backend::Cpu;
        let p = StepProfile::new();
        let outer = span(Some(&p), &Cpu::new(), "outer").unwrap();
        drop(span(Some(&p), &Cpu::new(), "failed").unwrap());
        outer.unwrap().end(&Cpu::new()).unwrap();
        assert!(p.nested.borrow().is_empty());
        let labels: Vec<&str> = p.totals().keys().copied().collect();
        assert_eq!(labels, vec!["outer"]);
        assert!(span(None, &Cpu::new(), "off").unwrap().is_none());
    }

    #[test]
    fn repeated_regions_add_up() {
        let p = StepProfile::new();
        for s in [1.0, 2.0] {
            p.enter();
            p.leave("attention", s);
        }
        assert_eq!(
            p.totals()["attention"],
            RegionTotal {
                calls: 2,
                self_s: 3.0
            }
        );
    }
}
