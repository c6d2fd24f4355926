//! Completions and the failure paths of the core: FAILED devices and their retries, SLOW
//! devices giving back queued work, worker (re)starts with backoff, hang and queue timeouts
//! (the monitor's tick), and shutdown.
//!
//! Retry and delivery rules:
//! - A batch that was *running* on a device that errored, panicked or hung has failed a run;
//!   it is retried (front of its class) on another device while it has failed at most
//!   `max_retries` (1) runs, else it fails to its caller with the device error.
//! - A batch only *queued* at such a device is moved back to the pending queue without using
//!   its retry: it never ran.
//! - Taking a device's batches back bumps the device's worker generation first; a worker only
//!   reports a completion for its own generation, so an abandoned worker that wakes up late is
//!   ignored (counted in `fusion_engine_late_results_total`) and every batch is delivered once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::{Core, Deliveries, RoutingState, Work};
use super::health::{DeviceState, Verdict};
use super::job::BatchResult;
use super::worker::{self, RunResult};
use crate::error::Error;

impl Core {
    /// A worker finished job `id`. Returns false when the worker must exit (its device
    /// failed, or it was abandoned).
    pub fn complete(
        &self,
        d: usize,
        gen: u64,
        id: u64,
        res: RunResult,
        elapsed: std::time::Duration,
    ) -> bool {
        let mut st = self.state.lock();
        let now = Instant::now();
        let mut dl = Deliveries::new();
        let dev = &self.devices[d];
        if st.devs[d].gen != gen {
            self.late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.metrics.late_results.increment(1);
            tracing::info!(device = %dev.name, job = id, "discarded a late result of an abandoned worker");
            return false;
        }
        let Some(o) = st.devs[d].out.remove(&id) else {
            return true;
        };
        let rows = o.job.rows();
        let s = &mut st.devs[d];
        s.out_samples = s.out_samples.saturating_sub(rows);
        dev.metrics.in_flight.set(s.out.len() as f64);
        let keep_running = match res {
            Ok(outputs) => {
                s.counters.batches += 1;
                s.counters.samples += rows as u64;
                s.backoff = self.cfg.restart_backoff;
                dev.metrics.batches.increment(1);
                dev.metrics.samples.increment(rows as u64);
                dev.metrics.batch_seconds.record(elapsed.as_secs_f64());
                let best_other = best_other_average(&st, d);
                let per_sample = elapsed.as_secs_f64() / rows.max(1) as f64;
                let verdict = st.devs[d]
                    .health
                    .observe(per_sample, elapsed, best_other, &self.cfg);
                dl.push((
                    Arc::clone(&o.job.inner),
                    Ok(BatchResult {
                        outputs,
                        device: dev.name.clone(),
                        device_index: d,
                        retries: o.job.failed_runs,
                        device_time: elapsed,
                        total_time: now.duration_since(o.job.inner.submitted),
                    }),
                ));
                st.admitted -= 1;
                match verdict {
                    Verdict::Stay => {}
                    Verdict::Slow(why) => {
                        self.set_state(&mut st, d, DeviceState::Slow, &why);
                        st.devs[d].last_probe = Some(now);
                        self.take_back_queued(&mut st, d);
                    }
                    Verdict::Recovered(why) => {
                        self.set_state(&mut st, d, DeviceState::Healthy, &why)
                    }
                }
                self.judge_idle(&mut st, d, now);
                true
            }
            Err((_, e)) if e.is_input_error() => {
                s.counters.input_errors += 1;
                dev.metrics.error("input");
                dl.push((Arc::clone(&o.job.inner), Err(e)));
                st.admitted -= 1;
                true
            }
            Err((kind, e)) => {
                s.out.insert(id, o);
                self.fail_device(&mut st, d, kind, &e.to_string(), &mut dl);
                false
            }
        };
        self.dispatch(&mut st, now);
        if st.admitted == 0 {
            self.cond.notify_all();
        }
        drop(st);
        self.deliver_all(dl);
        keep_running
    }

    /// Device `done` completed a batch: every other HEALTHY device that the router could pick
    /// but left with nothing in flight is judged on its average against the best of the others
    /// (see `Health::observe_idle`). A CPU kept out of rotation beside a healthy accelerator
    /// (no `cpu_overflow`) is not judged: it is idle by configuration, not for being slow.
    fn judge_idle(&self, st: &mut RoutingState, done: usize, now: Instant) {
        let gpu_up = st.accelerator_up();
        for e in 0..st.devs.len() {
            let s = &st.devs[e];
            // (`observe_idle` judges HEALTHY devices only.)
            if e == done || !s.in_rotation(gpu_up, self.cfg.cpu_overflow) || !s.out.is_empty() {
                continue;
            }
            let best_other = best_other_average(st, e);
            if let Verdict::Slow(why) = st.devs[e].health.observe_idle(best_other, &self.cfg) {
                self.set_state(st, e, DeviceState::Slow, &why);
                st.devs[e].last_probe = Some(now);
            }
        }
    }

