//! Fault injection at run time. Each device worker reads its [`Faults`] before every batch, so
//! a test (or an operator) can add or remove latency, failures and hangs while the engine runs
//! (`Engine::set_faults`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::config::FaultSpec;

/// What the worker does with the next batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Injected {
    /// Run it normally, after `delay` (zero when no latency is injected).
    Run {
        /// Added latency.
        delay: Duration,
    },
    /// Fail it with a device error.
    Fail,
    /// Sleep this long first (a hang), then run it.
    Hang(Duration),
}

/// Lock-free, changeable copy of a [`FaultSpec`]. Probabilities and durations are stored as
/// bit patterns in atomics; a reader may see a mix of an old and a new setting for one batch,
/// which is harmless for fault injection.
#[derive(Debug, Default)]
pub struct Faults {
    delay_ns: AtomicU64,
    jitter_ns: AtomicU64,
    fail_bits: AtomicU64,
    hang_bits: AtomicU64,
    hang_ns: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Faults {
    /// Faults from a spec; `default_hang` is used when the spec gives no `hang_for`.
    pub fn new(spec: &FaultSpec, default_hang: Duration) -> Faults {
        let f = Faults::default();
        f.set(spec, default_hang);
        f
    }

    /// Replaces the settings.
    pub fn set(&self, spec: &FaultSpec, default_hang: Duration) {
        self.delay_ns.store(nanos(spec.delay), Ordering::Relaxed);
        self.jitter_ns.store(nanos(spec.jitter), Ordering::Relaxed);
        self.fail_bits
            .store(spec.fail.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
        self.hang_bits
            .store(spec.hang.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
        self.hang_ns.store(
            nanos(spec.hang_for.unwrap_or(default_hang)),
            Ordering::Relaxed,
        );
    }

    /// The current settings.
    pub fn spec(&self) -> FaultSpec {
        FaultSpec {
            delay: Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed)),
            jitter: Duration::from_nanos(self.jitter_ns.load(Ordering::Relaxed)),
            fail: f64::from_bits(self.fail_bits.load(Ordering::Relaxed)),
            hang: f64::from_bits(self.hang_bits.load(Ordering::Relaxed)),
            hang_for: Some(Duration::from_nanos(self.hang_ns.load(Ordering::Relaxed))),
        }
    }

    /// Draws the fate of the next batch.
    pub fn draw(&self) -> Injected {
        let hang = f64::from_bits(self.hang_bits.load(Ordering::Relaxed));
        if hang > 0.0 && rand::random::<f64>() < hang {
            return Injected::Hang(Duration::from_nanos(self.hang_ns.load(Ordering::Relaxed)));
        }
        let fail = f64::from_bits(self.fail_bits.load(Ordering::Relaxed));
        if fail > 0.0 && rand::random::<f64>() < fail {
            return Injected::Fail;
        }
        let mut delay = self.delay_ns.load(Ordering::Relaxed);
        let jitter = self.jitter_ns.load(Ordering::Relaxed);
        if jitter > 0 {
            delay = delay.saturating_add((rand::random::<f64>() * jitter as f64) as u64);
        }
        Injected::Run {
            delay: Duration::from_nanos(delay),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_settings() {
        let f = Faults::new(&FaultSpec::default(), Duration::from_secs(1));
        assert_eq!(
            f.draw(),
            Injected::Run {
                delay: Duration::ZERO
            }
        );
        f.set(
            &FaultSpec {
                fail: 1.0,
                ..FaultSpec::default()
            },
            Duration::from_secs(1),
        );
        assert_eq!(f.draw(), Injected::Fail);
        f.set(
            &FaultSpec {
                hang: 1.0,
                ..FaultSpec::default()
            },
            Duration::from_millis(7),
        );
        assert_eq!(f.draw(), Injected::Hang(Duration::from_millis(7)));
        f.set(
            &FaultSpec {
                delay: Duration::from_millis(5),
                jitter: Duration::from_millis(1),
                ..FaultSpec::default()
            },
            Duration::from_secs(1),
        );
        match f.draw() {
            Injected::Run { delay } => {
                assert!(delay >= Duration::from_millis(5) && delay <= Duration::from_millis(6))
            }
            other => panic!("{other:?}"),
        }
    }
}
