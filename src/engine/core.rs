//! The engine's shared state and its admission and dispatch paths.
//!
//! One mutex guards all routing state (pending queue, per-device outstanding batches, health),
//! so accounting is always consistent; it is held for microseconds per batch, never while a
//! kernel runs or a result is delivered. Device backends are not in it: each is owned by its
//! worker thread (`worker.rs`), which talks to the core through [`Core::begin`] and
//! [`Core::complete`]. The failure paths (completion, FAILED, restart, timeouts, shutdown) are
//! in `lifecycle.rs`.
//!
//! Bounds: at most `max_pending` admitted, undelivered batches in the engine (`submit` returns
//! `Error::Overloaded` beyond that, at once); at most `max_in_flight` batches dispatched to a
//! device and not completed (these are the worker's queue plus the running batch; the worker's
//! crossbeam channel has `queue_capacity` slots, so it can never be full).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use super::buffers::BufferPool;
use super::config::{DeviceSpec, EngineConfig};
use super::fault::Faults;
use super::health::{DeviceState, Health};
use super::job::{BatchResult, Job, JobInner, Priority, Ticket};
use super::metrics::{DeviceMetrics, EngineMetrics};
use super::out_pool::OutputPool;
use super::router::{self, scan_order, Candidate, AGED_SHARE};
use crate::batch::{Batch, Outputs};
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// A batch handed to a worker, tagged with the worker generation it was sent to.
pub(crate) struct Work {
    pub job: Arc<JobInner>,
    pub gen: u64,
}

/// The fixed part of a device.
pub(crate) struct Device {
    /// `kind:index`.
    pub name: String,
    pub spec: DeviceSpec,
    pub index: usize,
    pub faults: Faults,
    pub metrics: DeviceMetrics,
}

/// A batch dispatched to a device and not completed.
pub(crate) struct Outstanding {
    pub job: Job,
    /// When the worker started running it; `None` while it waits in the worker's queue.
    pub started: Option<Instant>,
}

/// One device's event counters: kept in `DevState` under the core's lock and reported as they
/// are in [`DeviceStats`](super::DeviceStats) (flattened into its JSON).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounters {
    /// Batches completed successfully.
    pub batches: u64,
    /// Samples completed successfully.
    pub samples: u64,
    /// Batches rejected as bad input.
    pub input_errors: u64,
    /// HEALTHY -> SLOW transitions.
    pub slow_events: u64,
    /// Transitions to FAILED (errors, panics, hangs, open failures).
    pub failures: u64,
    /// Batches that were running when it failed and were retried elsewhere.
    pub retried: u64,
    /// Batches waiting at it when it failed or turned SLOW, moved back to the engine queue.
    pub rerouted: u64,
    /// Worker restarts.
    pub restarts: u64,
}

/// The changing part of a device.
pub(crate) struct DevState {
    pub health: Health,
    /// Worker generation; bumped when a worker is abandoned, so its late calls are ignored.
    pub gen: u64,
    /// The current generation's worker has opened its backend.
    pub ready: bool,
    /// The opened device is a hardware accelerator (not the CPU, not a software adapter).
    pub accelerator: bool,
    pub tx: Option<Sender<Work>>,
    /// The core's handle on the worker queue, to take back batches not started yet.
    pub rx: Option<Receiver<Work>>,
    pub out: HashMap<u64, Outstanding>,
    pub out_samples: usize,
    pub max_out_seen: usize,
    pub last_probe: Option<Instant>,
    pub restart_at: Option<Instant>,
    pub backoff: Duration,
    /// Result of the first open (what `Engine::start` waits for).
    pub opened: Option<std::result::Result<(), String>>,
    /// Set when the worker's queue turned out disconnected; the monitor fails the device.
    pub lost: Option<String>,
    pub last_error: Option<String>,
    pub counters: DeviceCounters,
}

impl DevState {
    fn routable(&self) -> bool {
        self.ready && self.tx.is_some() && self.health.state != DeviceState::Failed
    }

    /// The router may pick it: routable, and an accelerator, or a CPU while no accelerator is
    /// HEALTHY (`gpu_up` false) or when `cpu_overflow` is on.
    pub(crate) fn in_rotation(&self, gpu_up: bool, cpu_overflow: bool) -> bool {
        self.routable() && (self.accelerator || !gpu_up || cpu_overflow)
    }

