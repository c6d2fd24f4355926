//! `fusion-engine demo`: the server in-process with the embedded head on two CPU devices (one
//! with 30 ms of injected latency per batch), three producer streams of mixed classes, one fast
//! and one slow subscriber (10 messages/s), and a live view redrawn 5 times a second: streams,
//! devices (state, queue, batches), per-class queues, drops and latency. When stdout is not a
//! terminal it prints one line per second instead. Ends with the load generator's summary.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::tools::common::{runtime, seconds};
use crate::tools::in_process::start_server;
use crate::tools::loadgen::scrape::{parse, Scrape};
use crate::tools::loadgen::stats::{now_us, percentile_ms, Live, Role, SharedLive, CLASSES};
use crate::tools::loadgen::{drive, prometheus, LoadgenError, Options, Plan};

/// Devices of the demo: a plain CPU device and one with injected latency.
pub const DEMO_DEVICES: &str = "cpu,cpu:delay=30ms";

/// Ten seconds of the server under synthetic load, with a live view of streams, devices,
/// queues, drops and latency (periodic lines when stdout is not a terminal).
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
}

impl DemoArgs {
    /// Runs the command.
    pub fn run(self) -> Result<std::process::ExitCode> {
        let d = seconds(self.duration)?;
        runtime()?
            .block_on(run_demo(d))
            .map_err(|e| Error::Tool(format!("demo: {e}")))?;
        Ok(std::process::ExitCode::SUCCESS)
    }
}

/// Runs the demo for `duration`.
pub async fn run_demo(duration: Duration) -> std::result::Result<(), LoadgenError> {
    let plan = Plan {
        name: "demo".into(),
        producers: vec![Some(800.0), Some(600.0), Some(400.0)],
        subscribers: vec![Role::Fast, Role::Slow { per_s: 10.0 }],
        devices: DEMO_DEVICES.into(),
    };
    let (server, url, metrics) = start_server(&plan.devices).await?;
    let tty = std::io::stdout().is_terminal();
    println!(
        "fusion-engine demo: server {url} on {}; producers {} streams (10% critical, 30% important, 60% bulk); subscribers: 1 fast, 1 slow (10 msg/s)",
        server.engine().device_names().join(", "),
        plan.producers.len()
    );
    let live: SharedLive = Arc::default();
    let opts = Options {
        duration,
        metrics: metrics.clone(),
        ..Options::default()
    };
    let engine = Arc::clone(server.engine());
    let t0 = now_us();
    let run = drive(&plan, &opts, &url, metrics, Some(Arc::clone(&live)));
    tokio::pin!(run);
    let mut tick = tokio::time::interval(Duration::from_millis(if tty { 200 } else { 1000 }));
    let mut drawn = 0;
    let report = loop {
        tokio::select! {
            r = &mut run => break r,
            _ = tick.tick() => {
                let s = prometheus().map(|p| parse(&p.render(), 0)).unwrap_or_default();
                let t = now_us().saturating_sub(t0) as f64 / 1e6;
                let lines = view(t, &engine, &s, &live.lock());
                if tty {
                    // Move back over the previous frame and clear below.
                    let mut out = std::io::stdout().lock();
                    if drawn > 0 {
                        let _ = write!(out, "\x1b[{drawn}F\x1b[J");
                    }
                    for l in &lines {
                        let _ = writeln!(out, "{l}");
                    }
                    let _ = out.flush();
                    drawn = lines.len();
                } else {
                    println!("{}", lines.join(" | "));
                }
            }
        }
    };
    drop(engine);
    server.shutdown().await;
    let r = report?;
    println!("\nsummary:\n{}", r.text());
    Ok(())
}

/// One frame of the live view.
fn view(t: f64, engine: &Engine, s: &Scrape, live: &Live) -> Vec<String> {
    let mut lines = vec![format!("t = {t:5.1} s")];
    let streams: Vec<String> = live
        .per_stream
        .iter()
        .map(|(k, n)| format!("{k}: {n} results"))
        .collect();
    lines.push(format!("streams   {}", streams.join("   ")));
    let devices: Vec<String> = engine
        .stats()
        .devices
        .iter()
        .map(|d| {
            format!(
                "{} {} queue {} in-flight {} batches {} ({:.3} ms/sample)",
                d.name,
                d.state.name(),
                d.queued,
                d.in_flight,
                d.batches,
                d.ms_per_sample.unwrap_or(f64::NAN)
            )
        })
        .collect();
    lines.push(format!("devices   {}", devices.join(" | ")));
    lines.push(format!(
        "queues    control {} critical {} important {} bulk {} (all connections)",
        s.queue[0], s.queue[1], s.queue[2], s.queue[3]
    ));
    lines.push(format!(
        "drops     critical {} important {} bulk {}; 1013 closes {}; open samples {}",
        s.dropped[1], s.dropped[2], s.dropped[3], s.overload_closes, s.open_samples
    ));
    let lat: Vec<String> = (0..3)
        .map(|c| {
            let mut v: Vec<u32> = live.recent[c].iter().copied().collect();
            v.sort_unstable();
            let f = |q| percentile_ms(&v, q).map_or("-".into(), |x| format!("{x:.1}"));
            format!("{} p50 {} p99 {} ms", CLASSES[c], f(0.5), f(0.99))
        })
        .collect();
    lines.push(format!("latency   {} (fast subscriber)", lat.join(" | ")));
    lines
}
