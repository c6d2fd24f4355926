//! `GET /status.json` and `GET /` (the live status page that polls it) on the metrics address
//! (docs/DESIGN.md section 8, docs/PROTOCOL.md section 9). The JSON is built from the engine's
//! stats and the server's kept metric values (`readings.rs`), so it works without a Prometheus
//! recorder. `samples_per_s` is computed here, server-side, from the samples counter between
//! requests (over the last [`SPAN`] or more): a browser's clock may be virtual, this one is not.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use super::fanout::registry::DEVICES;
use super::shared::Shared;
use crate::protocol::notices::CLASS_NAMES;

/// The page: one self-contained file (inline CSS and JS, nothing fetched but `/status.json`).
pub(crate) const PAGE: &str = include_str!("status_page.html");

/// The rate is measured over at least this much time (or since the server started).
pub(crate) const SPAN: Duration = Duration::from_secs(2);
/// At most this many streams are listed (the rest are counted in `streams_total`).
const MAX_STREAMS: usize = 50;

/// The samples/s meter and the start time of the status endpoint.
pub(crate) struct Status {
    started: Instant,
    /// (when, samples counter): one entry at least [`SPAN`] old, then one per 100 ms or more.
    seen: Mutex<VecDeque<(Instant, u64)>>,
}

impl Status {
    /// `samples` is the counter's value now.
    pub fn new(samples: u64) -> Status {
        let now = Instant::now();
        Status {
            started: now,
            seen: Mutex::new(VecDeque::from([(now, samples)])),
        }
    }

    /// Samples/s between the newest observation at least [`SPAN`] old (else the oldest) and now.
    fn rate(&self, now: Instant, total: u64) -> f64 {
        let mut seen = self.seen.lock();
        while seen
            .get(1)
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= SPAN)
        {
            seen.pop_front();
        }
        let (t0, n0) = seen.front().copied().unwrap_or((now, total));
        if seen
            .back()
            .is_none_or(|(t, _)| now.saturating_duration_since(*t) >= Duration::from_millis(100))
        {
            seen.push_back((now, total));
        }
        let dt = now.saturating_duration_since(t0).as_secs_f64();
        if dt < 0.05 {
            return 0.0;
        }
        total.saturating_sub(n0) as f64 / dt
    }

    /// The status document.
    pub fn json(&self, shared: &Shared) -> Value {
        let now = Instant::now();
        let m = &shared.m;
        let samples = m.samples.get();
        let (bp_on, fill) = shared.pressure.state();
        json!({
            "uptime_s": now.saturating_duration_since(self.started).as_secs_f64(),
            "samples_total": samples,
            "samples_per_s": self.rate(now, samples),
            "rate_span_s": SPAN.as_secs_f64(),
            "devices": devices(shared),
            "engine": engine(shared),
            "classes": classes(shared, now),
            "streams": streams(shared),
            "streams_total": shared.replay.streams().len(),
            "connections": {
                "open": m.connections.get().max(0.0) as u64,
                "total": m.connections_total.get(),
                "refused": m.refused_total.load(Ordering::Relaxed),
            },
            "closes": {
                "slow_consumer_1013": m.slow_consumer_total.load(Ordering::Relaxed),
            },
            "ingest": {
                "backpressure": bp_on,
                "fill": fill,
                "queued": shared.ingest.queued(),
                "capacity": shared.ingest.capacity(),
                "open_samples": m.open_samples.get().max(0.0) as u64,
            },
            "delivery": {
                "backpressure_events": m.backpressure.get(),
                "conflated": m.conflated.get(),
            },
        })
    }
}

/// Each device: name, state, queue, in flight, the moving average of ms per sample, counters.
fn devices(shared: &Shared) -> Vec<Value> {
    shared
        .engine
        .stats()
        .devices
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "spec": d.spec,
                "state": d.state.name(),
                "ready": d.ready,
                "queued": d.queued,
                "in_flight": d.in_flight,
                "ms_per_sample": d.ms_per_sample,
                "batches": d.batches,
                "samples": d.samples,
                "failures": d.failures,
                "slow_events": d.slow_events,
                "last_error": d.last_error,
            })
        })
        .collect()
}

fn engine(shared: &Shared) -> Value {
    let s = shared.engine.stats();
    json!({
        "pending": s.pending,
        "admitted": s.admitted,
        "max_pending": s.max_pending,
        "overloaded": s.overloaded,
    })
}

/// Per class (control, critical, important, bulk): outbound queue depth summed over the
/// connections, sent, dropped; result latency percentiles (ms, last 5 s) for the three result
/// classes.
fn classes(shared: &Shared, now: Instant) -> Vec<Value> {
    let m = &shared.m;
    CLASS_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let lat = i
                .checked_sub(1)
                .and_then(|c| m.latency.percentiles(c, now))
                .map(|p| json!({"n": p.n, "p50": p.p50, "p90": p.p90, "p99": p.p99, "max": p.max}));
            json!({
                "class": name,
                "queue_depth": m.queue_depth[i].get().max(0.0) as u64,
                "sent": m.sent[i].get(),
                "dropped": m.dropped[i].get(),
                "latency_ms": lat,
            })
        })
        .collect()
}

/// Streams that had results: last stream seq, results held for replay, subscribers.
fn streams(shared: &Shared) -> Vec<Value> {
    shared
        .replay
        .streams()
        .into_iter()
        .filter(|(name, _, _)| &**name != DEVICES)
        .take(MAX_STREAMS)
        .map(|(name, seq, held)| {
            let subs = shared.registry.subscribers(&name).map_or(0, |l| l.len());
            json!({"name": &*name, "last_seq": seq, "replay_held": held, "subscribers": subs})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_over_the_span() {
        let s = Status::new(0);
        let t0 = s.started;
        assert_eq!(s.rate(t0, 0), 0.0);
        // Since the start while younger than SPAN.
        assert!((s.rate(t0 + Duration::from_secs(1), 500) - 500.0).abs() < 1e-6);
        // Many fast requests stay bounded and keep the rate.
        for i in 0..1000u64 {
            let r = s.rate(t0 + Duration::from_millis(1000 + i), 500 + i);
            assert!(r > 400.0, "{r}");
        }
        assert!(s.seen.lock().len() <= 30);
        // Later: over the last SPAN or a bit more.
        let r = s.rate(t0 + Duration::from_secs(10), 10_000);
        assert!(r > 0.0);
    }

    #[test]
    fn page_is_self_contained() {
        for bad in ["src=\"http", "href=\"http", "@import", "url(http", "//cdn"] {
            assert!(!PAGE.contains(bad), "the page must not load {bad}");
        }
        assert!(PAGE.contains("/status.json"));
    }
}