    pub(crate) fn queued(&self) -> usize {
        self.out.values().filter(|o| o.started.is_none()).count()
    }
}

/// Everything behind the lock.
pub(crate) struct RoutingState {
    /// Admitted batches not at a device, one queue per priority class.
    pub pending: [VecDeque<Job>; 3],
    /// Admitted and not delivered (pending + at devices).
    pub admitted: usize,
    pub accepting: bool,
    /// Set by the final shutdown: no more restarts or dispatches.
    pub stopped: bool,
    pub next_id: u64,
    pub max_pending_seen: usize,
    /// Dispatches in strict priority order since the last one of an aged lower-class batch
    /// (anti-starvation share, see [`router::scan_order`]).
    pub strict_since_aged: u32,
    pub devs: Vec<DevState>,
}

impl RoutingState {
    /// A hardware accelerator is HEALTHY and routable (the CPU is then only fallback/overflow).
    pub(crate) fn accelerator_up(&self) -> bool {
        self.devs
            .iter()
            .any(|s| s.accelerator && s.routable() && s.health.state == DeviceState::Healthy)
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.iter().map(VecDeque::len).sum()
    }

    pub(crate) fn requeue_front(&mut self, job: Job) {
        self.pending[job.inner.priority as usize].push_front(job);
    }
}

/// Results decided under the lock and delivered after it is released.
pub(crate) type Deliveries = Vec<(Arc<JobInner>, Result<BatchResult>)>;

