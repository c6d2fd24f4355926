//! Metric handles whose values the server reads back for `GET /status.json` (docs/DESIGN.md
//! section 8): each update goes to the recorder's handle (Prometheus) and to an atomic here,
//! so the status page works whether or not a recorder is installed. And the recent result
//! latencies per class, from which the page's percentiles come.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};
use parking_lot::Mutex;

/// A counter that keeps its value.
#[derive(Debug)]
pub(crate) struct KeptCounter {
    handle: Counter,
    value: AtomicU64,
}

impl KeptCounter {
    pub fn new(handle: Counter) -> KeptCounter {
        KeptCounter {
            handle,
            value: AtomicU64::new(0),
        }
    }

    pub fn increment(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
        self.handle.increment(n);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// A gauge that keeps its value (the bits of an f64).
#[derive(Debug)]
pub(crate) struct KeptGauge {
    handle: Gauge,
    bits: AtomicU64,
}

impl KeptGauge {
    pub fn new(handle: Gauge) -> KeptGauge {
        KeptGauge {
            handle,
            bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn add(&self, d: f64) {
        // The closure always returns Some, so fetch_update only loops on contention.
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + d).to_bits())
            });
    }

    pub fn increment(&self, d: f64) {
        self.add(d);
        self.handle.increment(d);
    }

    pub fn decrement(&self, d: f64) {
        self.add(-d);
        self.handle.decrement(d);
    }

    pub fn set(&self, v: f64) {
        self.bits.store(v.to_bits(), Ordering::Relaxed);
        self.handle.set(v);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

/// How many recent latencies each class keeps.
const KEEP: usize = 2048;
/// Latencies older than this are left out of the percentiles (a quiet server shows none).
pub(crate) const WINDOW: Duration = Duration::from_secs(5);

/// Percentiles of the recent latencies of one class, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Per class (critical, important, bulk): the last [`KEEP`] result latencies, from the sample
/// being complete (queued for a batch) to its result handed to the subscribers' queues
/// (batching wait, engine queue, device, fan-out; docs/DESIGN.md sections 4.3 and 4.4).
#[derive(Debug, Default)]
pub(crate) struct Latencies {
    recent: [Mutex<VecDeque<(Instant, u32)>>; 3],
}

impl Latencies {
    /// Records the latencies (microseconds, saturating) of one batch's results of `class`.
    pub fn record(&self, class: usize, done: Instant, lat: impl Iterator<Item = Duration>) {
        let Some(q) = self.recent.get(class) else {
            return;
        };
        let mut q = q.lock();
        for d in lat {
            if q.len() == KEEP {
                q.pop_front();
            }
            q.push_back((done, u32::try_from(d.as_micros()).unwrap_or(u32::MAX)));
        }
    }

    /// The percentiles of `class` over the last [`WINDOW`]; `None` when there is none.
    pub fn percentiles(&self, class: usize, now: Instant) -> Option<Percentiles> {
        let mut v: Vec<u32> = {
            let q = self.recent.get(class)?.lock();
            q.iter()
                .filter(|(t, _)| now.saturating_duration_since(*t) <= WINDOW)
                .map(|(_, us)| *us)
                .collect()
        };
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v.get(i).map_or(0.0, |us| f64::from(*us) / 1000.0)
        };
        Some(Percentiles {
            n: v.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_values_follow_updates() {
        let c = KeptCounter::new(Counter::noop());
        c.increment(3);
        c.increment(4);
        assert_eq!(c.get(), 7);
        let g = KeptGauge::new(Gauge::noop());
        g.increment(2.0);
        g.decrement(0.5);
        assert_eq!(g.get(), 1.5);
        g.set(9.0);
        assert_eq!(g.get(), 9.0);
    }

    #[test]
    fn percentiles_of_recent_latencies() {
        let l = Latencies::default();
        let now = Instant::now();
        assert_eq!(l.percentiles(0, now), None);
        l.record(0, now, (1..=100).map(Duration::from_millis));
        let p = l.percentiles(0, now).unwrap();
        assert_eq!((p.n, p.p50, p.p99, p.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(l.percentiles(1, now), None);
        assert_eq!(l.percentiles(7, now), None);
        // Out of the window: none.
        assert_eq!(l.percentiles(0, now + WINDOW * 2), None);
        // Bounded.
        l.record(2, now, (0..KEEP as u64 + 10).map(Duration::from_micros));
        assert_eq!(l.percentiles(2, now).unwrap().n, KEEP);
    }
}
