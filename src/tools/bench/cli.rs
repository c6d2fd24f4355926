//! `fusion-engine bench`: three modes of one command, each with its own report:
//! the head on one backend (`--backend`), the whole engine on synthetic load over a device list
//! (`--devices`), and the engine against the same kernel called directly (`--overhead`).

use std::path::PathBuf;
use std::process::ExitCode;

use super::{bench_backend, BenchResult, InputMemory};
use crate::backend::{self, BackendChoice, OpenOptions};
use crate::engine::{DeviceSpec, EngineConfig};
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::tools::common::{load_head, print_json, steal_note};
use crate::tools::engine_bench::{
    run_engine_bench, run_overhead_bench, EngineBenchOptions, EngineBenchReport, OverheadOptions,
    OverheadReport,
};

/// Time the head on a backend; one line per (batch, dtype) run.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Batch sizes, comma separated (default 1024; with --devices one size, default 256).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Timed iterations per run (median batch time and throughput over all of them reported).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Input dtypes, comma separated (f32, f16, bf16).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    dtype: Vec<DType>,
    /// Fusion head; the embedded default head when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// With --backend: the inputs and outputs in memory the backend page-locks in place, as the
    /// engine's recycled batch and output buffers are (CUDA copies them to and from the device
    /// directly, no staging copy; docs/DESIGN.md section 6.7). Without it they are ordinary
    /// pageable memory.
    #[arg(long, conflicts_with = "devices")]
    pinned: bool,
    /// Run the whole engine on synthetic load over these devices instead of timing one
    /// backend: a comma list such as `cpu,cpu:delay=50ms`, `cpu:threads=1:fail=0.2`,
    /// `cuda:0,wgpu:0,cpu` (options: threads, instances, delay, jitter, fail, hang, hang_for).
    #[arg(long)]
    devices: Option<String>,
    /// With --devices: samples to submit.
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// With --devices: the engine settings, from the `[engine]` section of the TOML file
    /// `serve --config` reads (a `.json` file is read as the engine section alone, in JSON);
    /// --devices replaces its device list.
    #[arg(long)]
    config: Option<PathBuf>,
    /// With one device in --devices: instead of the load test, compare the engine with the
    /// same kernel called directly, in one process, alternating segments of --iters batches
    /// (ABBA, 20 segments each); prints both throughputs and their ratio.
    #[arg(long, requires = "devices")]
    overhead: bool,
}

impl BenchArgs {
    /// Runs the mode the flags ask for.
    pub fn run(self) -> Result<ExitCode> {
        match &self.devices {
            Some(devices) if self.overhead => self.overhead_bench(devices),
            Some(devices) => self.engine_bench(devices),
            None => self.backend_bench(),
        }
    }

