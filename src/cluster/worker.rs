//! `fusion-engine worker --nats URL` (docs/DESIGN.md section 11): a device host. It pulls
//! batches from the work-queue stream through the shared durable consumer of each class,
//! CRITICAL first (a class is fetched only when every higher class had nothing), runs them on
//! its local [`Engine`], publishes the results with the batch id as `Nats-Msg-Id`, and acks a
//! batch only once that publish is acknowledged by JetStream. A worker that dies leaves its
//! unacked batches to be redelivered to another after `ack_wait`.
//!
//! A batch whose head fingerprint differs from this worker's is refused with an error log line
//! and a NAK delayed by [`REFUSE_DELAY`], so that a compatible worker can take it; when no
//! worker is compatible, the gateway's producers get `timeout` after its result timeout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, consumer::PullConsumer, message::PublishMessage, AckKind, Message,
};
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::fingerprint::{fingerprint, hex};
use super::metrics::{class_label, serve_worker_metrics};
use super::streams::{
    class_consumer, connect, ensure_streams, NatsAccess, HEARTBEAT_EVERY, WORKER_HEARTBEAT,
};
use super::wire::{Computed, Rows, WireBatch, WireResult};
use crate::batch::Batch;
use crate::engine::{DeviceSpec, Engine, EngineConfig, Priority};
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// How long a refused batch (other head) waits before it is offered again.
pub const REFUSE_DELAY: Duration = Duration::from_secs(1);
/// The longest wait for a fetch request's answer (the server answers at once: no_wait).
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Fetch rounds that took CRITICAL work before one starts at the lower classes.
const AGED_SHARE: u32 = 4;
/// How long a batch the engine had no room for waits before it is offered again.
const BUSY_DELAY: Duration = Duration::from_millis(50);

/// Run a GPU worker: pull batches from NATS JetStream, run them, publish the results.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// NATS server, e.g. nats://127.0.0.1:4222 (JetStream enabled: `nats-server -js`).
    #[arg(long, value_name = "URL")]
    pub nats: String,
    /// PEM CA certificate of the NATS server's TLS certificate (TLS is then required).
    #[arg(long, value_name = "CA.pem")]
    pub nats_tls_ca: Option<PathBuf>,
    /// NATS credentials file (`.creds`: user JWT and NKey seed).
    #[arg(long, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// Devices, e.g. `cpu`, `cuda:0,cpu`, `cpu:threads=1` (default: every usable GPU, else the CPU).
    #[arg(long)]
    pub devices: Option<String>,
    /// Fusion head (.safetensors); the embedded default head when omitted. Must be the
    /// gateway's (same fingerprint).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Batches pulled and not yet acked by this worker [default: what its devices hold in
    /// flight: devices x the engine's per-device max_in_flight (4)].
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// Seconds before an unacked batch (a dead worker's) is redelivered.
    #[arg(long, default_value_t = 10.0)]
    pub ack_wait: f64,
    /// This worker's name in results and logs [default: worker-PID].
    #[arg(long)]
    pub name: Option<String>,
    /// Prometheus `/metrics` (and `/healthz`) address of this worker, e.g. 127.0.0.1:9899.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

struct Ctx {
    js: jetstream::Context,
    engine: Engine,
    fingerprint: u64,
    name: String,
    permits: Arc<Semaphore>,
}

