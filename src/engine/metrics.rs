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
            restarts: counter!("fusion_device_restarts_total", "device" => d),
        };
        m.state.set(DeviceState::Healthy.gauge());
        m
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
