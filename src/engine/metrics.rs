//! Engine metrics through the `metrics` facade (the server installs the Prometheus exporter).
//! Handles are created when the engine starts, so install the recorder before
//! `Engine::start`. Every per-device series carries the label `device="cpu:0"`.
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `fusion_device_state` | gauge | 0 HEALTHY, 1 SLOW, 2 FAILED |
//! | `fusion_device_queue_depth` | gauge | batches dispatched to the worker, not started |
//! | `fusion_device_in_flight` | gauge | batches dispatched, not completed (queued + running) |
//! | `fusion_device_batches_total` | counter | batches completed successfully |
//! | `fusion_device_samples_total` | counter | samples completed successfully |
//! | `fusion_device_batch_seconds` | histogram | time on the device per batch |
//! | `fusion_device_stage_seconds` | histogram | per batch, by `stage`: `kernels`, `h2d`, `d2h` (GPU timing events), `host_stage`, `host_wait`, `host_drain` (host clock); backends that time their stages (CUDA, wgpu) |
//! | `fusion_device_copied_bytes_total` | counter | by `direction` (`h2d`, `d2h`) and `direct` (`yes`: straight from or into page-locked batch memory, docs/DESIGN.md section 6.7; `no`: staged) |
//! | `fusion_device_errors_total` | counter | by `kind`: device, panic, timeout, open, input |
//! | `fusion_device_retries_total` | counter | batches taken off this device after it failed |
//! | `fusion_device_restarts_total` | counter | worker restarts |
//! | `fusion_device_state_changes_total` | counter | by `to` state |
//! | `fusion_engine_pending_batches` | gauge | admitted, not yet dispatched to a device |
//! | `fusion_engine_overloaded_total` | counter | submissions refused because the engine is full |
//! | `fusion_engine_late_results_total` | counter | results of abandoned workers, discarded |
//! | `fusion_engine_batch_seconds` | histogram | submission to delivery |

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use super::health::DeviceState;
use crate::backend::RunStats;

/// The `stage` labels of `fusion_device_stage_seconds`, in [`DeviceMetrics::stages`]'s order.
const STAGES: [&str; 6] = [
    "kernels",
    "h2d",
    "d2h",
    "host_stage",
    "host_wait",
    "host_drain",
];

/// Metric handles of one device.
#[derive(Debug)]
pub(crate) struct DeviceMetrics {
    name: String,
    pub state: Gauge,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub batches: Counter,
    pub samples: Counter,
    pub batch_seconds: Histogram,
    pub retries: Counter,
    pub restarts: Counter,
    /// `fusion_device_stage_seconds` per [`STAGES`] label.
    stages: [Histogram; 6],
    /// `fusion_device_copied_bytes_total`: h2d direct, h2d staged, d2h direct, d2h staged.
    copied: [Counter; 4],
}

impl DeviceMetrics {
    pub fn new(name: &str) -> DeviceMetrics {
        let d = name.to_string();
        let m = DeviceMetrics {
            name: d.clone(),
            state: gauge!("fusion_device_state", "device" => d.clone()),
            queue_depth: gauge!("fusion_device_queue_depth", "device" => d.clone()),
            in_flight: gauge!("fusion_device_in_flight", "device" => d.clone()),
            batches: counter!("fusion_device_batches_total", "device" => d.clone()),
            samples: counter!("fusion_device_samples_total", "device" => d.clone()),
            batch_seconds: histogram!("fusion_device_batch_seconds", "device" => d.clone()),
            retries: counter!("fusion_device_retries_total", "device" => d.clone()),
            restarts: counter!("fusion_device_restarts_total", "device" => d.clone()),
            stages: STAGES.map(
                |st| histogram!("fusion_device_stage_seconds", "device" => d.clone(), "stage" => st),
            ),
            copied: [("h2d", "yes"), ("h2d", "no"), ("d2h", "yes"), ("d2h", "no")].map(
                |(dir, direct)| {
                    counter!("fusion_device_copied_bytes_total", "device" => d.clone(),
                        "direction" => dir, "direct" => direct)
                },
            ),
        };
        m.state.set(DeviceState::Healthy.gauge());
        m
    }