    /// Moves the batches waiting in device `d`'s worker queue back to the pending queue.
    fn take_back_queued(&self, st: &mut RoutingState, d: usize) {
        let Some(rx) = st.devs[d].rx.clone() else {
            return;
        };
        let gen = st.devs[d].gen;
        let mut back = Vec::new();
        while let Ok(Work { job, gen: g }) = rx.try_recv() {
            if g != gen {
                continue;
            }
            let s = &mut st.devs[d];
            if let Some(o) = s.out.remove(&job.id) {
                s.out_samples = s.out_samples.saturating_sub(o.job.rows());
                s.counters.rerouted += 1;
                back.push(o.job);
            }
        }
        let s = &st.devs[d];
        self.devices[d].metrics.in_flight.set(s.out.len() as f64);
        self.devices[d].metrics.queue_depth.set(s.queued() as f64);
        for job in back.into_iter().rev() {
            st.requeue_front(job);
        }
    }

    /// Marks device `d` FAILED: abandons its worker (new generation), retries or fails its
    /// batches, and schedules the restart with exponential backoff.
    pub(crate) fn fail_device(
        &self,
        st: &mut RoutingState,
        d: usize,
        kind: &'static str,
        reason: &str,
        dl: &mut Deliveries,
    ) {
        let now = Instant::now();
        let dev = &self.devices[d];
        let s = &mut st.devs[d];
        s.gen += 1;
        s.tx = None;
        s.rx = None;
        s.ready = false;
        s.lost = None;
        s.counters.failures += 1;
        s.last_error = Some(format!("{kind}: {reason}"));
        s.restart_at = Some(now + s.backoff);
        s.backoff = (s.backoff * 2).min(self.cfg.restart_backoff_max);
        s.out_samples = 0;
        let mut outs: Vec<_> = s.out.drain().map(|(_, o)| o).collect();
        dev.metrics.error(kind);
        dev.metrics.in_flight.set(0.0);
        dev.metrics.queue_depth.set(0.0);
        self.set_state(st, d, DeviceState::Failed, &format!("{kind}: {reason}"));
        outs.sort_by_key(|o| std::cmp::Reverse(o.job.inner.id));
        for o in outs {
            let mut job = o.job;
            if o.started.is_some() {
                job.failed_runs += 1;
                if !job.avoid.contains(&d) {
                    job.avoid.push(d);
                }
                if job.failed_runs > self.cfg.max_retries {
                    tracing::warn!(device = %dev.name, job = job.inner.id, "batch failed, retries exhausted");
                    dl.push((
                        Arc::clone(&job.inner),
                        Err(Error::Device {
                            backend: dev.name.clone(),
                            reason: format!(
                                "{reason} (the batch failed {} runs; retries exhausted)",
                                job.failed_runs
                            ),
                        }),
                    ));
                    st.admitted -= 1;
                    continue;
                }
                st.devs[d].counters.retried += 1;
                dev.metrics.retries.increment(1);
            } else {
                st.devs[d].counters.rerouted += 1;
            }
            st.requeue_front(job);
        }
    }

    /// Starts a worker thread (new queue) for device `d` at its current generation.
    pub(crate) fn spawn_worker(self: &Arc<Self>, st: &mut RoutingState, d: usize) {
        let cap = self.cfg.queue_capacity.max(self.cfg.max_in_flight);
        let (tx, rx) = crossbeam_channel::bounded(cap);
        let s = &mut st.devs[d];
        s.tx = Some(tx);
        s.rx = Some(rx.clone());
        s.ready = false;
        let gen = s.gen;
        let core = Arc::clone(self);
        let name = format!("fusion-{}", self.devices[d].name);
        match std::thread::Builder::new()
            .name(name)
            .spawn(move || worker::worker_loop(core, d, gen, rx))
        {
            Ok(h) => {
                let mut threads = self.threads.lock();
                threads.retain(|t| !t.is_finished());
                threads.push(h);
            }
            Err(e) => {
                tracing::error!(device = %self.devices[d].name, error = %e, "cannot start a worker thread");
                s.tx = None;
                s.rx = None;
                s.restart_at = Some(Instant::now() + s.backoff);
            }
        }
    }

    /// After [`Core::stop`]: waits up to `limit` for the device worker threads to exit, so that
    /// each backend is dropped (CUDA streams and contexts, wgpu devices) before the process
    /// exits: a driver torn down by `exit` under a thread still dropping its device failed
    /// (NVIDIA: page unlocks answered `CUDA_ERROR_DEINITIALIZED`, a wgpu `serve` crashed at
    /// exit; docs/PERF.md, session 14). A worker still running a batch past `limit` (a hang)
    /// is left behind. Returns how many were.
    pub fn join_workers(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        let threads = std::mem::take(&mut *self.threads.lock());
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut left = 0;
        for t in threads {
            if !t.is_finished() {
                left += 1;
            } else if t.join().is_err() {
                tracing::error!("a device worker thread panicked");
            }
        }
        if left > 0 {
            tracing::warn!(
                left,
                "shutdown: device workers still running a batch; left behind"
            );
        }
        left
    }

