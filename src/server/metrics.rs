//! Server metrics (docs/DESIGN.md section 8) through the `metrics` facade; handles are created once per
//! server (install the recorder first, as `serve` does). Per-class series carry
//! `class="control|critical|important|bulk"`; connections are summed per class (a per-connection
//! label would make the series count unbounded).
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `fusion_server_connections` | gauge | open WebSocket connections |
//! | `fusion_server_connections_total` | counter | accepted connections |
//! | `fusion_server_refused_total` | counter | by `reason`: `full`, `auth`, `handshake` |
//! | `fusion_server_queue_depth` | gauge | queued messages, by `class` |
//! | `fusion_server_sent_total` | counter | messages written, by `class` |
//! | `fusion_server_dropped_total` | counter | results dropped, by `class` |
//! | `fusion_server_conflated_total` | counter | BULK results replaced by a newer one (conflation) |
//! | `fusion_server_replayed_total` | counter | results replayed after a resume |
//! | `fusion_server_unrecoverable_total` | counter | `unrecoverable` notices sent (per class and range) |
//! | `fusion_server_replay_evicted_total` | counter | results evicted from the replay buffer |
//! | `fusion_server_replay_bytes` | gauge | bytes held by the replay buffer |
//! | `fusion_server_backpressure_events_total` | counter | BACKPRESSURE on transitions |
//! | `fusion_server_slow_consumer_total` | counter | 1013 closes, by `reason` |
//! | `fusion_server_send_seconds` | histogram | one WebSocket send |
//! | `fusion_server_produce_total` | counter | produce messages accepted (a `samples` frame counts one per row: samples x modalities) |
//! | `fusion_server_errors_total` | counter | error messages sent, by `code` |
//! | `fusion_server_open_samples` | gauge | samples in the aligner |
//! | `fusion_server_aligner_timeouts_total` | counter | samples fused (or rejected) at align_timeout |
//! | `fusion_server_samples_total` | counter | samples sent to the engine |
//! | `fusion_server_batch_size` | histogram | samples per batch |
//! | `fusion_server_ingest_backpressure` | gauge | 1 while producer flow control is on (`pressure.rs`) |
//! | `fusion_server_ingest_backpressure_notices_total` | counter | `ingest_backpressure` notices sent |
//! | `fusion_process_resident_bytes` | gauge | process RSS (VmRSS), set at each `/metrics` scrape |
//! | `fusion_process_peak_resident_bytes` | gauge | process peak RSS (VmHWM), same |

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::readings::{KeptCounter, KeptGauge, Latencies};
use crate::protocol::notices::CLASS_NAMES;
use crate::protocol::Code;

/// Metric handles of the server. The `Kept*` ones are read back by `GET /status.json`
/// (`readings.rs`), as are `refused_total`, `slow_consumer_total` and `latency`.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    pub connections: KeptGauge,
    pub connections_total: KeptCounter,
    pub queue_depth: [KeptGauge; 4],
    pub sent: [KeptCounter; 4],
    pub dropped: [KeptCounter; 4],
    pub backpressure: KeptCounter,
    pub conflated: KeptCounter,
    pub replayed: Counter,
    pub unrecoverable: Counter,
    pub replay_evicted: Counter,
    pub replay_bytes: Gauge,
    pub send_seconds: Histogram,
    pub produce: Counter,
    pub open_samples: KeptGauge,
    pub align_timeouts: Counter,
    pub samples: KeptCounter,
    pub batch_size: Histogram,
    /// Refused connections, every reason.
    pub refused_total: AtomicU64,
    /// 1013 closes, every reason.
    pub slow_consumer_total: AtomicU64,
    /// Recent result latencies per class (critical, important, bulk).
    pub latency: Latencies,
}

impl ServerMetrics {
    pub fn new() -> ServerMetrics {
        ServerMetrics {
            connections: KeptGauge::new(gauge!("fusion_server_connections")),
            connections_total: KeptCounter::new(counter!("fusion_server_connections_total")),
            queue_depth: CLASS_NAMES
                .map(|c| KeptGauge::new(gauge!("fusion_server_queue_depth", "class" => c))),
            sent: CLASS_NAMES
                .map(|c| KeptCounter::new(counter!("fusion_server_sent_total", "class" => c))),
            dropped: CLASS_NAMES
                .map(|c| KeptCounter::new(counter!("fusion_server_dropped_total", "class" => c))),
            backpressure: KeptCounter::new(counter!("fusion_server_backpressure_events_total")),
            conflated: KeptCounter::new(counter!("fusion_server_conflated_total")),
            replayed: counter!("fusion_server_replayed_total"),
            unrecoverable: counter!("fusion_server_unrecoverable_total"),
            replay_evicted: counter!("fusion_server_replay_evicted_total"),
            replay_bytes: gauge!("fusion_server_replay_bytes"),
            send_seconds: histogram!("fusion_server_send_seconds"),
            produce: counter!("fusion_server_produce_total"),
            open_samples: KeptGauge::new(gauge!("fusion_server_open_samples")),
            align_timeouts: counter!("fusion_server_aligner_timeouts_total"),
            samples: KeptCounter::new(counter!("fusion_server_samples_total")),
            batch_size: histogram!("fusion_server_batch_size"),
            refused_total: AtomicU64::new(0),
            slow_consumer_total: AtomicU64::new(0),
            latency: Latencies::default(),
        }
    }

    /// Counts a refused connection.
    pub fn refused(&self, reason: &'static str) {
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        counter!("fusion_server_refused_total", "reason" => reason).increment(1);
    }

    /// Counts a 1013 close.
    pub fn slow_consumer(&self, reason: &'static str) {
        self.slow_consumer_total.fetch_add(1, Ordering::Relaxed);
        counter!("fusion_server_slow_consumer_total", "reason" => reason).increment(1);
    }

    /// Counts an error message.
    pub fn error(&self, code: Code) {
        counter!("fusion_server_errors_total", "code" => code.as_str()).increment(1);
    }
}

/// The process's resident set size and its peak (VmRSS and VmHWM of `/proc/self/status`), in
/// bytes; `None` where that file does not exist (not Linux).
pub fn process_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |field: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    Some((kib("VmRSS:")? * 1024, kib("VmHWM:")? * 1024))
}

/// Sets the process memory gauges (called before each `/metrics` render).
pub(crate) fn record_process_memory() {
    if let Some((rss, peak)) = process_memory() {
        gauge!("fusion_process_resident_bytes").set(rss as f64);
        gauge!("fusion_process_peak_resident_bytes").set(peak as f64);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn process_memory_reads_proc() {
        let (rss, peak) = super::process_memory().unwrap();
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(peak >= rss, "peak {peak} < rss {rss}");
    }
}
