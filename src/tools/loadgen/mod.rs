//! End-to-end load generator over loopback WebSocket (`fusion-engine loadgen`, docs/DESIGN.md section 9):
//! named [`Scenario`]s of producers and subscribers against a server (in-process, or one at
//! `--url`), reporting samples/s, produce-to-result latency per class, announced drops against
//! the gaps actually seen, closes, and the server's peak RSS scraped from its `/metrics`.
//!
//! - [`scenario`]: the scenarios and their [`Plan`]s; `producer`, `subscriber`, `conn`: the
//!   connections; [`scrape`]: the `/metrics` timeline; [`stats`]: gap and latency arithmetic;
//!   [`report`]: the [`Report`]; `summary`: its acceptance checks and text; `plot`: the SVG.

pub mod cli;
mod conn;
mod frames;
mod options;
pub(crate) mod plot;
mod producer;
mod raw_sink;
pub mod report;
pub mod scenario;
pub mod scrape;
pub mod stats;
mod subscriber;
mod summary;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use options::{LoadgenError, Options, PRODUCER_SEND_BUFFER};
pub use report::Report;
pub use scenario::{Plan, Scenario};

use crate::client::Client;
use crate::tensor::DType;

/// Default target rate, samples/s in all.
pub const DEFAULT_RATE: f64 = 2000.0;

/// The process-wide Prometheus recorder (installed once; `None` when another recorder was
/// installed first).
pub fn prometheus() -> Option<PrometheusHandle> {
    static H: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    H.get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .clone()
}