    /// Records where one run's time went (`s`: the backend's stats since its last run; nothing
    /// when it has none). A stage its backend does not time (NaN, as wgpu's copies) or that
    /// took no time is not recorded.
    pub fn record_run(&self, s: &RunStats) {
        if s.runs == 0 {
            return;
        }
        let ms = [
            s.gemm_ms + s.epilogue_ms,
            s.h2d_ms,
            s.d2h_ms,
            s.host_stage_ms,
            s.host_wait_ms,
            s.host_drain_ms,
        ];
        for (h, v) in self.stages.iter().zip(ms) {
            if v.is_finite() && v > 0.0 {
                h.record(v / 1e3);
            }
        }
        let bytes = [
            s.h2d_direct_bytes,
            s.h2d_bytes.saturating_sub(s.h2d_direct_bytes),
            s.d2h_direct_bytes,
            s.d2h_bytes.saturating_sub(s.d2h_direct_bytes),
        ];
        for (c, b) in self.copied.iter().zip(bytes) {
            c.increment(b);
        }
    }

    /// Counts an error of `kind`.
    pub fn error(&self, kind: &'static str) {
        counter!("fusion_device_errors_total", "device" => self.name.clone(), "kind" => kind)
            .increment(1);
    }

    /// Counts a state change and sets the gauge.
    pub fn state_change(&self, to: DeviceState) {
        self.state.set(to.gauge());
        counter!("fusion_device_state_changes_total", "device" => self.name.clone(), "to" => to.name())
            .increment(1);
    }
}

/// Engine-wide handles.
#[derive(Debug)]
pub(crate) struct EngineMetrics {
    pub pending: Gauge,
    pub overloaded: Counter,
    pub late_results: Counter,
    pub batch_seconds: Histogram,
}

impl EngineMetrics {
    pub fn new() -> EngineMetrics {
        EngineMetrics {
            pending: gauge!("fusion_engine_pending_batches"),
            overloaded: counter!("fusion_engine_overloaded_total"),
            late_results: counter!("fusion_engine_late_results_total"),
            batch_seconds: histogram!("fusion_engine_batch_seconds"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[test]
    fn a_runs_stages_and_copies_are_recorded_per_device() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let m = DeviceMetrics::new("cuda:0");
            m.record_run(&RunStats {
                runs: 1,
                h2d_bytes: 1000,
                h2d_direct_bytes: 600,
                h2d_ms: 0.25,
                d2h_bytes: 500,
                d2h_ms: f64::NAN, // not timed: not recorded
                gemm_ms: 0.5,
                epilogue_ms: 0.25,
                host_wait_ms: 2.0,
                ..RunStats::default()
            });
            m.record_run(&RunStats::default()); // no run: nothing
        });
        let text = handle.render();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let sum = |stage: &str| {
            line(&format!(
                "fusion_device_stage_seconds_sum{{device=\"cuda:0\",stage=\"{stage}\"}}"
            ))
        };
        assert_eq!(sum("kernels"), Some(0.00075), "{text}");
        assert_eq!(sum("h2d"), Some(0.00025), "{text}");
        assert_eq!(sum("host_wait"), Some(0.002), "{text}");
        let count = |stage: &str| {
            line(&format!(
                "fusion_device_stage_seconds_count{{device=\"cuda:0\",stage=\"{stage}\"}}"
            ))
        };
        assert_eq!(count("kernels"), Some(1.0), "one run recorded: {text}");
        for absent in ["d2h", "host_stage", "host_drain"] {
            assert_eq!(count(absent), Some(0.0), "{absent}: {text}");
        }
        let bytes = |dir: &str, direct: &str| {
            line(&format!(
                "fusion_device_copied_bytes_total{{device=\"cuda:0\",direction=\"{dir}\",direct=\"{direct}\"}}"
            ))
        };
        assert_eq!(bytes("h2d", "yes"), Some(600.0), "{text}");
        assert_eq!(bytes("h2d", "no"), Some(400.0), "{text}");
        assert_eq!(bytes("d2h", "yes"), Some(0.0), "{text}");
        assert_eq!(bytes("d2h", "no"), Some(500.0), "{text}");
    }
}
