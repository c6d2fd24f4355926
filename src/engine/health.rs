//! Device health: HEALTHY / SLOW / FAILED and the latency bookkeeping behind the transitions of
//! docs/DESIGN.md section 6.4. Pure logic, driven by the engine core on every completion:
//!
//! - HEALTHY -> SLOW: the device's per-sample latency moving average is over `slow_ratio` (2x)
//!   the best healthy device's for `slow_batches` (5) batches in a row, or one of its batches
//!   completed after `device_timeout` (a batch still *running* at the timeout is a hang: the
//!   core marks the device FAILED instead). The batches in a row are the device's own, and,
//!   while it has none in flight, those completed by other devices: the router gives a device
//!   that slow no more batches once it has measured it (least expected completion time), so
//!   counting only its own would leave it HEALTHY, unprobed, with an average nothing updates.
//! - SLOW -> HEALTHY: a probe batch's per-sample latency is under `recover_ratio` (1.3x) the best
//!   healthy device's (or no healthy device is left to compare with).
//! - any -> FAILED: an error, a panic or a hang (decided by the core, see `core.rs`).

use std::time::Duration;

use super::config::EngineConfig;

/// The health of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DeviceState {
    /// Routed to by expected completion time.
    Healthy,
    /// Gets only occasional probe batches until it is fast again.
    Slow,
    /// Its worker errored, panicked, hung or could not open the device; being restarted.
    Failed,
}

impl DeviceState {
    /// Upper-case name, as logged and reported.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceState::Healthy => "HEALTHY",
            DeviceState::Slow => "SLOW",
            DeviceState::Failed => "FAILED",
        }
    }

    /// Value of the `fusion_device_state` gauge: 0 healthy, 1 slow, 2 failed.
    pub const fn gauge(self) -> f64 {
        match self {
            DeviceState::Healthy => 0.0,
            DeviceState::Slow => 1.0,
            DeviceState::Failed => 2.0,
        }
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one completion changed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// No state change.
    Stay,
    /// HEALTHY -> SLOW, with the reason.
    Slow(String),
    /// SLOW -> HEALTHY, with the reason.
    Recovered(String),
}

/// Latency average and state of one device.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub state: DeviceState,
    /// Moving average of seconds per sample; `None` until the first batch completed.
    pub ewma: Option<f64>,
    /// Consecutive batches over `slow_ratio`.
    pub streak: u32,
}

impl Health {
    pub fn new() -> Health {
        Health {
            state: DeviceState::Healthy,
            ewma: None,
            streak: 0,
        }
    }

    /// Records a successful batch: `per_sample` seconds per sample, `elapsed` on the device,
    /// `best_other` the lowest average among the *other* healthy devices.
    pub fn observe(
        &mut self,
        per_sample: f64,
        elapsed: Duration,
        best_other: Option<f64>,
        cfg: &EngineConfig,
    ) -> Verdict {
        match self.state {
            DeviceState::Healthy => {
                let avg = match self.ewma {
                    Some(e) => e + cfg.ewma_alpha * (per_sample - e),
                    None => per_sample,
                };
                self.ewma = Some(avg);
                if elapsed > cfg.device_timeout {
                    self.streak = 0;
                    return Verdict::Slow(format!(
                        "a batch took {:.3} s, past device_timeout {:.3} s",
                        elapsed.as_secs_f64(),
                        cfg.device_timeout.as_secs_f64()
                    ));
                }
                let ratio = best_other.map_or(1.0, |b| avg / b.min(avg));
                if ratio > cfg.slow_ratio {
                    self.streak += 1;
                    if self.streak >= cfg.slow_batches {
                        self.streak = 0;
                        return Verdict::Slow(format!(
                            "per-sample latency {:.1}x the best healthy device for {} batches \
                             in a row (limit {:.1}x)",
                            ratio, cfg.slow_batches, cfg.slow_ratio
                        ));
                    }
                } else {
                    self.streak = 0;
                }
                Verdict::Stay
            }
            DeviceState::Slow => {
                // A probe: the newest evidence replaces the average, which describes the fault.
                self.ewma = Some(per_sample);
                let Some(best) = best_other else {
                    return Verdict::Recovered("no healthy device left to compare with".into());
                };
                let ratio = per_sample / best;
                if ratio < cfg.recover_ratio && elapsed <= cfg.device_timeout {
                    Verdict::Recovered(format!(
                        "probe at {:.2}x the best healthy device (under {:.1}x)",
                        ratio, cfg.recover_ratio
                    ))
                } else {
                    Verdict::Stay
                }
            }
            DeviceState::Failed => Verdict::Stay,
        }
    }

