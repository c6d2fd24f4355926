//! The engine under synthetic load (`fusion-engine bench --devices LIST --samples N`): after one
//! untimed warm-up batch per device, random batches are submitted until N samples went in, resubmitting after `Overloaded` with a short
//! backoff, and every ticket is awaited. The report counts what was submitted, delivered,
//! delivered twice (must be 0) and failed, and per device its share, state and latencies.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use crate::backend::Backend;
use crate::batch::Batch;
use crate::engine::{DeviceState, Engine, EngineConfig, Priority, Ticket};
use crate::error::{Error, Result};
use crate::model::FusionHead;
use crate::selftest::{random_batch, MaskMode};
use crate::tensor::DType;
use crate::tools::bench::median;

/// Engine bench settings.
#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    /// Samples to submit (rounded up to whole batches).
    pub samples: usize,
    /// Rows per batch.
    pub batch: usize,
    /// Input dtype.
    pub dtype: DType,
    /// Sleep after an `Overloaded` answer before trying again.
    pub overload_backoff: Duration,
    /// Distinct random batches cycled through. 1 (the default) resubmits the same batch, as
    /// the kernel bench does, so `--devices cpu` against `--backend cpu` isolates the engine's
    /// own cost.
    pub distinct_batches: usize,
    /// Untimed, uncounted batches submitted and awaited first (one per device by default), so
    /// every device has opened its pools and been measured once.
    pub warmup_batches: Option<usize>,
}

impl Default for EngineBenchOptions {
    fn default() -> Self {
        EngineBenchOptions {
            samples: 20_000,
            batch: 256,
            dtype: DType::F32,
            overload_backoff: Duration::from_micros(500),
            distinct_batches: 1,
            warmup_batches: None,
        }
    }
}

/// One device's line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceReport {
    /// `kind:index`.
    pub name: String,
    /// Batches it delivered.
    pub batches: u64,
    /// Samples it delivered.
    pub samples: u64,
    /// Share of the delivered samples.
    pub share: f64,
    /// State at the end.
    pub state: DeviceState,
    /// HEALTHY -> SLOW transitions.
    pub slow_events: u64,
    /// Transitions to FAILED.
    pub failures: u64,
    /// Batches running on it when it failed, retried elsewhere.
    pub retried: u64,
    /// Batches queued on it when it failed or turned SLOW, moved back.
    pub rerouted: u64,
    /// Worker restarts.
    pub restarts: u64,
    /// Median time on the device per delivered batch, ms.
    pub p50_ms: f64,
    /// 99th percentile of that, ms.
    pub p99_ms: f64,
    /// Mean of that, ms.
    pub mean_ms: f64,
    /// Sum of its time on the device over the timed load, seconds (compare with `wall_s`:
    /// equal for one device means it never waited for work).
    pub busy_s: f64,
}

