//! `fusion-engine loadgen`: its options, and the report on stdout (text, or one JSON object).

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Options, Scenario, DEFAULT_RATE, PRODUCER_SEND_BUFFER};
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::tools::common::{print_json, runtime, seconds};
use crate::tools::in_process::run_plan;

/// End-to-end load over WebSocket: a named scenario against a server (in-process when
/// --url is omitted); reports samples/s, latency per class, drops vs gaps, closes, peak RSS.
#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// steady, flood, slow-consumer, slow-device or reconnect.
    #[arg(long, default_value = "steady")]
    scenario: Scenario,
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
    #[arg(long, default_value_t = DEFAULT_RATE)]
    rate: f64,
    /// Server RSS bound checked in the report, MiB.
    #[arg(long, default_value_t = 1024.0)]
    max_rss_mb: f64,
    /// Fast subscribers (each subscribes to every stream) [default: the scenario's].
    #[arg(long)]
    subscribers: Option<usize>,
    /// The fast subscribers share the producers' streams out between them (subscriber k of n
    /// reads streams k, k + n, ...; at most one per stream) instead of each reading every
    /// stream; the report's results/s is then their sum.
    #[arg(long)]
    split_streams: bool,
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
    /// Subscribers ask for send queues of N results per class (`hello`'s `send_queue`,
    /// PROTOCOL 2; the server caps it at its `max_send_queue`) [default: the server's sizes].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    send_queue: Option<u32>,
    /// Each producer's kernel send buffer, bytes (`SO_SNDBUF`); 0: the kernel's autotuning (up to
    /// 4 MiB). Frames waiting there were built and timestamped but not yet read by the server:
    /// bounded, a producer behind schedule waits before it builds its next frame instead.
    #[arg(long, default_value_t = PRODUCER_SEND_BUFFER)]
    producer_send_buffer: u32,
    /// SVG plot path [default: loadgen-<scenario>.svg].
    #[arg(long)]
    plot: Option<PathBuf>,
    /// One JSON object on stdout instead of text (no progress bar).
    #[arg(long)]
    json: bool,
}

impl LoadgenArgs {
    /// Runs the scenario and reports; fails when one of the report's checks does.
    pub fn run(self) -> Result<ExitCode> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(Error::Config(format!(
                "--rate must be positive, got {}",
                self.rate
            )));
        }
        let mut plan = self.scenario.plan(self.rate);
        if let Some(n) = self.subscribers {
            if n == 0 {
                return Err(Error::Config("--subscribers must be at least 1".into()));
            }
            plan.set_fast_subscribers(n);
        }
        if let Some(n) = self.producers {
            if n == 0 {
                return Err(Error::Config("--producers must be at least 1".into()));
            }
            plan.set_producers(n);
        }
        if self.split_streams {
            let fast = plan.fast_subscribers();
            if fast > plan.producers.len() {
                return Err(Error::Config(format!(
                    "--split-streams: {fast} fast subscribers for {} streams: at most one per stream",
                    plan.producers.len()
                )));
            }
            plan.split_streams = true;
        }
        if let Some(d) = &self.devices {
            plan.devices = d.clone();
        }
        let scenario = self.scenario;
        let opts = Options {
            url: self.url,
            metrics: self.metrics,
            duration: seconds(self.duration)?,
            max_rss_mb: self.max_rss_mb,
            progress: !self.json,
            plot: Some(
                self.plot
                    .unwrap_or_else(|| format!("loadgen-{scenario}.svg").into()),
            ),
            dtype: self.dtype,
            samples_per_frame: self.samples_per_frame as usize,
            batch_results: self.batch_results,
            send_queue: self.send_queue.map(|n| n as usize),
            producer_send_buffer: (self.producer_send_buffer > 0)
                .then_some(self.producer_send_buffer),
            ..Default::default()
        };
        let r = runtime()?
            .block_on(run_plan(plan, &opts))
            .map_err(|e| Error::Tool(format!("loadgen: {e}")))?;
        if self.json {
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
}