    /// A worker opened its device (`Ok(is a hardware accelerator)`) or could not. Returns
    /// false when it must exit.
    pub fn worker_opened(&self, d: usize, gen: u64, res: Result<bool, Error>) -> bool {
        let mut st = self.state.lock();
        let mut dl = Deliveries::new();
        if st.devs[d].gen != gen || st.stopped {
            return false;
        }
        let ok = match res {
            Ok(accelerator) => {
                let s = &mut st.devs[d];
                s.ready = true;
                s.accelerator = accelerator;
                s.opened.get_or_insert(Ok(()));
                tracing::info!(device = %self.devices[d].name, restarts = s.counters.restarts, "device worker ready");
                self.set_state(&mut st, d, DeviceState::Healthy, "worker (re)started");
                true
            }
            Err(e) => {
                st.devs[d].opened.get_or_insert(Err(e.to_string()));
                self.fail_device(&mut st, d, "open", &e.to_string(), &mut dl);
                false
            }
        };
        self.dispatch(&mut st, Instant::now());
        self.cond.notify_all();
        drop(st);
        self.deliver_all(dl);
        ok
    }

    /// The monitor's periodic work: hang detection, restarts, queue timeouts, due probes.
    pub fn tick(self: &Arc<Self>) {
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.stopped {
            return;
        }
        let mut dl = Deliveries::new();
        for d in 0..self.devices.len() {
            if let Some(why) = st.devs[d].lost.clone() {
                self.fail_device(&mut st, d, "device", &why, &mut dl);
                continue;
            }
            let oldest = st.devs[d].out.values().filter_map(|o| o.started).min();
            if let Some(t) = oldest.filter(|t| now.duration_since(*t) > self.cfg.device_timeout) {
                let why = format!(
                    "a batch has run for {:.3} s, past device_timeout {:.3} s; worker abandoned",
                    now.duration_since(t).as_secs_f64(),
                    self.cfg.device_timeout.as_secs_f64()
                );
                self.fail_device(&mut st, d, "timeout", &why, &mut dl);
            }
        }
        for d in 0..self.devices.len() {
            if st.devs[d].restart_at.is_some_and(|t| t <= now) {
                st.devs[d].restart_at = None;
                st.devs[d].counters.restarts += 1;
                self.devices[d].metrics.restarts.increment(1);
                tracing::info!(device = %self.devices[d].name, "restarting device worker");
                self.spawn_worker(&mut st, d);
            }
        }
        let limit = self.cfg.queue_timeout;
        for c in 0..3 {
            let (keep, old): (Vec<_>, Vec<_>) = std::mem::take(&mut st.pending[c])
                .into_iter()
                .partition(|j| now.duration_since(j.inner.submitted) <= limit);
            st.pending[c] = keep.into();
            for j in old {
                st.admitted -= 1;
                dl.push((
                    Arc::clone(&j.inner),
                    Err(Error::Timeout(format!(
                        "no device took the batch within queue_timeout {:.3} s",
                        limit.as_secs_f64()
                    ))),
                ));
            }
        }
        self.dispatch(&mut st, now);
        if st.admitted == 0 {
            self.cond.notify_all();
        }
        drop(st);
        self.deliver_all(dl);
    }

    /// Ends the engine: fails every batch still pending or at a device with a shutdown error
    /// and disconnects every worker. Returns how many batches were failed.
    pub fn stop(&self) -> usize {
        let mut st = self.state.lock();
        st.accepting = false;
        st.stopped = true;
        let mut dl = Deliveries::new();
        let msg = |w: &str| Error::Shutdown(format!("the engine shut down {w}"));
        for c in 0..3 {
            for j in std::mem::take(&mut st.pending[c]) {
                dl.push((j.inner, Err(msg("before the batch ran"))));
            }
        }
        for d in 0..self.devices.len() {
            let s = &mut st.devs[d];
            s.gen += 1;
            s.tx = None;
            s.rx = None;
            s.ready = false;
            s.restart_at = None;
            s.out_samples = 0;
            for (_, o) in s.out.drain() {
                dl.push((o.job.inner, Err(msg("while the batch was at its device"))));
            }
        }
        st.admitted = 0;
        self.metrics.pending.set(0.0);
        self.cond.notify_all();
        drop(st);
        let n = dl.len();
        self.deliver_all(dl);
        n
    }
}

/// The lowest per-sample average among the HEALTHY, ready devices other than `d` (what `d`'s
/// health is judged against), or `None` when there is no such device.
fn best_other_average(st: &RoutingState, d: usize) -> Option<f64> {
    st.devs
        .iter()
        .enumerate()
        .filter(|(i, o)| *i != d && o.health.state == DeviceState::Healthy && o.ready)
        .filter_map(|(_, o)| o.health.ewma)
        .reduce(f64::min)
}
