//! Kernel timing for `fusion-engine bench` and the criterion benches. After warm-up, the whole
//! head runs back to back (median batch time, the latency; throughput by wall clock, the same
//! measure as the engine's `bench --devices`); then, where the backend offers it, the head and
//! its projections alone alternate in one loop so that their ratio sees one machine state.

pub mod cli;

use std::time::Instant;

use rand::SeedableRng;

use crate::backend::host_lock::registry;
use crate::backend::Backend;
use crate::batch::{Batch, Outputs};
use crate::engine::buffers::BufferPool;
use crate::engine::out_pool::OutputPool;
use crate::error::{Error, Result};
use crate::selftest::{random_batch, MaskMode};
use crate::tensor::{DType, HostMat};

/// Where the bench's batch inputs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputMemory {
    /// Ordinary (pageable) memory: the CUDA backend stages the inputs into its pinned buffers.
    Pageable,
    /// Page-locked by the backend in place, as the engine's recycled batch buffers are
    /// (docs/DESIGN.md section 6.7): the CUDA backend copies them to the device directly. The
    /// outputs are page-locked too, as the engine's recycled outputs are: the CUDA backend
    /// copies the results into them directly.
    Pinned,
}

/// One bench line (printed as JSON by `bench`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// Backend name.
    pub backend: String,
    /// Device name.
    pub device: String,
    /// Batch size.
    pub batch: usize,
    /// Input dtype.
    pub dtype: DType,
    /// Where the inputs lived: `pageable`, or `pinned` (`bench --pinned`).
    pub inputs: InputMemory,
    /// Timed iterations.
    pub iters: usize,
    /// Median milliseconds per batch, whole head (latency).
    pub ms_per_batch: f64,
    /// Throughput: samples of all timed batches over the wall time of the loop that ran them
    /// back to back (`batch / mean_ms_per_batch`), slow batches included, as the engine's
    /// `bench --devices` counts them.
    pub samples_per_s: f64,
    /// Samples per second at the median batch time: what an undisturbed batch achieves; above
    /// `samples_per_s` by however much the host's slow spells cost.
    pub median_samples_per_s: f64,
    /// Wall milliseconds of the timed loop per batch.
    pub mean_ms_per_batch: f64,
    /// GFLOP/s of the projections' work at the whole head's median time.
    pub gflops: f64,
    /// Median milliseconds of the projections alone (same GEMM path), if the backend offers it.
    pub proj_ms_per_batch: Option<f64>,
    /// GFLOP/s of the projections alone.
    pub proj_gflops: Option<f64>,
    /// Whole head time / projections-alone time, both medians of a loop that alternates them.
    pub head_over_proj: Option<f64>,
    /// Percent of the machine's CPU time stolen by the hypervisor during the timed loop
    /// (`/proc/stat`; absent elsewhere): a disturbed run, not a slow backend, when high.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_steal_pct: Option<f64>,
    /// Where the whole head's time went, per batch, for backends that time their own stages
    /// (CUDA: device times from timing events, host times from the host clock).
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub stages: Option<StageTimes>,
}

/// Per-batch means of a backend's [`RunStats`](crate::backend::RunStats) over the timed runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageTimes {
    /// Device time of the projection GEMMs (ms per batch).
    pub device_proj_ms: f64,
    /// Device time of the GEMMs and the fused epilogue (ms per batch): the head on the device.
    pub device_head_ms: f64,
    /// `device_head_ms / device_proj_ms`: what the epilogue adds to the projections alone.
    pub device_head_over_proj: f64,
    /// Samples per second of the device's kernels alone (no copies).
    pub device_samples_per_s: f64,
    /// Rate of the backend's own host -> device copies (GB/s, device timing).
    pub h2d_gbps: f64,
    /// Rate of its device -> host copies (GB/s).
    pub d2h_gbps: f64,
    /// Share of the copied input bytes the device read straight from the batch's page-locked
    /// memory (0 when everything was staged; docs/DESIGN.md section 6.7).
    pub h2d_direct_share: f64,
    /// Share of the copied result bytes the device wrote straight into the page-locked outputs
    /// (0 when everything was staged and drained; docs/DESIGN.md section 6.7).
    pub d2h_direct_share: f64,
    /// Host ms per batch copying inputs into staging memory.
    pub host_stage_ms: f64,
    /// Host ms per batch waiting for the device.
    pub host_wait_ms: f64,
    /// Host ms per batch copying results out of staging memory.
    pub host_drain_ms: f64,
    /// Runs whose projections the GPU wrote in the inputs' half dtype (CUDA; docs/DESIGN.md
    /// section 2.5), and batches recomputed with f32 projections after a half overflow.
    pub half_h_runs: u64,
    pub h_f32_reruns: u64,
    /// The epilogue kernel that ran (CUDA: `FUSION_CUDA_EPILOGUE` picks it).
    pub epilogue_kernel: Option<&'static str>,
}

