//! [`Engine`]: the cloneable-by-`Arc` handle callers use: start, submit, stats, faults,
//! shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use super::config::{DeviceSpec, EngineConfig, FaultSpec};
use super::core::{Core, Device, DeviceCounters};
use super::fault::Faults;
use super::health::DeviceState;
use super::job::{Priority, Ticket};
use super::metrics::DeviceMetrics;
use crate::backend::{self, BackendKind};
use crate::batch::{Batch, Outputs};
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// One device's numbers, as `Engine::stats` reports them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceStats {
    /// `kind:index`, or `kind:index/i` for instance `i > 0` of a spec with `instances`.
    pub name: String,
    /// The device spec it was started from.
    pub spec: String,
    /// Health state.
    pub state: DeviceState,
    /// Its worker has opened the device.
    pub ready: bool,
    /// Batches waiting in its worker queue.
    pub queued: usize,
    /// Batches dispatched and not completed (queued + running).
    pub in_flight: usize,
    /// Highest `in_flight` seen.
    pub max_in_flight_seen: usize,
    /// Batches, samples, errors, state changes, retries, restarts (read through `Deref` too:
    /// `stats.failures`).
    #[serde(flatten)]
    pub counters: DeviceCounters,
    /// Per-sample latency moving average, milliseconds.
    pub ms_per_sample: Option<f64>,
    /// The last failure.
    pub last_error: Option<String>,
}

impl std::ops::Deref for DeviceStats {
    type Target = DeviceCounters;

    /// `stats.failures` reads the counter, as it did when the counters were fields of the stats.
    fn deref(&self) -> &DeviceCounters {
        &self.counters
    }
}

/// Engine-wide numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineStats {
    /// Admitted batches not yet at a device.
    pub pending: usize,
    /// Admitted batches not yet delivered.
    pub admitted: usize,
    /// The admission bound.
    pub max_pending: usize,
    /// Highest `admitted` seen.
    pub max_admitted_seen: usize,
    /// Submissions refused with `Error::Overloaded`.
    pub overloaded: u64,
    /// Results of abandoned workers that came back late and were discarded.
    pub late_results: u64,
    /// Second deliveries suppressed (always 0 unless there is a bug).
    pub duplicate_deliveries: u64,
    /// Per device.
    pub devices: Vec<DeviceStats>,
}

/// The engine: device workers behind a router. Dropping it fails whatever is still pending
/// (see [`Engine::shutdown`] to drain first).
pub struct Engine {
    core: Arc<Core>,
    monitor: Option<std::thread::JoinHandle<()>>,
    stop: Option<Sender<()>>,
}