/// The engine's shared core.
pub(crate) struct Core {
    pub cfg: EngineConfig,
    pub head: Arc<FusionHead>,
    pub devices: Vec<Device>,
    pub max_pending: usize,
    pub state: Mutex<RoutingState>,
    /// Signalled when a device opened or failed to, and when the engine runs empty.
    pub cond: Condvar,
    pub metrics: EngineMetrics,
    pub duplicates: AtomicU64,
    pub late: AtomicU64,
    pub overloaded: AtomicU64,
    /// Output buffers handed back by callers ([`super::Engine::recycle`]), reused by workers so
    /// that a batch does not allocate and zero fresh outputs ([`OutputPool`]).
    pub outputs: OutputPool,
    /// Batch input buffers, back from every batch the engine dropped ([`BufferPool`]).
    pub buffers: Arc<BufferPool>,
    /// The device worker threads started and not seen finished ([`Core::join_workers`]).
    pub threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Core {
    pub fn new(cfg: EngineConfig, head: Arc<FusionHead>, devices: Vec<Device>) -> Core {
        let max_pending = cfg
            .max_pending
            .unwrap_or(cfg.queue_capacity * devices.len().max(1));
        let devs = devices
            .iter()
            .map(|_| DevState {
                health: Health::new(),
                gen: 0,
                ready: false,
                accelerator: false,
                tx: None,
                rx: None,
                out: HashMap::new(),
                out_samples: 0,
                max_out_seen: 0,
                last_probe: None,
                restart_at: None,
                backoff: cfg.restart_backoff,
                opened: None,
                lost: None,
                last_error: None,
                counters: DeviceCounters::default(),
            })
            .collect();
        Core {
            max_pending,
            state: Mutex::new(RoutingState {
                pending: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
                admitted: 0,
                accepting: true,
                stopped: false,
                next_id: 0,
                max_pending_seen: 0,
                strict_since_aged: 0,
                devs,
            }),
            cond: Condvar::new(),
            metrics: EngineMetrics::new(),
            duplicates: AtomicU64::new(0),
            late: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            outputs: OutputPool::default(),
            buffers: Arc::default(),
            threads: Mutex::new(Vec::new()),
            cfg,
            head,
            devices,
        }
    }

    /// Admits a batch or refuses it at once. A refused batch's buffers go back to the pool
    /// (they may be page-locked: docs/DESIGN.md section 6.7), unless the caller shares it.
    pub fn submit(&self, mut batch: Arc<Batch>, priority: Priority) -> Result<Ticket> {
        let refuse = |e: Error, batch: &mut Arc<Batch>| {
            if let Some(b) = Arc::get_mut(batch) {
                self.buffers.give_batch(b);
            }
            Err(e)
        };
        if let Err(e) = batch.view().validate_shapes(&self.head) {
            return refuse(e, &mut batch);
        }
        let mut st = self.state.lock();
        if !st.accepting {
            drop(st);
            return refuse(
                Error::Shutdown("the engine is shutting down".into()),
                &mut batch,
            );
        }
        if st.admitted >= self.max_pending {
            self.overloaded.fetch_add(1, Ordering::Relaxed);
            self.metrics.overloaded.increment(1);
            let e = Error::Overloaded(format!(
                "{} batches pending in the engine (max_pending {})",
                st.admitted, self.max_pending
            ));
            drop(st);
            return refuse(e, &mut batch);
        }
        let id = st.next_id;
        st.next_id += 1;
        let (job, ticket) = Job::new(id, batch, priority, Arc::clone(&self.buffers));
        st.pending[priority as usize].push_back(job);
        st.admitted += 1;
        st.max_pending_seen = st.max_pending_seen.max(st.admitted);
        self.dispatch(&mut st, Instant::now());
        Ok(ticket)
    }

    /// Sends what can be sent now: probes to SLOW devices that are due one, then the routing
    /// plan over the healthy devices (see `router.rs`).
    pub(crate) fn dispatch(&self, st: &mut RoutingState, now: Instant) {
        self.metrics.pending.set(st.pending_len() as f64);
        if st.stopped || st.pending_len() == 0 {
            return;
        }
        // The CPU (and software adapters such as lavapipe) are the fallback while no hardware
        // accelerator is HEALTHY, and overflow beside one when configured.
        let gpu_up = st.accelerator_up();
        let usable: Vec<usize> = (0..self.devices.len())
            .filter(|&i| st.devs[i].in_rotation(gpu_up, self.cfg.cpu_overflow))
            .collect();
        let any_healthy = usable
            .iter()
            .any(|&i| st.devs[i].health.state == DeviceState::Healthy);
        if any_healthy {
            for &i in &usable {
                let s = &st.devs[i];
                let due = s.health.state == DeviceState::Slow
                    && s.out.is_empty()
                    && s.last_probe
                        .is_none_or(|t| now.duration_since(t) >= self.cfg.probe_interval);
                if !due {
                    continue;
                }
                if let Some(job) = take_probe(st, i) {
                    tracing::debug!(device = %self.devices[i].name, "probe batch to a SLOW device");
                    st.devs[i].last_probe = Some(now);
                    self.send(st, i, job);
                }
            }
        }
        let known = usable
            .iter()
            .filter_map(|&i| st.devs[i].health.ewma)
            .fold(f64::INFINITY, f64::min);
        let initial = if known.is_finite() { known } else { 1e-6 };
        let mut cands: Vec<Candidate> = Vec::with_capacity(usable.len());
        for &i in &usable {
            let s = &st.devs[i];
            if any_healthy && s.health.state != DeviceState::Healthy {
                continue;
            }
            // An untried device gets one batch at the optimistic estimate, so it is measured.
            let cap = if s.health.ewma.is_some() {
                self.cfg.max_in_flight
            } else {
                1
            };
            cands.push(Candidate {
                dev: i,
                free: cap.saturating_sub(s.out.len()),
                load: s.out_samples,
                per_sample: s.health.ewma.unwrap_or(initial),
            });
        }
        if cands.iter().all(|c| c.free == 0) {
            return;
        }
        let aged_first = st.strict_since_aged + 1 >= AGED_SHARE;
        let flat = scan_order(&st.pending, now, self.cfg.priority_aging, aged_first);
        let plan = {
            let view: Vec<(usize, &[usize])> = flat
                .iter()
                .map(|&(c, k)| {
                    let j = &st.pending[c][k];
                    (j.rows(), j.avoid.as_slice())
                })
                .collect();
            router::plan(&view, &mut cands)
        };
        let mut picks: Vec<(usize, usize, usize)> = plan
            .iter()
            .map(|&(pos, ci)| (flat[pos].0, flat[pos].1, cands[ci].dev))
            .collect();
        // Remove from the back first so the earlier indices stay valid.
        picks.sort_by_key(|p| std::cmp::Reverse((p.0, p.1)));
        let mut jobs = Vec::with_capacity(picks.len());
        for (c, k, dev) in picks {
            if let Some(job) = st.pending[c].remove(k) {
                jobs.push((dev, job));
            }
        }
        for (_, job) in &jobs {
            let aged =
                job.inner.priority != Priority::Critical && job.aged(now, self.cfg.priority_aging);
            st.strict_since_aged = if aged {
                0
            } else {
                (st.strict_since_aged + 1).min(AGED_SHARE)
            };
        }
        for (dev, job) in jobs.into_iter().rev() {
            self.send(st, dev, job);
        }
        self.metrics.pending.set(st.pending_len() as f64);
    }

    /// Hands `job` to device `d`'s worker queue, or puts it back at the front of the pending
    /// queue when the worker cannot take it.
    fn send(&self, st: &mut RoutingState, d: usize, job: Job) {
        let s = &mut st.devs[d];
        let Some(tx) = &s.tx else {
            st.requeue_front(job);
            return;
        };
        let work = Work {
            job: Arc::clone(&job.inner),
            gen: s.gen,
        };
        match tx.try_send(work) {
            Ok(()) => {
                s.out_samples += job.rows();
                s.out
                    .insert(job.inner.id, Outstanding { job, started: None });
                s.max_out_seen = s.max_out_seen.max(s.out.len());
                self.devices[d].metrics.in_flight.set(s.out.len() as f64);
                self.devices[d].metrics.queue_depth.set(s.queued() as f64);
            }
            Err(TrySendError::Full(_)) => {
                // Cannot happen (at most max_in_flight <= capacity outstanding); stay safe.
                tracing::warn!(device = %self.devices[d].name, "worker queue full; batch kept pending");
                st.requeue_front(job);
            }
            Err(TrySendError::Disconnected(_)) => {
                s.lost = Some("the worker thread exited unexpectedly".into());
                st.requeue_front(job);
            }
        }
    }

    /// The worker is about to run job `id`: true when it is still assigned to this worker
    /// generation (it may have been taken back or the worker abandoned meanwhile).
    pub fn begin(&self, d: usize, gen: u64, id: u64) -> bool {
        let mut st = self.state.lock();
        let s = &mut st.devs[d];
        if s.gen != gen {
            return false;
        }
        match s.out.get_mut(&id) {
            Some(o) if o.started.is_none() => {
                o.started = Some(Instant::now());
                self.devices[d].metrics.queue_depth.set(s.queued() as f64);
                true
            }
            _ => false,
        }
    }

    /// Changes device `d`'s state, logging and counting the transition.
    pub(crate) fn set_state(&self, st: &mut RoutingState, d: usize, to: DeviceState, reason: &str) {
        let s = &mut st.devs[d];
        let from = s.health.state;
        if from == to {
            return;
        }
        s.health.state = to;
        s.health.streak = 0;
        let name = &self.devices[d].name;
        match to {
            DeviceState::Healthy => {
                tracing::info!(device = %name, %from, %to, reason, "device state change")
            }
            _ => tracing::warn!(device = %name, %from, %to, reason, "device state change"),
        }
        if to == DeviceState::Slow {
            s.counters.slow_events += 1;
        }
        self.devices[d].metrics.state_change(to);
    }

    /// Delivers results decided under the lock.
    pub(crate) fn deliver_all(&self, dl: Deliveries) {
        for (job, r) in dl {
            if let Ok(res) = &r {
                self.metrics
                    .batch_seconds
                    .record(res.total_time.as_secs_f64());
            }
            job.deliver(r, &self.duplicates);
        }
    }
}

/// The probe batch for SLOW device `d`: the newest batch of the lowest class that may run on
/// it, so a probe costs the latency of the least urgent work.
fn take_probe(st: &mut RoutingState, d: usize) -> Option<Job> {
    for c in (0..3).rev() {
        if let Some(k) = st.pending[c].iter().rposition(|j| !j.avoid.contains(&d)) {
            return st.pending[c].remove(k);
        }
    }
    None
}

impl Core {
    /// Output buffers for a batch of `rows`: a recycled pair when one is spare (resized; every
    /// element is overwritten by the backend's `run`, which writes the whole `[rows, D]` and
    /// `[rows, M]`), fresh zeroed ones otherwise.
    pub fn outputs_for(&self, rows: usize) -> Outputs {
        let (d, m) = (self.head.dim, self.head.num_modalities());
        self.outputs.outputs_for(rows * d, rows * m)
    }

    /// Keeps `o` for a later batch (dropped when enough are spare already).
    pub fn recycle(&self, o: Outputs) {
        self.outputs.recycle(o);
    }
}