/// `part / all`, 0 when nothing was copied.
fn share(part: u64, all: u64) -> f64 {
    if all > 0 {
        part as f64 / all as f64
    } else {
        0.0
    }
}

impl StageTimes {
    fn from_stats(s: &crate::backend::RunStats, rows: usize) -> Option<StageTimes> {
        if s.runs == 0 {
            return None;
        }
        let n = s.runs as f64;
        let gbps = |bytes: u64, ms: f64| {
            if ms > 0.0 {
                bytes as f64 / (ms / 1e3) / 1e9
            } else {
                f64::NAN
            }
        };
        let proj = s.gemm_ms / n;
        let head = (s.gemm_ms + s.epilogue_ms) / n;
        Some(StageTimes {
            device_proj_ms: proj,
            device_head_ms: head,
            device_head_over_proj: head / proj,
            device_samples_per_s: rows as f64 / (head / 1e3),
            h2d_gbps: gbps(s.h2d_bytes, s.h2d_ms),
            d2h_gbps: gbps(s.d2h_bytes, s.d2h_ms),
            h2d_direct_share: share(s.h2d_direct_bytes, s.h2d_bytes),
            d2h_direct_share: share(s.d2h_direct_bytes, s.d2h_bytes),
            host_stage_ms: s.host_stage_ms / n,
            host_wait_ms: s.host_wait_ms / n,
            host_drain_ms: s.host_drain_ms / n,
            half_h_runs: s.half_h_runs,
            h_f32_reruns: s.h_f32_reruns,
            epilogue_kernel: s.epilogue_kernel,
        })
    }
}

/// Median of a sample (sorts in place).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The bench's batch and outputs; with pools, their buffers are the pools' page-locked ones,
/// given back (and unlocked when the pools drop, after them) when this drops.
struct BenchBatch {
    batch: Batch,
    outputs: Outputs,
    pool: Option<(BufferPool, OutputPool)>,
}

impl Drop for BenchBatch {
    fn drop(&mut self) {
        if let Some((pool, out_pool)) = &self.pool {
            pool.give_batch(&mut self.batch);
            let empty = Outputs {
                fused: Vec::new(),
                weights: Vec::new(),
            };
            out_pool.recycle(std::mem::replace(&mut self.outputs, empty));
        }
    }
}