/// The report (`bench --devices ... --json` prints it as one JSON object).
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineBenchReport {
    /// The device list.
    pub devices_spec: String,
    /// Rows per batch.
    pub batch: usize,
    /// Samples submitted (admitted).
    pub submitted: u64,
    /// Samples delivered with a result.
    pub delivered: u64,
    /// Batches delivered more than once (must be 0).
    pub duplicates: u64,
    /// Samples whose batch failed for good (error delivered to the caller).
    pub failed_permanently: u64,
    /// `Overloaded` answers (each was retried after a short backoff).
    pub overloaded: u64,
    /// Abandoned workers' late results, discarded.
    pub late_results: u64,
    /// First submission to last delivery, seconds.
    pub wall_s: f64,
    /// Delivered samples per second of wall time.
    pub samples_per_s: f64,
    /// Submission-to-delivery latency, median ms.
    pub e2e_p50_ms: f64,
    /// Submission-to-delivery latency, 99th percentile ms.
    pub e2e_p99_ms: f64,
    /// Highest count of admitted, undelivered batches.
    pub max_admitted: usize,
    /// Percent of the machine's CPU time stolen by the hypervisor during the timed load
    /// (`/proc/stat`; absent elsewhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_steal_pct: Option<f64>,
    /// CPU time of this process (all threads) per delivered sample during the timed load, µs
    /// (`/proc/self/stat`; absent elsewhere): the cost of a sample, undistorted by host steal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_sample: Option<f64>,
    /// Per device.
    pub devices: Vec<DeviceReport>,
    /// Error codes of permanently failed batches, with counts.
    pub errors: HashMap<String, u64>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Submits `n` batches (`next(i)`) keeping at most `window` undelivered, handing each ticket to
/// `done` in submission order; an `Overloaded` answer finishes the oldest ticket first (or backs
/// off when there is none). Returns how many submissions were refused.
fn submit_windowed(
    engine: &Engine,
    n: usize,
    window: usize,
    backoff: Duration,
    mut next: impl FnMut(usize) -> Arc<Batch>,
    mut done: impl FnMut(Ticket) -> Result<()>,
) -> Result<u64> {
    let mut inflight: VecDeque<Ticket> = VecDeque::with_capacity(window + 1);
    let mut overloaded = 0u64;
    for i in 0..n {
        let b = next(i);
        loop {
            match engine.submit_shared(Arc::clone(&b), Priority::Bulk) {
                Ok(t) => break inflight.push_back(t),
                Err(Error::Overloaded(_)) => {
                    overloaded += 1;
                    match inflight.pop_front() {
                        Some(t) => done(t)?,
                        None => std::thread::sleep(backoff),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        while inflight.len() > window {
            if let Some(t) = inflight.pop_front() {
                done(t)?;
            }
        }
    }
    while let Some(t) = inflight.pop_front() {
        done(t)?;
    }
    Ok(overloaded)
}

/// Runs the engine bench: starts an engine with `cfg`, loads it, shuts it down.
pub fn run_engine_bench(
    cfg: EngineConfig,
    head: Arc<FusionHead>,
    opts: &EngineBenchOptions,
) -> Result<EngineBenchReport> {
    if opts.batch == 0 || opts.samples == 0 {
        return Err(Error::Config(
            "--batch and --samples must be at least 1".into(),
        ));
    }
    let spec = cfg
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let engine = Engine::start(cfg, Arc::clone(&head))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xE1C0);
    let pool: Vec<Arc<_>> = (0..opts.distinct_batches.max(1))
        .map(|_| {
            Arc::new(random_batch(
                &head,
                opts.batch,
                opts.dtype,
                MaskMode::All,
                &mut rng,
            ))
        })
        .collect();
    let warm = opts.warmup_batches.unwrap_or(engine.device_names().len());
    let warm_tickets = (0..warm)
        .map(|_| engine.submit_shared(Arc::clone(&pool[0]), Priority::Bulk))
        .collect::<Result<Vec<_>>>()?;
    for t in warm_tickets {
        // A warm-up failure shows in the device stats; the timed load decides the verdict.
        let _ = t.wait();
    }
    let nbatches = opts.samples.div_ceil(opts.batch);
    // Results are consumed while the load runs (a window of tickets per device), as a real
    // caller does: holding every output until the end would make each batch's outputs fresh
    // memory (page faults on a hot path the kernel bench does not have).
    let window = engine.device_names().len().max(1) * (engine.config().max_in_flight + 4);
    let mut delivered = 0u64;
    let mut failed = 0u64;
    let mut errors: HashMap<String, u64> = HashMap::new();
    let mut e2e = Vec::with_capacity(nbatches);
    let mut per_dev: HashMap<String, (u64, u64, Vec<f64>)> = HashMap::new();
    let mut record = |t: Ticket| match t.wait() {
        Ok(r) => {
            delivered += r.outputs.weights.len() as u64 / head.num_modalities() as u64;
            e2e.push(r.total_time.as_secs_f64() * 1e3);
            let e = per_dev.entry(r.device).or_default();
            e.0 += 1;
            e.1 += (r.outputs.fused.len() / head.dim) as u64;
            e.2.push(r.device_time.as_secs_f64() * 1e3);
            engine.recycle(r.outputs);
        }
        Err(e) => {
            failed += opts.batch as u64;
            *errors.entry(e.code().to_string()).or_default() += 1;
        }
    };
    let steal = crate::tools::steal::StealMeter::start();
    let cpu = crate::tools::steal::CpuMeter::start();
    let t0 = Instant::now();
    let overloaded = submit_windowed(
        &engine,
        nbatches,
        window,
        opts.overload_backoff,
        |i| Arc::clone(&pool[i % pool.len()]),
        |t| {
            record(t);
            Ok(())
        },
    )?;
    let wall = t0.elapsed().as_secs_f64();
    let host_steal_pct = steal.percent();
    let cpu_us_per_sample = cpu
        .seconds()
        .filter(|_| delivered > 0)
        .map(|c| c * 1e6 / delivered as f64);
    let stats = engine.stats();
    engine.shutdown(Duration::from_secs(1));
    let devices = stats
        .devices
        .iter()
        .map(|d| {
            let (batches, samples, mut lat) = per_dev.remove(&d.name).unwrap_or_default();
            DeviceReport {
                name: d.name.clone(),
                batches,
                samples,
                share: if delivered > 0 {
                    samples as f64 / delivered as f64
                } else {
                    0.0
                },
                state: d.state,
                slow_events: d.slow_events,
                failures: d.failures,
                retried: d.retried,
                rerouted: d.rerouted,
                restarts: d.restarts,
                p50_ms: if lat.is_empty() {
                    0.0
                } else {
                    median(&mut lat.clone())
                },
                p99_ms: percentile(&mut lat, 0.99),
                mean_ms: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
                busy_s: lat.iter().sum::<f64>() / 1e3,
            }
        })
        .collect();
    Ok(EngineBenchReport {
        devices_spec: spec,
        batch: opts.batch,
        submitted: (nbatches * opts.batch) as u64,
        delivered,
        duplicates: stats.duplicate_deliveries,
        failed_permanently: failed,
        overloaded,
        late_results: stats.late_results,
        wall_s: wall,
        samples_per_s: delivered as f64 / wall,
        e2e_p50_ms: if e2e.is_empty() {
            0.0
        } else {
            median(&mut e2e.clone())
        },
        e2e_p99_ms: percentile(&mut e2e, 0.99),
        max_admitted: stats.max_admitted_seen,
        host_steal_pct,
        cpu_us_per_sample,
        devices,
        errors,
    })
}

/// `bench --devices LIST --overhead`: the engine against the same kernel called directly, in
/// one process, alternating segments of the same number of batches (ABBA order), so that both
/// see the same machine; each side's throughput is its samples over its own wall time.
#[derive(Debug, Clone)]
pub struct OverheadOptions {
    /// Rows per batch.
    pub batch: usize,
    /// Input dtype.
    pub dtype: DType,
    /// Segments per side.
    pub rounds: usize,
    /// Batches per segment.
    pub batches_per_segment: usize,
}

/// Report of [`run_overhead_bench`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct OverheadReport {
    /// The device.
    pub device: String,
    /// Rows per batch.
    pub batch: usize,
    /// Segments per side.
    pub rounds: usize,
    /// Batches per segment.
    pub batches_per_segment: usize,
    /// Through the engine (submit, queue, route, worker, completion): samples / wall seconds.
    pub engine_samples_per_s: f64,
    /// The same backend called directly in a loop: samples / wall seconds.
    pub direct_samples_per_s: f64,
    /// `engine_samples_per_s / direct_samples_per_s`.
    pub ratio: f64,
    /// Each round's engine/direct ratio (the engine segment and the direct segment next to it).
    pub round_ratios: Vec<f64>,
    /// Median of `round_ratios`.
    pub median_round_ratio: f64,
    /// The direct side's median batch time as samples/s (how `bench --backend` reports).
    pub direct_median_samples_per_s: f64,
    /// Host steal during the timed part, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_steal_pct: Option<f64>,
}

/// Runs the overhead comparison on the one device of `cfg` (no faults).
pub fn run_overhead_bench(
    cfg: EngineConfig,
    head: Arc<FusionHead>,
    opts: &OverheadOptions,
) -> Result<OverheadReport> {
    let [spec] = cfg.devices.as_slice() else {
        return Err(Error::Config(
            "--overhead compares one device with its kernel: give exactly one device".into(),
        ));
    };
    if !spec.faults.is_none() {
        return Err(Error::Config(
            "--overhead measures the engine's own cost: give a device without faults".into(),
        ));
    }
    if opts.batch == 0 || opts.rounds == 0 || opts.batches_per_segment == 0 {
        return Err(Error::Config(
            "--batch, rounds and batches per segment must be at least 1".into(),
        ));
    }
    let open = crate::backend::OpenOptions {
        threads: spec.threads,
        allow_tf32: cfg.allow_tf32,
    };
    // Opened as the engine's worker opens it (a backend whose libraries are missing may panic).
    let mut direct = std::panic::catch_unwind(|| {
        crate::backend::open(spec.kind, spec.index.unwrap_or(0), Arc::clone(&head), &open)
    })
    .unwrap_or_else(|_| {
        Err(Error::Config(format!(
            "{spec}: the backend panicked while opening"
        )))
    })?;
    let device = spec.to_string();
    let engine = Engine::start(cfg, Arc::clone(&head))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0E4D);
    let batch = Arc::new(random_batch(
        &head,
        opts.batch,
        opts.dtype,
        MaskMode::All,
        &mut rng,
    ));
    let mut out = crate::batch::Outputs::zeros(&head, opts.batch);
    let window = engine.config().max_in_flight + 4;
    let per = opts.batches_per_segment;
    let through_engine = |n: usize| -> Result<f64> {
        let t0 = Instant::now();
        let backoff = Duration::from_micros(200);
        submit_windowed(
            &engine,
            n,
            window,
            backoff,
            |_| Arc::clone(&batch),
            |t| {
                engine.recycle(t.wait()?.outputs);
                Ok(())
            },
        )?;
        Ok(t0.elapsed().as_secs_f64())
    };
    let mut direct_ms = Vec::with_capacity(opts.rounds * per);
    let mut run_direct = |n: usize, times: &mut Vec<f64>| -> Result<f64> {
        let view = batch.view();
        let t0 = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            direct.run(&view, out.as_mut())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    // Warm-up: both sides once, untimed.
    through_engine(2)?;
    run_direct(2, &mut Vec::new())?;
    let steal = crate::tools::steal::StealMeter::start();
    let (mut e_total, mut d_total) = (0.0, 0.0);
    let mut round_ratios = Vec::with_capacity(opts.rounds);
    for r in 0..opts.rounds {
        // ABBA: even rounds engine first, odd rounds direct first.
        let (e, d) = if r % 2 == 0 {
            let e = through_engine(per)?;
            (e, run_direct(per, &mut direct_ms)?)
        } else {
            let d = run_direct(per, &mut direct_ms)?;
            (through_engine(per)?, d)
        };
        e_total += e;
        d_total += d;
        round_ratios.push(d / e);
    }
    let host_steal_pct = steal.percent();
    engine.shutdown(Duration::from_secs(1));
    let samples = (opts.rounds * per * opts.batch) as f64;
    let (engine_sps, direct_sps) = (samples / e_total, samples / d_total);
    Ok(OverheadReport {
        device,
        batch: opts.batch,
        rounds: opts.rounds,
        batches_per_segment: per,
        engine_samples_per_s: engine_sps,
        direct_samples_per_s: direct_sps,
        ratio: engine_sps / direct_sps,
        median_round_ratio: median(&mut round_ratios.clone()),
        round_ratios,
        direct_median_samples_per_s: opts.batch as f64 / (median(&mut direct_ms) / 1e3),
        host_steal_pct,
    })
}
