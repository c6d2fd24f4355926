//! Kernel timing for `fusion-engine bench` and the criterion benches: the whole head and, where
//! the backend offers it, its projections alone, measured alternately in the same loop so both
//! see the same machine state. Reports medians after warm-up.

use std::time::Instant;

use rand::SeedableRng;

use crate::backend::Backend;
use crate::batch::Outputs;
use crate::error::{Error, Result};
use crate::selftest::{random_batch, MaskMode};
use crate::tensor::DType;

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
    /// Timed iterations.
    pub iters: usize,
    /// Median milliseconds per batch, whole head.
    pub ms_per_batch: f64,
    /// Samples per second at that median.
    pub samples_per_s: f64,
    /// Mean milliseconds per batch (includes the slow outliers the median ignores; compare
    /// with wall-clock throughputs such as `bench --devices`).
    pub mean_ms_per_batch: f64,
    /// GFLOP/s of the projections' work at the whole head's time.
    pub gflops: f64,
    /// Median milliseconds of the projections alone (same GEMM path), if the backend offers it.
    pub proj_ms_per_batch: Option<f64>,
    /// GFLOP/s of the projections alone.
    pub proj_gflops: Option<f64>,
    /// Whole head time / projections-alone time.
    pub head_over_proj: Option<f64>,
    /// Percent of the machine's CPU time stolen by the hypervisor during the timed loop
    /// (`/proc/stat`; absent elsewhere): a disturbed run, not a slow backend, when high.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_steal_pct: Option<f64>,
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

/// Benchmarks `backend` (with its uploaded head) on random inputs of `rows` x `dtype`.
pub fn bench_backend(
    backend: &mut impl Backend,
    rows: usize,
    dtype: DType,
    iters: usize,
    warmup: usize,
) -> Result<BenchResult> {
    let head = backend
        .head()
        .cloned()
        .ok_or_else(|| Error::Config("bench: no head uploaded".into()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xBE7C4);
    let batch = random_batch(&head, rows, dtype, MaskMode::All, &mut rng);
    let view = batch.view();
    let mut out = Outputs::zeros(&head, rows);
    let mut has_proj = true;
    for _ in 0..warmup.max(1) {
        backend.run(&view, out.as_mut())?;
        has_proj = backend.run_projections_only(&view)?;
    }
    let iters = iters.max(1);
    let steal = crate::steal::StealMeter::start();
    let mut head_ms = Vec::with_capacity(iters);
    let mut proj_ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        backend.run(&view, out.as_mut())?;
        head_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if has_proj {
            let t = Instant::now();
            backend.run_projections_only(&view)?;
            proj_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let host_steal_pct = steal.percent();
    let mean_ms = head_ms.iter().sum::<f64>() / head_ms.len() as f64;
    let ms = median(&mut head_ms);
    let flops = head.proj_flops(rows);
    let proj = has_proj.then(|| median(&mut proj_ms));
    Ok(BenchResult {
        backend: backend.info().kind.name().into(),
        device: backend.info().name.clone(),
        batch: rows,
        dtype,
        iters,
        ms_per_batch: ms,
        samples_per_s: rows as f64 / (ms / 1e3),
        mean_ms_per_batch: mean_ms,
        gflops: flops / (ms / 1e3) / 1e9,
        proj_ms_per_batch: proj,
        proj_gflops: proj.map(|p| flops / (p / 1e3) / 1e9),
        head_over_proj: proj.map(|p| ms / p),
        host_steal_pct,
    })
}