impl WorkerArgs {
    /// Runs until Ctrl-C / SIGTERM.
    pub fn run(self) -> Result<ExitCode> {
        let head = Arc::new(FusionHead::load_or_embedded(self.model.as_deref())?);
        let mut ecfg = EngineConfig::default();
        if let Some(d) = &self.devices {
            ecfg.devices = DeviceSpec::parse_list(d)?;
        }
        if !(self.ack_wait.is_finite() && self.ack_wait > 0.0) || self.max_in_flight == Some(0) {
            return Err(Error::Config(
                "--ack-wait and --max-in-flight must be > 0".into(),
            ));
        }
        let rt = crate::server::serve::runtime("fusion-worker")?;
        rt.block_on(async move {
            // NATS first: an unreachable server fails before any device opens.
            let access = NatsAccess {
                url: self.nats.clone(),
                tls_ca: self.nats_tls_ca.clone(),
                creds: self.nats_creds.clone(),
            };
            let (client, js) = connect(&access).await?;
            let batches = ensure_streams(&js, 1 << 30).await?;
            let ack_wait = Duration::from_secs_f64(self.ack_wait);
            let mut consumers = Vec::new();
            for p in Priority::ALL {
                consumers.push(class_consumer(&batches, p, ack_wait, 10_000).await?);
            }
            let h = Arc::clone(&head);
            let per_device = ecfg.max_in_flight;
            let engine = tokio::task::spawn_blocking(move || Engine::start(ecfg, h))
                .await
                .map_err(|e| Error::Runtime(format!("engine start task failed: {e}")))??;
            let name = self
                .name
                .unwrap_or_else(|| format!("worker-{}", std::process::id()));
            let fp = fingerprint(&head);
            // Fetch no more than the devices can hold in flight: a slow worker takes few batches.
            let in_flight = self
                .max_in_flight
                .unwrap_or(engine.device_names().len() * per_device)
                .max(1);
            if let Some(addr) = self.metrics_listen {
                let bound = serve_worker_metrics(addr).await?;
                eprintln!("metrics: http://{bound}/metrics");
            }
            // Announce the head: the gateway's /healthz counts the compatible workers.
            let beat = format!("{name} {}", hex(fp));
            tokio::spawn(async move {
                loop {
                    let _ = client.publish(WORKER_HEARTBEAT, beat.clone().into()).await;
                    tokio::time::sleep(HEARTBEAT_EVERY).await;
                }
            });
            eprintln!(
                "fusion-engine worker {name} on {} with {}; head fingerprint {}",
                self.nats,
                engine.device_names().join(", "),
                hex(fp)
            );
            let ctx = Arc::new(Ctx {
                js,
                engine,
                fingerprint: fp,
                name,
                permits: Arc::new(Semaphore::new(in_flight)),
            });
            tokio::select! {
                _ = pull_loop(Arc::clone(&ctx), consumers) => {}
                _ = crate::server::shutdown_signal() => eprintln!("worker stopping"),
            }
            Ok(ExitCode::SUCCESS)
        })
    }
}

/// Fetches up to the free in-flight slots, highest class first, and runs each batch in a task.
/// One fetch round in [`AGED_SHARE`] (when CRITICAL work was taken in the others) starts at the
/// lower classes, one batch, oldest class first (IMPORTANT, then BULK): the local engine's
/// guaranteed share for waiting lower-class work (docs/DESIGN.md section 11).
async fn pull_loop(ctx: Arc<Ctx>, consumers: Vec<PullConsumer>) {
    let mut strict = 0u32;
    loop {
        let Ok(first) = Arc::clone(&ctx.permits).acquire_owned().await else {
            return;
        };
        let mut first = Some(first);
        let mut got = 0usize;
        let share = strict + 1 >= AGED_SHARE;
        let order: [usize; 3] = if share { [1, 2, 0] } else { [0, 1, 2] };
        for (n, c) in order.iter().map(|i| &consumers[*i]).enumerate() {
            let free = ctx.permits.available_permits() + usize::from(first.is_some());
            let want = if share && n < 2 { 1 } else { free };
            // A fetch whose request or answer was lost (NATS restarting) would wait forever:
            // each step is bounded; what a dropped fetch was sent is redelivered after ack_wait.
            let fetch = c.fetch().max_messages(want).messages();
            let mut msgs = match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    tracing::warn!("worker {}: fetch failed: {e}", ctx.name);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                Err(_) => {
                    tracing::warn!("worker {}: fetch timed out (NATS away?)", ctx.name);
                    break;
                }
            };
            loop {
                let m = match tokio::time::timeout(FETCH_TIMEOUT, msgs.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(_) => {
                        tracing::warn!("worker {}: fetch answer timed out (NATS away?)", ctx.name);
                        break;
                    }
                };
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("worker {}: fetch: {e}", ctx.name);
                        break;
                    }
                };
                let permit = match first.take() {
                    Some(p) => p,
                    None => match Arc::clone(&ctx.permits).acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                got += 1;
                tokio::spawn(handle(Arc::clone(&ctx), m, permit));
            }
            if got > 0 {
                // Something taken: look at CRITICAL again before a lower class.
                strict = if share || order[n] != 0 {
                    0
                } else {
                    strict + 1
                };
                break;
            }
        }
        drop(first);
        if got == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Runs one batch and publishes its result; acks only after the publish is acknowledged.