/// Synthetic features for every modality the server's head has, little-endian `dtype`.
/// Also returns the server's `send_timeout` in seconds.
async fn payloads(
    url: &str,
    dtype: DType,
) -> Result<(Arc<Vec<(String, Vec<u8>)>>, Option<f64>), LoadgenError> {
    let c = Client::connect(url, None)
        .await
        .map_err(|e| LoadgenError::Connect(e.to_string()))?;
    let mods = c
        .welcome()
        .modalities
        .iter()
        .enumerate()
        .map(|(m, (name, width))| {
            let x: Vec<f32> = (0..*width)
                .map(|i| ((i * 7 + m * 13) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let bytes = match dtype {
                DType::F32 => bytemuck::cast_slice(&x).to_vec(),
                DType::F16 => x
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                DType::BF16 => x
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            (name.clone(), bytes)
        })
        .collect();
    let send_timeout = c.welcome().raw["limits"]["send_timeout_ms"]
        .as_f64()
        .map(|ms| ms / 1000.0);
    c.close().await;
    Ok((Arc::new(mods), send_timeout))
}

/// Runs `plan` against the server at `url` (`metrics`: its `/metrics` address); the first
/// subscriber feeds `live` when given.
pub async fn drive(
    plan: &Plan,
    o: &Options,
    url: &str,
    metrics: Option<String>,
    live: Option<stats::SharedLive>,
) -> Result<Report, LoadgenError> {
    let (mods, send_timeout_s) = payloads(url, o.dtype).await?;
    let streams = plan.streams();
    let t0 = stats::now_us();
    let (probe_tx, probe_rx) = watch::channel(0u64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (latest_tx, latest) = watch::channel(None);
    let has_metrics = metrics.is_some();
    // `probe_tx` lives to the end of the run even without a scraper: a dropped sender would
    // make every subscriber's `probe.changed()` return at once, forever, and the slow and
    // stalled subscribers would keep reading instead of stalling.
    let scraper = metrics.map(|m| {
        tokio::spawn(scrape::scrape_loop(
            m,
            o.scrape_every,
            t0,
            probe_tx.clone(),
            latest_tx,
            stop_rx.clone(),
        ))
    });
    let (drain_tx, drain_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel(plan.subscribers.len().max(1));
    let mut subs = Vec::new();
    for (id, role) in plan.subscribers.iter().enumerate() {
        subs.push(tokio::spawn(subscriber::run_subscriber(
            subscriber::SubscriberCfg {
                id,
                role: *role,
                url: url.to_string(),
                streams: plan.subscriber_streams(id),
                t0_us: t0,
                ready: ready_tx.clone(),
                drain: drain_rx.clone(),
                probe: probe_rx.clone(),
                live: if id == 0 { live.clone() } else { None },
                batch_results: o.batch_results,
                send_queue: o.send_queue,
                close_check_every: (!has_metrics)
                    .then(|| Duration::from_secs_f64(send_timeout_s.unwrap_or(5.0) + 2.0)),
            },
        )));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < subs.len() {
        match tokio::time::timeout(Duration::from_secs(15), ready_rx.recv()).await {
            Ok(Some(())) => ready += 1,
            _ => {
                return Err(LoadgenError::Timeout(
                    "subscribers did not subscribe".into(),
                ))
            }
        }
    }
    let steal = crate::tools::steal::StealMeter::start();
    let cpu = crate::tools::steal::CpuMeter::start();
    let start = Instant::now();
    let until = start + o.duration;
    let mut prods = Vec::new();
    for (p, rate) in plan.producers.iter().enumerate() {
        prods.push(tokio::spawn(producer::run_producer(
            producer::ProducerCfg {
                url: url.to_string(),
                stream: streams[p].clone(),
                rate: *rate,
                until,
                dtype: o.dtype,
                mods: Arc::clone(&mods),
                samples_per_frame: o.samples_per_frame.max(1),
                send_buffer: o.producer_send_buffer,
            },
        )));
    }
    let bar = progress_bar(o, &plan.name);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(b) = &bar {
            b.set_position(start.elapsed().as_millis() as u64);
        }
    }
    if let Some(b) = &bar {
        b.set_message("draining");
    }
    let mut producers = Vec::new();
    for (p, h) in prods.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(60), h).await {
            Ok(Ok(Ok(mut r))) => {
                r.stream = streams[p].clone();
                producers.push(r);
            }
            Ok(Ok(Err(e))) => return Err(e),
            _ => return Err(LoadgenError::Timeout(format!("producer {p}"))),
        }
    }
    let produced_s = start.elapsed().as_secs_f64();
    let host_steal_pct = steal.percent();
    // Only meaningful when the server runs in this process (no --url).
    let process_cpu_s = cpu.seconds().filter(|_| o.url.is_none());
    // Wait until the server's pipeline is empty (aligner, engine, devices: three scrapes in a
    // row, 120 s at most), so every accepted sample has its result queued; without metrics,
    // a fixed 300 ms. Then every subscriber reads what is left.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if has_metrics {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut calm = 0;
        while calm < 3 && Instant::now() < deadline {
            tokio::time::sleep(o.scrape_every).await;
            let idle = latest
                .borrow()
                .as_ref()
                .is_some_and(scrape::Scrape::pipeline_idle);
            calm = if idle { calm + 1 } else { 0 };
        }
    }
    let _ = drain_tx.send(true);
    let mut records = Vec::new();
    for (i, h) in subs.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(90), h).await {
            Ok(Ok(Ok(r))) => records.push(r),
            Ok(Ok(Err(e))) => return Err(e),
            _ => return Err(LoadgenError::Timeout(format!("subscriber {i}"))),
        }
    }
    let _ = stop_tx.send(true);
    let (scrapes, scrape_failures) = match scraper {
        Some(h) => h.await.unwrap_or_default(),
        None => (Vec::new(), 0),
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut report = report::build(report::Inputs {
        plan,
        options: o,
        produced_s,
        host_steal_pct,
        process_cpu_s,
        producers,
        records,
        scrapes,
        scrape_failures,
        send_timeout_s,
    });
    report.checks = summary::checks(&report, plan);
    Ok(report)
}

fn progress_bar(o: &Options, name: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !o.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(o.duration.as_millis() as u64);
    let style =
        indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {elapsed}/{duration} {msg}")
            .map(|s| s.progress_chars("=> "));
    if let Ok(s) = style {
        b.set_style(s);
    }
    b.set_prefix(format!("loadgen {name}"));
    Some(b)
}