    /// `--backend`: the head alone, back to back, per (batch, dtype).
    fn backend_bench(&self) -> Result<ExitCode> {
        let batches = if self.batch.is_empty() {
            vec![1024]
        } else {
            self.batch.clone()
        };
        let head = load_head(self.model.clone())?;
        let opts = OpenOptions {
            threads: self.threads,
            ..Default::default()
        };
        let mut be = backend::open_choice(self.backend, head, &opts)?;
        for &b in &batches {
            if b == 0 {
                return Err(Error::Config("--batch must be at least 1".into()));
            }
            for &dt in &self.dtype {
                let inputs = if self.pinned {
                    InputMemory::Pinned
                } else {
                    InputMemory::Pageable
                };
                let r = bench_backend(&mut be, b, dt, self.iters, self.warmup, inputs)?;
                if self.json {
                    print_json(&r)?;
                } else {
                    print_backend_result(&r);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The engine settings: `--config` (TOML `[engine]` section, or JSON), `--devices` and
    /// the one batch size.
    fn engine_setup(&self, devices: &str) -> Result<(EngineConfig, usize)> {
        let mut cfg = match &self.config {
            Some(p) => crate::engine::config::load_engine_config(p)?,
            None => EngineConfig::default(),
        };
        cfg.devices = DeviceSpec::parse_list(devices)?;
        let rows = match self.batch[..] {
            [] => 256,
            [rows] => rows,
            _ => return Err(Error::Config("--devices takes one --batch size".into())),
        };
        Ok((cfg, rows))
    }

    fn dtype(&self) -> DType {
        self.dtype.first().copied().unwrap_or(DType::F32)
    }

    /// `--devices ... --overhead`: the engine against the same kernel called directly.
    fn overhead_bench(&self, devices: &str) -> Result<ExitCode> {
        let (cfg, rows) = self.engine_setup(devices)?;
        let o = OverheadOptions {
            batch: rows,
            dtype: self.dtype(),
            rounds: 20,
            batches_per_segment: self.iters,
        };
        let head = load_head(self.model.clone())?;
        let r = run_overhead_bench(cfg, head, &o)?;
        if self.json {
            print_json(&r)?;
        } else {
            print_overhead(&r);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// `--devices`: the whole engine on synthetic load; fails when a sample was lost or
    /// delivered twice.
    fn engine_bench(&self, devices: &str) -> Result<ExitCode> {
        let (cfg, rows) = self.engine_setup(devices)?;
        let opts = EngineBenchOptions {
            samples: self.samples,
            batch: rows,
            dtype: self.dtype(),
            ..EngineBenchOptions::default()
        };
        let head = load_head(self.model.clone())?;
        let r = run_engine_bench(cfg, head, &opts)?;
        if self.json {
            print_json(&r)?;
        } else {
            print_engine_report(&r);
        }
        let whole = r.delivered + r.failed_permanently == r.submitted && r.duplicates == 0;
        Ok(if whole {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

fn print_backend_result(r: &BenchResult) {
    let proj = match (r.proj_ms_per_batch, r.head_over_proj) {
        (Some(p), Some(x)) => format!("  proj-only {p:.3} ms (head/proj {x:.2}x)"),
        _ => String::new(),
    };
    let steal = steal_note(r.host_steal_pct);
    let pinned = match r.inputs {
        InputMemory::Pinned => "  (pinned inputs and outputs)",
        InputMemory::Pageable => "",
    };
    println!(
        "{:5} {:>6} {:4}  {:9.3} ms/batch (median)  {:12.0} samples/s ({:.0} at the median)  {:7.1} GFLOP/s{proj}  [{}]{pinned}{steal}",
        r.backend, r.batch, r.dtype, r.ms_per_batch, r.samples_per_s, r.median_samples_per_s, r.gflops, r.device
    );
    if let Some(s) = &r.stages {
        println!(
            "      device: proj {:.3} ms, head {:.3} ms ({:.2}x), {:.0} samples/s; copies: \
             h2d {:.1} GB/s ({:.0}% direct), d2h {:.1} GB/s ({:.0}% direct); host: stage \
             {:.3} ms, wait {:.3} ms, drain {:.3} ms",
            s.device_proj_ms,
            s.device_head_ms,
            s.device_head_over_proj,
            s.device_samples_per_s,
            s.h2d_gbps,
            s.h2d_direct_share * 100.0,
            s.d2h_gbps,
            s.d2h_direct_share * 100.0,
            s.host_stage_ms,
            s.host_wait_ms,
            s.host_drain_ms
        );
        if s.half_h_runs > 0 || s.h_f32_reruns > 0 {
            println!(
                "      projections written in {}: {} runs; recomputed with f32 after an overflow: {}",
                r.dtype, s.half_h_runs, s.h_f32_reruns
            );
        }
        if let Some(k) = s.epilogue_kernel {
            println!("      epilogue kernel: {k}");
        }
    }
}

fn print_overhead(r: &OverheadReport) {
    println!(
        "{} batch {}: engine {:.0} samples/s, direct {:.0} samples/s (median batch {:.0}), engine/direct {:.3} (median of {} rounds {:.3}){}",
        r.device, r.batch, r.engine_samples_per_s, r.direct_samples_per_s,
        r.direct_median_samples_per_s, r.ratio, r.rounds, r.median_round_ratio,
        steal_note(r.host_steal_pct)
    );
}

fn print_engine_report(r: &EngineBenchReport) {
    println!(
        "engine [{}] batch {}: submitted {} delivered {} failed {} duplicates {}  {:.3} s  {:.0} samples/s  e2e p50 {:.2} ms p99 {:.2} ms{}",
        r.devices_spec, r.batch, r.submitted, r.delivered, r.failed_permanently, r.duplicates,
        r.wall_s, r.samples_per_s, r.e2e_p50_ms, r.e2e_p99_ms, steal_note(r.host_steal_pct)
    );
    for d in &r.devices {
        println!(
            "  {:8} {:8} batches {:5} samples {:7} ({:5.1}%)  slow {} failures {} retried {} p50 {:.2} ms p99 {:.2} ms",
            d.name, d.state.name(), d.batches, d.samples, d.share * 100.0, d.slow_events,
            d.failures, d.retried, d.p50_ms, d.p99_ms
        );
    }
}