async fn handle(ctx: Arc<Ctx>, msg: Message, _permit: OwnedSemaphorePermit) {
    let wb = match WireBatch::decode(&msg.payload) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("worker {}: dropping an undecodable batch: {e}", ctx.name);
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    metrics::counter!("fusion_worker_batches_pulled_total", "class" => class_label(wb.priority))
        .increment(1);
    if msg.info().is_ok_and(|i| i.delivered > 1) {
        metrics::counter!("fusion_worker_redelivered_total").increment(1);
    }
    if wb.fingerprint != ctx.fingerprint {
        metrics::counter!("fusion_worker_refused_total").increment(1);
        tracing::error!(
            "worker {}: refusing batch {}: its head fingerprint {} is not this worker's {} \
             (start the worker with the gateway's --model)",
            ctx.name,
            wb.id,
            hex(wb.fingerprint),
            hex(ctx.fingerprint)
        );
        let _ = msg.ack_with(AckKind::Nak(Some(REFUSE_DELAY))).await;
        return;
    }
    let rows = wb.streams.len();
    // A version-2 batch's rows go back with its result (a restarted gateway fans them out).
    let echo = (wb.version >= 2).then(|| Rows {
        streams: wb.streams,
        keys: wb.keys,
        priorities: wb.priorities,
        mask: wb.mask.clone(),
    });
    let batch = Batch {
        rows,
        inputs: wb.inputs,
        mask: wb.mask,
    };
    let outcome = match ctx.engine.submit(batch, wb.priority) {
        Ok(ticket) => ticket.await,
        Err(e) => Err(e),
    };
    if let Err(Error::Overloaded(_)) = &outcome {
        metrics::counter!("fusion_worker_busy_naks_total").increment(1);
        let _ = msg.ack_with(AckKind::Nak(Some(BUSY_DELAY))).await;
        return;
    }
    let res = WireResult {
        id: wb.id.clone(),
        outcome: outcome
            .map(|r| Computed {
                outputs: r.outputs,
                device: format!("{}/{}", ctx.name, r.device),
                retries: r.retries,
                device_time: r.device_time,
            })
            .map_err(|e| (e.code().to_string(), e.to_string())),
        rows: echo,
    };
    let payload = res.encode();
    if let Ok(c) = res.outcome {
        ctx.engine.recycle(c.outputs);
    }
    let publish = PublishMessage::build()
        .payload(payload.into())
        .message_id(&wb.id);
    let sent = Instant::now();
    let stored = match ctx.js.send_publish(wb.reply, publish).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(()) => {
            metrics::histogram!("fusion_worker_publish_seconds").record(sent.elapsed());
            metrics::counter!("fusion_worker_results_published_total").increment(1);
            if let Err(e) = msg.ack().await {
                tracing::warn!("worker {}: ack of {} failed: {e}", ctx.name, wb.id);
            }
        }
        Err(e) => {
            tracing::warn!("worker {}: results of {} not stored: {e}", ctx.name, wb.id);
            let _ = msg.ack_with(AckKind::Nak(None)).await;
        }
    }
}
