//! The `fusion-engine` command line: `serve`, `fuse`, `bench`, `devices`, `selftest`,
//! `loadgen`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};

use fusion_engine::backend::{self, Backend, BackendChoice, BackendKind, OpenOptions};
use fusion_engine::batch::Outputs;
use fusion_engine::bench::bench_backend;
use fusion_engine::error::{Error, Result};
use fusion_engine::model::FusionHead;
use fusion_engine::selftest::{run_case, standard_cases};
use fusion_engine::tensor::DType;

#[derive(Parser)]
#[command(
    name = "fusion-engine",
    version,
    about = "GPU-native multi-modal fusion engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the head over WebSocket (docs/PROTOCOL.md) until Ctrl-C / SIGTERM. With no flags:
    /// the embedded head on the best GPU found, else the CPU, on 127.0.0.1:7878.
    Serve {
        /// Config file (TOML; every field optional, see --print-config for all defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Fusion head (.safetensors); the embedded default head when omitted.
        #[arg(long)]
        model: Option<PathBuf>,
        /// WebSocket listen address [default: 127.0.0.1:7878].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Prometheus /metrics and /healthz address, e.g. 127.0.0.1:9898.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Require `Authorization: Bearer TOKEN` at the handshake.
        #[arg(long)]
        token: Option<String>,
        /// Devices, e.g. `cpu`, `cuda:0,cpu` (default: every usable GPU, else the CPU).
        #[arg(long)]
        devices: Option<String>,
        /// Print the effective configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Fuse a features file (one [B, d_m] tensor per modality, optional "mask") into a results
    /// file ("fused" [B, D] and "weights" [B, M], F32).
    Fuse {
        /// Fusion head (.safetensors); the embedded default head when omitted.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Features file (.safetensors).
        #[arg(long)]
        input: PathBuf,
        /// Results file to write (.safetensors); not written on error.
        #[arg(long)]
        output: PathBuf,
        /// auto, cpu, wgpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: BackendChoice,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Time the head on a backend; one line per (batch, dtype) run.
    Bench {
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
        /// Run the whole engine on synthetic load over these devices instead of timing one
        /// backend: a comma list such as `cpu,cpu:delay=50ms`, `cpu:threads=1:fail=0.2`,
        /// `cuda:0,wgpu:0,cpu` (options: threads, delay, jitter, fail, hang, hang_for).
        #[arg(long)]
        devices: Option<String>,
        /// With --devices: samples to submit.
        #[arg(long, default_value_t = 20_000)]
        samples: usize,
        /// With --devices: engine settings file (JSON, the EngineConfig fields); --devices
        /// replaces its device list.
        #[arg(long)]
        engine_config: Option<PathBuf>,
        /// With one device in --devices: instead of the load test, compare the engine with the
        /// same kernel called directly, in one process, alternating segments of --iters batches
        /// (ABBA, 20 segments each); prints both throughputs and their ratio.
        #[arg(long, requires = "devices")]
        overhead: bool,
    },
    /// List devices of every backend and why any is unavailable.
    Devices {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// End-to-end load over WebSocket: a named scenario against a server (in-process when
    /// --url is omitted); reports samples/s, latency per class, drops vs gaps, closes, peak RSS.
    Loadgen {
        /// steady, flood, slow-consumer, slow-device or reconnect.
        #[arg(long, default_value = "steady")]
        scenario: fusion_engine::loadgen::Scenario,
        /// Server URL, e.g. ws://127.0.0.1:7878/ (default: start one in-process).
        #[arg(long)]
        url: Option<String>,
        /// With --url: the server's metrics address (host:port) for RSS and queue depth.
        #[arg(long)]
        metrics: Option<String>,
        /// Seconds of production.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Target samples/s in all (every scenario but flood).
        #[arg(long, default_value_t = fusion_engine::loadgen::DEFAULT_RATE)]
        rate: f64,
        /// Server RSS bound checked in the report, MiB.
        #[arg(long, default_value_t = 1024.0)]
        max_rss_mb: f64,
        /// Fast subscribers (each subscribes to every stream) [default: the scenario's].
        #[arg(long)]
        subscribers: Option<usize>,
        /// Producer connections sharing --rate (each its own stream) [default: the scenario's].
        #[arg(long)]
        producers: Option<usize>,
        /// Devices of the in-process server, e.g. `cpu:threads=1` [default: the scenario's].
        #[arg(long, conflicts_with = "url")]
        devices: Option<String>,
        /// Producers' payload dtype on the wire (f32, f16, bf16).
        #[arg(long, default_value = "f32")]
        dtype: DType,
        /// 1: producers send one produce frame per modality (the aligner joins them); N > 1:
        /// whole samples in `samples` frames of up to N (PROTOCOL 4.4).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
        samples_per_frame: u32,
        /// Subscribers ask for several results per frame (`batch_results`, PROTOCOL 4.5).
        #[arg(long)]
        batch_results: bool,
        /// SVG plot path [default: loadgen-<scenario>.svg].
        #[arg(long)]
        plot: Option<PathBuf>,
        /// One JSON object on stdout instead of text (no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// Ten seconds of the server under synthetic load, with a live view of streams, devices,
    /// queues, drops and latency (periodic lines when stdout is not a terminal).
    Demo {
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Check every available backend against the float64 reference on fresh random inputs.
    Selftest {
        /// auto (every available backend), cpu, wgpu or cuda.
        #[arg(long, default_value = "auto")]
        backend: BackendChoice,
        /// Seed (default: fresh from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// CUDA only: compile every kernel with NVRTC for compute_90 (no GPU needed) and exit.
        #[arg(long)]
        compile_only: bool,
        /// Extra CUDA include folder for --compile-only (else CUDA_HOME, CUDA_PATH, pip wheels).
        #[arg(long, requires = "compile_only")]
        include: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Fuse {
            model,
            input,
            output,
            backend,
            threads,
        } => fuse(model, input, output, backend, threads),
        Cmd::Bench {
            batch,
            dtype,
            model,
            json,
            devices: Some(devices),
            samples,
            engine_config,
            overhead,
            iters,
            ..
        } => engine_bench(
            &devices,
            samples,
            &batch,
            &dtype,
            model,
            engine_config,
            overhead.then_some(iters),
            json,
        ),
        Cmd::Bench {
            backend,
            batch,
            iters,
            warmup,
            dtype,
            model,
            threads,
            json,
            ..
        } => {
            let batch = if batch.is_empty() { vec![1024] } else { batch };
            bench(backend, &batch, iters, warmup, &dtype, model, threads, json)
        }
        Cmd::Devices { json } => devices(json),
        Cmd::Loadgen {
            scenario,
            url,
            metrics,
            duration,
            rate,
            max_rss_mb,
            subscribers,
            producers,
            devices,
            dtype,
            samples_per_frame,
            batch_results,
            plot,
            json,
        } => seconds(duration).and_then(|duration| {
            let opts = fusion_engine::loadgen::Options {
                url,
                metrics,
                duration,
                max_rss_mb,
                progress: !json,
                plot: Some(plot.unwrap_or_else(|| format!("loadgen-{scenario}.svg").into())),
                dtype,
                samples_per_frame: samples_per_frame as usize,
                batch_results,
                ..Default::default()
            };
            let counts = (subscribers, producers);
            loadgen(scenario, opts, rate, counts, devices, json)
        }),
        Cmd::Demo { duration } => seconds(duration).and_then(|d| {
            runtime()?
                .block_on(fusion_engine::demo::run(d))
                .map_err(|e| Error::Config(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }),
        Cmd::Serve {
            config,
            model,
            listen,
            metrics,
            token,
            devices,
            print_config,
        } => fusion_engine::server::serve::run(fusion_engine::server::serve::ServeOptions {
            config,
            model,
            listen,
            metrics,
            token,
            devices,
            print_config,
        })
        .map(|()| ExitCode::SUCCESS),
        Cmd::Selftest {
            backend,
            compile_only: true,
            include,
            ..
        } => compile_check(backend, include),
        Cmd::Selftest {
            backend,
            seed,
            json,
            ..
        } => selftest(backend, seed, json),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_head(model: Option<PathBuf>) -> Result<Arc<FusionHead>> {
    let head = FusionHead::load_or_embedded(model.as_deref())?;
    if model.is_none() {
        eprintln!(
            "note: no --model given: using the embedded default head ({}, D={})",
            head.modalities
                .iter()
                .map(|m| format!("{}={}", m.name, m.width))
                .collect::<Vec<_>>()
                .join(", "),
            head.dim
        );
    }
    Ok(Arc::new(head))
}

fn fuse(
    model: Option<PathBuf>,
    input: PathBuf,
    output: PathBuf,
    choice: BackendChoice,
    threads: Option<usize>,
) -> Result<ExitCode> {
    let head = load_head(model)?;
    let batch = fusion_engine::io::read_input_file(&input, &head)?;
    let opts = OpenOptions {
        threads,
        ..Default::default()
    };
    let mut be = backend::open_choice(choice, head.clone(), &opts)?;
    let mut out = Outputs::zeros(&head, batch.rows);
    let t = Instant::now();
    be.run(&batch.view(), out.as_mut())?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let bytes = fusion_engine::io::output_bytes(&head, batch.rows, &out)?;
    fusion_engine::io::write_atomic(&output, &bytes)?;
    eprintln!(
        "fused {} samples on {} ({}) in {ms:.2} ms -> {}",
        batch.rows,
        be.info().id(),
        be.info().name,
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn bench(
    choice: BackendChoice,
    batches: &[usize],
    iters: usize,
    warmup: usize,
    dtypes: &[DType],
    model: Option<PathBuf>,
    threads: Option<usize>,
    json: bool,
) -> Result<ExitCode> {
    let head = load_head(model)?;
    let opts = OpenOptions {
        threads,
        ..Default::default()
    };
    let mut be = backend::open_choice(choice, head, &opts)?;
    for &b in batches {
        if b == 0 {
            return Err(Error::Config("--batch must be at least 1".into()));
        }
        for &dt in dtypes {
            let r = bench_backend(&mut be, b, dt, iters, warmup)?;
            if json {
                print_json(&r)?;
            } else {
                let proj = match (r.proj_ms_per_batch, r.head_over_proj) {
                    (Some(p), Some(x)) => format!("  proj-only {p:.3} ms (head/proj {x:.2}x)"),
                    _ => String::new(),
                };
                let steal = steal_note(r.host_steal_pct);
                println!(
                    "{:5} {:>6} {:4}  {:9.3} ms/batch (median)  {:12.0} samples/s ({:.0} at the median)  {:7.1} GFLOP/s{proj}  [{}]{steal}",
                    r.backend, r.batch, r.dtype, r.ms_per_batch, r.samples_per_s, r.median_samples_per_s, r.gflops, r.device
                );
                if let Some(s) = &r.stages {
                    println!(
                        "      device: proj {:.3} ms, head {:.3} ms ({:.2}x), {:.0} samples/s; copies: \
                         h2d {:.1} GB/s, d2h {:.1} GB/s; host: stage {:.3} ms, wait {:.3} ms, drain {:.3} ms",
                        s.device_proj_ms,
                        s.device_head_ms,
                        s.device_head_over_proj,
                        s.device_samples_per_s,
                        s.h2d_gbps,
                        s.d2h_gbps,
                        s.host_stage_ms,
                        s.host_wait_ms,
                        s.host_drain_ms
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn engine_bench(
    devices: &str,
    samples: usize,
    batch: &[usize],
    dtypes: &[DType],
    model: Option<PathBuf>,
    engine_config: Option<PathBuf>,
    overhead: Option<usize>,
    json: bool,
) -> Result<ExitCode> {
    use fusion_engine::engine::{bench::EngineBenchOptions, DeviceSpec, EngineConfig};
    let mut cfg: EngineConfig = match &engine_config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            serde_json::from_str(&text)
                .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?
        }
        None => EngineConfig::default(),
    };
    cfg.devices = DeviceSpec::parse_list(devices)?;
    let rows = match batch {
        [] => 256,
        [rows] => *rows,
        _ => return Err(Error::Config("--devices takes one --batch size".into())),
    };
    let opts = EngineBenchOptions {
        samples,
        batch: rows,
        dtype: dtypes.first().copied().unwrap_or(DType::F32),
        ..EngineBenchOptions::default()
    };
    let head = load_head(model)?;
    if let Some(per) = overhead {
        let o = fusion_engine::engine::bench::OverheadOptions {
            batch: rows,
            dtype: opts.dtype,
            rounds: 20,
            batches_per_segment: per,
        };
        let r = fusion_engine::engine::bench::run_overhead_bench(cfg, head, &o)?;
        if json {
            print_json(&r)?;
        } else {
            println!(
                "{} batch {}: engine {:.0} samples/s, direct {:.0} samples/s (median batch {:.0}), engine/direct {:.3} (median of {} rounds {:.3}){}",
                r.device, r.batch, r.engine_samples_per_s, r.direct_samples_per_s,
                r.direct_median_samples_per_s, r.ratio, r.rounds, r.median_round_ratio,
                steal_note(r.host_steal_pct)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let r = fusion_engine::engine::bench::run_engine_bench(cfg, head, &opts)?;
    if json {
        print_json(&r)?;
    } else {
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
    Ok(
        if r.delivered + r.failed_permanently == r.submitted && r.duplicates == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn devices(json: bool) -> Result<ExitCode> {
    let entries = backend::discover();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).map_err(|e| Error::Config(e.to_string()))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    for e in &entries {
        match (&e.device, &e.unavailable) {
            (Some(d), _) => println!("{:8} {}  {}", d.id(), d.name, d.detail),
            (None, Some(r)) => println!("{:8} unavailable: {r}", e.kind),
            (None, None) => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn selftest(choice: BackendChoice, seed: Option<u64>, json: bool) -> Result<ExitCode> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let kinds: Vec<BackendKind> = match choice {
        BackendChoice::Auto => BackendKind::ALL.to_vec(),
        BackendChoice::Kind(k) => vec![k],
    };
    let placeholder = Arc::new(FusionHead::random(&[("x".into(), 4)], 4, 1e-5, 0));
    let mut failed = 0usize;
    let mut ran = 0usize;
    if !json {
        println!("selftest seed {seed}");
    }
    for kind in kinds {
        for entry in backend::discover_kind(kind) {
            let Some(dev) = entry.device else {
                let reason = entry.unavailable.unwrap_or_default();
                if choice == BackendChoice::Kind(kind) {
                    eprintln!("error: backend {kind} unavailable: {reason}");
                    failed += 1;
                } else if !json {
                    println!("{kind:5} skipped: {reason}");
                }
                continue;
            };
            let mut be = backend::open(
                kind,
                dev.index,
                placeholder.clone(),
                &OpenOptions::default(),
            )?;
            for (i, case) in standard_cases().iter().enumerate() {
                let r = run_case(&mut be, case, seed.wrapping_add(i as u64));
                ran += 1;
                if !r.pass {
                    failed += 1;
                }
                if json {
                    print_json(&r)?;
                } else {
                    println!(
                        "{:8} {:20} fused {:9.2e}  weights {:9.2e}  tol {:.0e}  {}{}",
                        r.device,
                        r.case,
                        r.fused_err,
                        r.weights_err,
                        r.tol,
                        if r.pass { "ok" } else { "FAIL" },
                        r.error.map(|e| format!(" ({e})")).unwrap_or_default()
                    );
                }
            }
        }
    }
    if !json {
        println!("{ran} cases run, {failed} failed");
    }
    Ok(if failed == 0 && ran > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `selftest --compile-only`: NVRTC compile check of the CUDA kernels (no GPU needed).
fn compile_check(choice: BackendChoice, include: Option<PathBuf>) -> Result<ExitCode> {
    if !matches!(
        choice,
        BackendChoice::Auto | BackendChoice::Kind(BackendKind::Cuda)
    ) {
        return Err(Error::Config(
            "--compile-only checks the cuda kernels: use --backend cuda".into(),
        ));
    }
    #[cfg(feature = "cuda")]
    {
        let report = fusion_engine::backend::cuda::compile_check(include.as_deref())?;
        println!("{report}");
        Ok(ExitCode::SUCCESS)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = include;
        Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: "not compiled in (build with the `cuda` cargo feature)".into(),
        })
    }
}

fn seconds(s: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Error::Config(format!("a positive number of seconds, got {s}")))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the async runtime: {e}")))
}

fn loadgen(
    scenario: fusion_engine::loadgen::Scenario,
    opts: fusion_engine::loadgen::Options,
    rate: f64,
    (subscribers, producers): (Option<usize>, Option<usize>),
    devices: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(Error::Config(format!(
            "--rate must be positive, got {rate}"
        )));
    }
    let mut plan = scenario.plan(rate);
    if let Some(n) = subscribers {
        if n == 0 {
            return Err(Error::Config("--subscribers must be at least 1".into()));
        }
        plan.set_fast_subscribers(n);
    }
    if let Some(n) = producers {
        if n == 0 {
            return Err(Error::Config("--producers must be at least 1".into()));
        }
        plan.set_producers(n);
    }
    if let Some(d) = devices {
        plan.devices = d;
    }
    let r = runtime()?
        .block_on(fusion_engine::loadgen::run_plan(plan, &opts))
        .map_err(|e| Error::Config(format!("loadgen: {e}")))?;
    if json {
        print_json(&r)?;
    } else {
        print!("{}", r.text());
        if let Some(p) = &opts.plot {
            println!("plot: {}", p.display());
        }
    }
    Ok(if r.checks.values().all(|ok| *ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `  (host steal 12.3%)` when the hypervisor took a visible share of the CPU.
fn steal_note(pct: Option<f64>) -> String {
    match pct {
        Some(p) if p >= 0.5 => format!("  (host steal {p:.1}%)"),
        _ => String::new(),
    }
}

/// Prints one value as a JSON line on stdout.
fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let line = serde_json::to_string(v).map_err(|e| Error::Config(e.to_string()))?;
    println!("{line}");
    Ok(())
}