    /// Another device completed a batch while this one had nothing in flight: its (unchanged)
    /// average against `best_other`, the lowest among the other healthy devices, counts as one
    /// more batch in a row over `slow_ratio` or ends the streak. Only a HEALTHY device with a
    /// measured average is judged.
    pub fn observe_idle(&mut self, best_other: Option<f64>, cfg: &EngineConfig) -> Verdict {
        let (DeviceState::Healthy, Some(avg), Some(best)) = (self.state, self.ewma, best_other)
        else {
            return Verdict::Stay;
        };
        let ratio = avg / best.min(avg);
        if ratio <= cfg.slow_ratio {
            self.streak = 0;
            return Verdict::Stay;
        }
        self.streak += 1;
        if self.streak < cfg.slow_batches {
            return Verdict::Stay;
        }
        self.streak = 0;
        Verdict::Slow(format!(
            "per-sample latency {:.1}x the best healthy device while {} batches in a row \
             completed without it (limit {:.1}x; the router no longer picks it)",
            ratio, cfg.slow_batches, cfg.slow_ratio
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_after_five_batches_and_recovers() {
        let cfg = EngineConfig::default();
        let mut h = Health::new();
        let ms = Duration::from_millis(1);
        for i in 0..4 {
            assert_eq!(h.observe(10e-6, ms, Some(1e-6), &cfg), Verdict::Stay, "{i}");
        }
        assert!(matches!(
            h.observe(10e-6, ms, Some(1e-6), &cfg),
            Verdict::Slow(_)
        ));
        h.state = DeviceState::Slow;
        assert_eq!(h.observe(5e-6, ms, Some(1e-6), &cfg), Verdict::Stay);
        assert!(matches!(
            h.observe(1.2e-6, ms, Some(1e-6), &cfg),
            Verdict::Recovered(_)
        ));
    }

    #[test]
    fn an_idle_device_with_a_slow_average_is_slow_after_five_batches_elsewhere() {
        let cfg = EngineConfig::default();
        let mut h = Health::new();
        // Unmeasured, or no other healthy device: nothing to judge.
        assert_eq!(h.observe_idle(Some(1e-6), &cfg), Verdict::Stay);
        h.ewma = Some(10e-6);
        assert_eq!(h.observe_idle(None, &cfg), Verdict::Stay);
        assert_eq!(h.streak, 0);
        // 10x the best: four completions elsewhere count, the fifth marks it.
        for i in 0..4 {
            assert_eq!(h.observe_idle(Some(1e-6), &cfg), Verdict::Stay, "{i}");
        }
        assert!(matches!(h.observe_idle(Some(1e-6), &cfg), Verdict::Slow(_)));
        assert_eq!(h.streak, 0);
        // Its own slow batches and idle ones add up; a best device that slows down ends it.
        h.observe(10e-6, Duration::from_millis(1), Some(1e-6), &cfg);
        h.observe_idle(Some(1e-6), &cfg);
        assert_eq!(h.streak, 2);
        assert_eq!(h.observe_idle(Some(6e-6), &cfg), Verdict::Stay);
        assert_eq!(h.streak, 0);
        // Only HEALTHY devices are judged this way (a SLOW one waits for its probes).
        h.state = DeviceState::Slow;
        for _ in 0..10 {
            assert_eq!(h.observe_idle(Some(1e-6), &cfg), Verdict::Stay);
        }
    }

    #[test]
    fn streak_resets_and_timeout_is_slow() {
        let cfg = EngineConfig::default();
        let mut h = Health::new();
        let ms = Duration::from_millis(1);
        h.observe(1e-6, ms, Some(1e-6), &cfg);
        for _ in 0..3 {
            h.observe(1e-3, ms, Some(1e-6), &cfg);
        }
        h.ewma = Some(1e-6);
        assert_eq!(h.observe(1e-6, ms, Some(1e-6), &cfg), Verdict::Stay);
        assert_eq!(h.streak, 0);
        let long = cfg.device_timeout + ms;
        assert!(matches!(
            h.observe(1e-6, long, None, &cfg),
            Verdict::Slow(_)
        ));
    }
}
