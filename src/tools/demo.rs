//! `fusion-engine demo`: the server in-process with the embedded head on two CPU devices (one
//! with 30 ms of injected latency per batch), three producer streams of mixed classes, one fast
//! and one slow subscriber (10 messages/s), and a live view redrawn 5 times a second: streams,
//! devices (state, queue, batches), per-class queues, drops and latency. When stdout is not a
//! terminal it prints one line per second instead. Ends with the load generator's summary.
//! The server's status page (docs/DESIGN.md section 8) is on its metrics address; its URL is
//! printed first. Log events (a device state change, say) are drawn in the view as its last
//! lines instead of being written over it ([`Events`]).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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
    /// Runs the command. Installs the process's tracing subscriber (filter `RUST_LOG`, default
    /// warnings and device state changes), which feeds the view's events instead of stderr.
    pub fn run(self) -> Result<std::process::ExitCode> {
        let d = seconds(self.duration)?;
        let events = Events::default();
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("warn,fusion_engine::engine::core=info"));
        // Fails only when a subscriber is already set (then its output stays where it was).
        let _ = tracing_subscriber::registry()
            .with(events.clone().with_filter(filter))
            .try_init();
        runtime()?
            .block_on(run_demo_with(d, events))
            .map_err(|e| Error::Tool(format!("demo: {e}")))?;
        Ok(std::process::ExitCode::SUCCESS)
    }
}

/// Runs the demo for `duration` (no log events in the view: see [`run_demo_with`]).
pub async fn run_demo(duration: Duration) -> std::result::Result<(), LoadgenError> {
    run_demo_with(duration, Events::default()).await
}

/// Runs the demo for `duration`, drawing `events` (fed by the tracing layer) in the view.
pub async fn run_demo_with(
    duration: Duration,
    events: Events,
) -> std::result::Result<(), LoadgenError> {
    let plan = Plan {
        name: "demo".into(),
        producers: vec![Some(800.0), Some(600.0), Some(400.0)],
        subscribers: vec![Role::Fast, Role::Slow { per_s: 10.0 }],
        split_streams: false,
        devices: DEMO_DEVICES.into(),
    };
    let (server, url, metrics) = start_server(&plan.devices).await?;
    let tty = std::io::stdout().is_terminal();
    println!(
        "fusion-engine demo: server {url} on {}; producers {} streams (10% critical, 30% important, 60% bulk); subscribers: 1 fast, 1 slow (10 msg/s)",
        server.engine().device_names().join(", "),
        plan.producers.len()
    );
    if let Some(m) = &metrics {
        println!("status page: http://{m}/ (live in a browser; JSON at http://{m}/status.json)");
    }
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
                let mut lines = view(t, &engine, &s, &live.lock());
                if tty {
                    // Cut to one terminal row, so that the redraw's line count holds.
                    lines.extend(events.recent(EVENT_LINES).into_iter().map(|e| {
                        format!("event     {}", e.chars().take(EVENT_WIDTH).collect::<String>())
                    }));
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
                    for e in events.take_new() {
                        println!("event {e}");
                    }
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
                "{} {} queue {} in-flight {} batches {} ({} ms/sample)",
                d.name,
                d.state.name(),
                d.queued,
                d.in_flight,
                d.batches,
                d.ms_per_sample.map_or("-".into(), |x| format!("{x:.3}"))
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

/// How many recent events the live view shows.
const EVENT_LINES: usize = 5;
/// Characters of an event shown in the live view.
const EVENT_WIDTH: usize = 110;
/// How many events are kept.
const EVENT_KEEP: usize = 100;

/// Recent log events as text, fed by this tracing [`Layer`] and drawn by the view.
#[derive(Clone, Default)]
pub struct Events {
    inner: Arc<Mutex<EventRing>>,
}

#[derive(Default)]
struct EventRing {
    lines: VecDeque<String>,
    /// Events not yet printed by the line-per-second view.
    unseen: usize,
}

impl Events {
    /// Adds one event line (the oldest goes beyond [`EVENT_KEEP`]).
    pub fn push(&self, line: String) {
        let mut g = self.inner.lock();
        if g.lines.len() == EVENT_KEEP {
            g.lines.pop_front();
        }
        g.lines.push_back(line);
        g.unseen = (g.unseen + 1).min(EVENT_KEEP);
    }

    /// The last `n` events, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let g = self.inner.lock();
        g.lines
            .iter()
            .skip(g.lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The events not returned by an earlier call, oldest first.
    pub fn take_new(&self) -> Vec<String> {
        let mut g = self.inner.lock();
        let n = std::mem::take(&mut g.unseen);
        g.lines
            .iter()
            .skip(g.lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

impl<S: tracing::Subscriber> Layer<S> for Events {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let clock = clock();
        let meta = event.metadata();
        self.push(format!(
            "{clock} {:5} {}{}",
            meta.level(),
            f.message,
            f.rest
        ));
    }
}

/// Seconds since the Unix epoch modulo a day, as `HH:MM:SS` (UTC), without a date library.
fn clock() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// An event's message and its other fields as ` key=value`.
#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.rest, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_ring_and_layer() {
        let events = Events::default();
        let sub = tracing_subscriber::registry().with(events.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(device = %"cpu:1", from = "HEALTHY", to = "SLOW", "device state change");
        });
        let got = events.recent(5);
        assert_eq!(got.len(), 1);
        assert!(
            got[0].ends_with("WARN  device state change device=cpu:1 from=HEALTHY to=SLOW"),
            "{got:?}"
        );
        assert_eq!(events.take_new(), got);
        assert!(events.take_new().is_empty());
        for i in 0..EVENT_KEEP + 5 {
            events.push(format!("e{i}"));
        }
        assert_eq!(
            events.recent(2),
            vec![
                format!("e{}", EVENT_KEEP + 3),
                format!("e{}", EVENT_KEEP + 4)
            ]
        );
        assert_eq!(events.take_new().len(), EVENT_KEEP);
    }

    #[test]
    fn view_before_the_first_batch_has_no_nan() {
        use crate::engine::{DeviceSpec, EngineConfig};
        let cfg = EngineConfig::with_devices(DeviceSpec::parse_list("cpu:threads=1").unwrap());
        let engine = Engine::start(cfg, Arc::new(crate::model::FusionHead::embedded())).unwrap();
        let lines = view(0.0, &engine, &Scrape::default(), &Live::default());
        let text = lines.join("\n");
        assert!(!text.contains("NaN"), "{text}");
        assert!(text.contains("batches 0 (- ms/sample)"), "{text}");
        engine.shutdown(Duration::from_secs(1));
    }
}