impl Engine {
    /// Opens every configured device (each on its own worker thread) and starts routing.
    /// Waits up to `open_timeout` for the devices; fails when none could be opened. Devices
    /// that failed to open stay FAILED and are retried with backoff.
    pub fn start(cfg: EngineConfig, head: Arc<FusionHead>) -> Result<Engine> {
        cfg.validate()?;
        let devices = resolve_devices(&cfg)?;
        let hang_default = cfg.device_timeout * 10;
        // `instances=N`: N engine devices on one physical device, the first under its plain
        // name, the others `kind:index/i` (docs/DESIGN.md section 6.2).
        let devices: Vec<Device> = devices
            .into_iter()
            .flat_map(|(spec, index)| {
                (0..spec.instances.max(1)).map(move |i| {
                    let name = match i {
                        0 => format!("{}:{index}", spec.kind),
                        i => format!("{}:{index}/{i}", spec.kind),
                    };
                    Device {
                        faults: Faults::new(&spec.faults, hang_default),
                        metrics: DeviceMetrics::new(&name),
                        name,
                        spec: spec.clone(),
                        index,
                    }
                })
            })
            .collect();
        let core = Arc::new(Core::new(cfg, head, devices));
        {
            let mut st = core.state.lock();
            for d in 0..core.devices.len() {
                core.spawn_worker(&mut st, d);
            }
            let deadline = Instant::now() + core.cfg.open_timeout;
            while st.devs.iter().any(|s| s.opened.is_none()) {
                if core.cond.wait_until(&mut st, deadline).timed_out() {
                    break;
                }
            }
            if !st.devs.iter().any(|s| s.ready) {
                let why: Vec<String> = core
                    .devices
                    .iter()
                    .zip(&st.devs)
                    .map(|(d, s)| match &s.opened {
                        Some(Err(e)) => format!("{}: {e}", d.name),
                        _ => format!("{}: did not open within open_timeout", d.name),
                    })
                    .collect();
                drop(st);
                core.stop();
                return Err(Error::BackendUnavailable {
                    backend: "engine".into(),
                    reason: why.join("; "),
                });
            }
        }
        let (stop, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let tick = (core.cfg.device_timeout / 8)
            .clamp(Duration::from_millis(1), Duration::from_millis(50));
        let mcore = Arc::clone(&core);
        let monitor = std::thread::Builder::new()
            .name("fusion-engine-monitor".into())
            .spawn(move || {
                // Disconnected (the engine stopped) or a message ends the loop.
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(tick) {
                    mcore.tick();
                }
            })
            .map_err(|e| {
                core.stop();
                Error::Config(format!("cannot start the engine monitor thread: {e}"))
            })?;
        Ok(Engine {
            core,
            monitor: Some(monitor),
            stop: Some(stop),
        })
    }

    /// Submits a batch. Never blocks: a full engine answers `Error::Overloaded` at once, a
    /// batch with wrong shapes is refused as bad input. The ticket resolves exactly once.
    pub fn submit(&self, batch: Batch, priority: Priority) -> Result<Ticket> {
        self.core.submit(Arc::new(batch), priority)
    }

    /// [`Engine::submit`] for a shared batch (no copy; the engine keeps a reference until the
    /// batch is done).
    pub fn submit_shared(&self, batch: Arc<Batch>, priority: Priority) -> Result<Ticket> {
        self.core.submit(batch, priority)
    }

    /// An empty buffer of at least `capacity` bytes for a batch's matrix or mask, recycled from
    /// batches the engine is done with (docs/DESIGN.md section 6): a batch assembled in such
    /// buffers and submitted gives them back when its last run ends, so steady-state batching
    /// allocates nothing. Any `Vec<u8>` works in a [`Batch`]; this one is just warm. With a
    /// CUDA device open it may be page-locked (docs/DESIGN.md section 6.7): write at most its
    /// capacity (growing reallocates it) and hand it back in a submitted batch; one dropped
    /// elsewhere stays locked until the pool sees its memory in use again.
    pub fn batch_buffer(&self, capacity: usize) -> Vec<u8> {
        self.core.buffers.take(capacity)
    }

    /// The pool behind [`Engine::batch_buffer`].
    pub(crate) fn buffer_pool(&self) -> &Arc<super::buffers::BufferPool> {
        &self.core.buffers
    }

    /// Hands a delivered batch's outputs back for reuse once the caller is done with them, so
    /// that the next batch's outputs need no fresh allocation (optional: dropping them is fine).
    /// With a CUDA device the pool page-locks the outputs it gets back, and later results are
    /// copied straight into them (docs/DESIGN.md section 6.7); outputs are then best given
    /// back rather than dropped, as a dropped locked buffer stays locked until the engine sees
    /// its memory allocated again.
    pub fn recycle(&self, outputs: Outputs) {
        self.core.recycle(outputs);
    }

    /// How full the engine is: admitted, undelivered batches over `max_pending` (0..=1; 1 means
    /// the next `submit` is refused with `Overloaded`).
    pub fn saturation(&self) -> f64 {
        let admitted = self.core.state.lock().admitted;
        admitted as f64 / self.core.max_pending.max(1) as f64
    }

    /// The head the devices run.
    pub fn head(&self) -> &Arc<FusionHead> {
        &self.core.head
    }

    /// The configuration in force.
    pub fn config(&self) -> &EngineConfig {
        &self.core.cfg
    }

    /// Device names (`kind:index`) in device order.
    pub fn device_names(&self) -> Vec<String> {
        self.core.devices.iter().map(|d| d.name.clone()).collect()
    }

    /// Replaces the injected faults of device `device` (index in device order) at run time.
    pub fn set_faults(&self, device: usize, faults: &FaultSpec) -> Result<()> {
        let d = self.core.devices.get(device).ok_or_else(|| {
            Error::Config(format!(
                "no device {device} (the engine has {})",
                self.core.devices.len()
            ))
        })?;
        d.faults.set(faults, self.core.cfg.device_timeout * 10);
        Ok(())
    }

    /// A snapshot of the engine's numbers.
    pub fn stats(&self) -> EngineStats {
        let c = &self.core;
        let st = c.state.lock();
        EngineStats {
            pending: st.pending_len(),
            admitted: st.admitted,
            max_pending: c.max_pending,
            max_admitted_seen: st.max_pending_seen,
            overloaded: c.overloaded.load(std::sync::atomic::Ordering::Relaxed),
            late_results: c.late.load(std::sync::atomic::Ordering::Relaxed),
            duplicate_deliveries: c.duplicates.load(std::sync::atomic::Ordering::Relaxed),
            devices: c
                .devices
                .iter()
                .zip(&st.devs)
                .map(|(d, s)| DeviceStats {
                    name: d.name.clone(),
                    spec: d.spec.to_string(),
                    state: s.health.state,
                    ready: s.ready,
                    queued: s.queued(),
                    in_flight: s.out.len(),
                    max_in_flight_seen: s.max_out_seen,
                    counters: s.counters.clone(),
                    ms_per_sample: s.health.ewma.map(|e| e * 1e3),
                    last_error: s.last_error.clone(),
                })
                .collect(),
        }
    }

    /// Stops admitting, waits up to `grace` for the admitted batches to finish, then fails
    /// whatever is left with `Error::Shutdown` (no caller waits forever) and stops the
    /// workers. Returns the number of batches failed that way.
    pub fn shutdown(mut self, grace: Duration) -> usize {
        self.drain(grace);
        self.finish()
    }

    fn drain(&self, grace: Duration) {
        let mut st = self.core.state.lock();
        st.accepting = false;
        let deadline = Instant::now() + grace;
        while st.admitted > 0 {
            if self.core.cond.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
    }

    fn finish(&mut self) -> usize {
        let n = self.core.stop();
        self.stop.take();
        if let Some(m) = self.monitor.take() {
            if m.join().is_err() {
                tracing::error!("the engine monitor thread panicked");
            }
        }
        // A batch longer than `device_timeout` counts as hung anyway.
        self.core.join_workers(self.core.cfg.device_timeout);
        n
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.monitor.is_some() {
            self.finish();
        }
    }
}

/// Device list with indices resolved: explicit ones as given, the others the lowest free index
/// of their kind. An empty list means every usable accelerator plus the CPU.
fn resolve_devices(cfg: &EngineConfig) -> Result<Vec<(DeviceSpec, usize)>> {
    let specs: Vec<DeviceSpec> = if cfg.devices.is_empty() {
        let mut v: Vec<DeviceSpec> = backend::discover()
            .into_iter()
            .filter_map(|e| e.device)
            .filter(|d| d.accelerator)
            .map(|d| DeviceSpec::new(d.kind, Some(d.index)))
            .collect();
        v.push(DeviceSpec::new(BackendKind::Cpu, None));
        v
    } else {
        cfg.devices.clone()
    };
    let mut taken: Vec<(BackendKind, usize)> = specs
        .iter()
        .filter_map(|s| s.index.map(|i| (s.kind, i)))
        .collect();
    let mut seen = Vec::new();
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        let index = match s.index {
            Some(i) => i,
            None => {
                let i = (0..)
                    .find(|i| !taken.contains(&(s.kind, *i)))
                    .unwrap_or_default();
                taken.push((s.kind, i));
                i
            }
        };
        if seen.contains(&(s.kind, index)) {
            return Err(Error::Config(format!(
                "device {}:{index} is listed twice",
                s.kind
            )));
        }
        seen.push((s.kind, index));
        out.push((s, index));
    }
    Ok(out)
}