/// `src` copied into buffers page-locked by `backend`'s lock, all of them locked, and outputs
/// for it locked with the same lock.
fn pinned_batch(backend: &impl Backend, src: Batch, outputs: Outputs) -> Result<BenchBatch> {
    let kind = backend.info().kind;
    let lock = backend.page_lock().ok_or_else(|| {
        Error::Config(format!(
            "--pinned: the {kind} backend does not page-lock host memory (cuda does)"
        ))
    })?;
    let pool = BufferPool::default();
    pool.set_page_lock(lock.clone());
    let out_pool = OutputPool::default();
    out_pool.set_page_lock(lock);
    let outputs = out_pool.take_locked(outputs.fused.len(), outputs.weights.len());
    let copy = |bytes: &[u8]| {
        let mut v = pool.take_locked(bytes.len());
        v.extend_from_slice(bytes);
        v
    };
    let inputs = src
        .inputs
        .iter()
        .map(|m| HostMat {
            dtype: m.dtype,
            rows: m.rows,
            cols: m.cols,
            bytes: copy(&m.bytes).into(),
        })
        .collect();
    let mask = copy(&src.mask);
    let b = BenchBatch {
        batch: Batch {
            rows: src.rows,
            inputs,
            mask,
        },
        outputs,
        pool: Some((pool, out_pool)),
    };
    let ranges = registry();
    let locked =
        b.batch.inputs.iter().all(|m| {
            m.bytes.is_empty() || ranges.contains(m.bytes.as_ptr() as usize, m.bytes.len())
        });
    if !locked {
        return Err(Error::Device {
            backend: kind.name().into(),
            reason: "--pinned: the inputs could not be page-locked (RUST_LOG=debug says why)"
                .into(),
        });
    }
    Ok(b)
}

/// Benchmarks `backend` (with its uploaded head) on random inputs of `rows` x `dtype`, held in
/// `inputs` memory.
pub fn bench_backend(
    backend: &mut impl Backend,
    rows: usize,
    dtype: DType,
    iters: usize,
    warmup: usize,
    inputs: InputMemory,
) -> Result<BenchResult> {
    let head = backend
        .head()
        .cloned()
        .ok_or_else(|| Error::Config("bench: no head uploaded".into()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xBE7C4);
    let batch = random_batch(&head, rows, dtype, MaskMode::All, &mut rng);
    let outputs = Outputs::zeros(&head, rows);
    let mut batch = match inputs {
        InputMemory::Pageable => BenchBatch {
            batch,
            outputs,
            pool: None,
        },
        InputMemory::Pinned => pinned_batch(backend, batch, outputs)?,
    };
    let view = batch.batch.view();
    let out = &mut batch.outputs;
    let mut has_proj = true;
    for _ in 0..warmup.max(1) {
        backend.run(&view, out.as_mut())?;
        has_proj = backend.run_projections_only(&view)?;
    }
    let iters = iters.max(1);
    // Warm-up runs are not counted.
    let _ = backend.take_run_stats();

    // Pass 1, the headline: the whole head back to back, as a caller running batches does.
    let steal = crate::tools::steal::StealMeter::start();
    let mut head_ms = Vec::with_capacity(iters);
    let t0 = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        backend.run(&view, out.as_mut())?;
        head_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let host_steal_pct = steal.percent();
    let stages = backend
        .take_run_stats()
        .and_then(|s| StageTimes::from_stats(&s, rows));
    // Pass 2, the head against its projections alone: alternated in one loop so that both
    // see the same machine state (their ratio is what this pass is for).
    let mut ratio_head_ms = Vec::with_capacity(iters);
    let mut proj_ms = Vec::with_capacity(iters);
    if has_proj {
        for _ in 0..iters {
            let t = Instant::now();
            backend.run(&view, out.as_mut())?;
            ratio_head_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            backend.run_projections_only(&view)?;
            proj_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let _ = backend.take_run_stats();
    }
    let mean_ms = wall_ms / iters as f64;
    let ms = median(&mut head_ms);
    let flops = head.proj_flops(rows);
    let proj = has_proj.then(|| median(&mut proj_ms));
    let ratio_head = median(&mut ratio_head_ms);
    Ok(BenchResult {
        backend: backend.info().kind.name().into(),
        device: backend.info().name.clone(),
        batch: rows,
        dtype,
        inputs,
        iters,
        ms_per_batch: ms,
        samples_per_s: rows as f64 / (mean_ms / 1e3),
        median_samples_per_s: rows as f64 / (ms / 1e3),
        mean_ms_per_batch: mean_ms,
        gflops: flops / (ms / 1e3) / 1e9,
        proj_ms_per_batch: proj,
        proj_gflops: proj.map(|p| flops / (p / 1e3) / 1e9),
        head_over_proj: proj.map(|p| ratio_head / p),
        host_steal_pct,
        stages,
    })
}

#[cfg(test)]
mod tests;
