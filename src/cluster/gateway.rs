//! `serve --nats` (docs/DESIGN.md section 11): the server's batches go to the JetStream
//! work-queue stream instead of the local engine, and each batch's results come back on this
//! gateway id's results subject. A batch id is delivered at most once: the first result for an
//! id completes its waiting batch, any later copy (a batch computed twice after a redelivery)
//! finds no waiter and is dropped and counted. Each batch's results are also shared with the
//! other gateways ([`super::share`]); the results of batches an earlier process with the same
//! id published are fanned out to their streams' subscribers ([`super::inbox`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::fingerprint::{fingerprint, hex};
use super::identity::{announce, incarnation, random_id, validate_id, Twins};
use super::inbox::{Inbox, Waiters};
use super::metrics::class_label;
use super::share::{Share, Sink};
use super::streams::{
    batch_subject, connect, ensure_streams, nats_err, result_subject, NatsAccess, HEARTBEAT_EVERY,
    WORKER_HEARTBEAT,
};
use super::wire::{Rows, WireBatch};
use crate::batch::Batch;
use crate::engine::{BatchResult, Priority};
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// Worker name -> (its head fingerprint, when its last heartbeat came).
type Workers = Mutex<HashMap<String, (u64, Instant)>>;

/// The gateway's side of the cluster: cheap to share (`Arc`).
pub struct Gateway {
    client: async_nats::Client,
    url: String,
    js: jetstream::Context,
    id: String,
    /// `<id>.<incarnation>.`: the prefix of this process's batch ids.
    prefix: String,
    reply: String,
    fingerprint: u64,
    seq: AtomicU64,
    waiters: Arc<Waiters>,
    duplicates: Arc<AtomicU64>,
    workers: Arc<Workers>,
    timeout: Duration,
    /// `(D, M)` of the head: a result of another shape is refused, never fanned out.
    shape: (usize, usize),
    share: Arc<Share>,
    /// Another live gateway heard with this id (a misconfiguration `/healthz` reports).
    twins: Arc<Twins>,
    /// Started by [`Gateway::attach`], once the server can fan out.
    inbox: Mutex<Option<Inbox>>,
}

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `nats://HOST:PORT`, TLS CA and credentials.
    pub nats: NatsAccess,
    /// How long a batch may wait for its results before its producers get `timeout`.
    pub result_timeout: Duration,
    /// The batch stream's bound (`discard: new` beyond it: producers get `overloaded`).
    pub max_bytes: i64,
    /// The stable gateway id (`serve --gateway-id`): a gateway restarted with the same id
    /// fans out the results of the batches its earlier process published. None: a fresh id
    /// each start (no such pick-up).
    pub id: Option<String>,
}

impl GatewayConfig {
    /// Defaults for `url`: 60 s result timeout, 1 GiB of queued batches.
    pub fn new(url: &str) -> GatewayConfig {
        GatewayConfig {
            nats: NatsAccess::plain(url),
            result_timeout: Duration::from_secs(60),
            max_bytes: 1 << 30,
            id: None,
        }
    }
}

impl Gateway {
    /// Connects, creates the streams and this gateway id's results consumer when needed. The
    /// results are read once [`Gateway::attach`] gives the gateway its fan-out.
    /// The NATS server's `max_payload`: the largest batch message it stores.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    pub async fn connect(cfg: &GatewayConfig, head: &FusionHead) -> Result<Gateway> {
        let id = match &cfg.id {
            Some(id) => {
                validate_id(id)?;
                id.clone()
            }
            None => random_id(),
        };
        let (client, js) = connect(&cfg.nats).await?;
        ensure_streams(&js, cfg.max_bytes).await?;
        let inc = incarnation();
        let prefix = format!("{id}.{inc}.");
        let reply = result_subject(&id);
        let fp = fingerprint(head);
        let shape = (head.dim, head.num_modalities());
        let share = Arc::new(Share::new(js.clone(), &id, fp, shape));
        let waiters: Arc<Waiters> = Arc::default();
        let duplicates = Arc::new(AtomicU64::new(0));
        let inbox = Inbox::open(&js, &id, &prefix, &waiters, &duplicates, &share).await?;
        let twins = announce(&client, &id, &inc).await?;
        let mut beats = client
            .subscribe(WORKER_HEARTBEAT)
            .await
            .map_err(|e| Error::Config(format!("NATS at {}: subscribe: {e}", cfg.nats.url)))?;
        let workers: Arc<Workers> = Arc::default();
        let w = Arc::clone(&workers);
        tokio::spawn(async move {
            while let Some(msg) = beats.next().await {
                heartbeat(&w, &msg.payload);
            }
        });
        tracing::info!(gateway = %id, fingerprint = %hex(fp), url = %cfg.nats.url, "NATS gateway up");
        Ok(Gateway {
            client,
            url: cfg.nats.url.clone(),
            js,
            id,
            prefix,
            reply,
            fingerprint: fp,
            seq: AtomicU64::new(0),
            waiters,
            duplicates,
            workers,
            timeout: cfg.result_timeout,
            shape,
            share,
            twins,
            inbox: Mutex::new(Some(inbox)),
        })
    }

    /// Gives the gateway the server's fan-out and starts reading results (the first call; later
    /// calls do nothing). Until then no result is read: the results of an earlier process's
    /// batches wait in JetStream until the server can fan them out.
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        self.share.set_sink(sink);
        if let Some(inbox) = self.inbox.lock().take() {
            tokio::spawn(inbox.run());
        }
    }

    /// Follows `stream` from now on: other gateways' results of it are fanned out here too
    /// (called when a local subscriber of it appears; idempotent).
    pub fn follow(&self, stream: &str) {
        self.share.follow(stream);
    }

    /// This gateway's id (its results subject and durable consumer; its batch ids begin with
    /// it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Result copies dropped because their batch id was already delivered.
    pub fn duplicates_dropped(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// This gateway's head fingerprint (every batch carries it).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Workers heard from within three heartbeats: (same head as this gateway, another head).
    pub fn live_workers(&self) -> (usize, usize) {
        let mut w = self.workers.lock();
        w.retain(|_, (_, t)| t.elapsed() <= 3 * HEARTBEAT_EVERY);
        let same = w.values().filter(|(f, _)| *f == self.fingerprint).count();
        (same, w.len() - same)
    }

    /// `/healthz` under `serve --nats`: healthy while a worker with this gateway's head is
    /// alive; the answer names the fingerprint (docs/DESIGN.md section 11).
    pub fn health(&self) -> (bool, String) {
        let (same, other) = self.live_workers();
        let fp = hex(self.fingerprint);
        if let Some(inc) = self.twins.twin() {
            let msg = format!(
                "gateway id {} is also used by another live gateway (incarnation {inc}): give \
                 each gateway its own --gateway-id\n",
                self.id
            );
            return (false, msg);
        }
        if same > 0 {
            (
                true,
                format!("ok {same} compatible workers (head fingerprint {fp})\n"),
            )
        } else {
            let msg = format!(
                "no compatible worker: none alive with head fingerprint {fp} \
                 ({other} alive with another head)\n"
            );
            (false, msg)
        }
    }

    /// Publishes the batch and returns the future of its results; once they come they are
    /// also shared with the other gateways. Each row's stream, key and class travel with it
    /// (the worker echoes them in the result, for a restarted gateway).
    pub fn submit(
        &self,
        batch: Batch,
        priority: Priority,
        rows_meta: Rows,
    ) -> impl Future<Output = Result<BatchResult>> + Send + 'static {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", self.prefix);
        let mut rows_meta = rows_meta;
        rows_meta.mask.clone_from(&batch.mask);
        let wire = WireBatch {
            id: id.clone(),
            reply: self.reply.clone(),
            fingerprint: self.fingerprint,
            priority,
            version: 2,
            streams: rows_meta.streams.clone(),
            keys: rows_meta.keys.clone(),
            priorities: rows_meta.priorities.clone(),
            inputs: batch.inputs,
            mask: batch.mask,
        };
        let payload = wire.encode();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().insert(id.clone(), tx);
        let (js, waiters, timeout) = (self.js.clone(), Arc::clone(&self.waiters), self.timeout);
        // NATS away (the client reconnects in the background): refuse at once, retryable.
        let away = self.client.connection_state() != async_nats::connection::State::Connected;
        let url = self.url.clone();
        let start = Instant::now();
        let (rows, (d, m)) = (batch.rows, self.shape);
        let share = Arc::clone(&self.share);
        async move {
            let r = if away {
                metrics::counter!("fusion_nats_publish_refused_total").increment(1);
                Err(Error::Overloaded(format!(
                    "NATS at {url} is unreachable; the gateway is reconnecting"
                )))
            } else {
                publish_and_wait(js, &id, payload, priority, rx, timeout).await
            };
            if r.is_ok() {
                metrics::histogram!("fusion_nats_round_trip_seconds").record(start.elapsed());
            }
            // Whatever happened, the id has no waiter any more: a late copy is a duplicate.
            waiters.lock().remove(&id);
            let mut res = r?;
            if res.outputs.fused.len() != rows * d || res.outputs.weights.len() != rows * m {
                return Err(Error::Runtime(format!(
                    "worker {} returned outputs of the wrong size for batch {id}",
                    res.device
                )));
            }
            res.total_time = start.elapsed();
            share.publish(&id, &rows_meta, &res.outputs);
            Ok(res)
        }
    }
}

async fn publish_and_wait(
    js: jetstream::Context,
    id: &str,
    payload: Vec<u8>,
    priority: Priority,
    rx: oneshot::Receiver<Result<BatchResult>>,
    timeout: Duration,
) -> Result<BatchResult> {
    // The batch id is also the batch's Nats-Msg-Id: a publish retried by NATS is stored once.
    let msg = PublishMessage::build()
        .payload(payload.into())
        .message_id(id);
    let ack = js
        .send_publish(batch_subject(priority), msg)
        .await
        .map_err(|e| {
            metrics::counter!("fusion_nats_publish_refused_total").increment(1);
            nats_err("publishing a batch", e)
        })?;
    if let Err(e) = ack.await {
        metrics::counter!("fusion_nats_publish_refused_total").increment(1);
        return Err(nats_err("batch not stored", e));
    }
    metrics::counter!("fusion_nats_batches_published_total", "class" => class_label(priority))
        .increment(1);
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::Shutdown("the NATS gateway stopped".into())),
        Err(_) => Err(Error::Timeout(format!(
            "no worker returned batch {id} within {timeout:?}"
        ))),
    }
}

/// Records a worker's heartbeat, `NAME FINGERPRINT-HEX` (a malformed one is ignored).
fn heartbeat(workers: &Workers, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let Some((name, fp)) = text.rsplit_once(' ') else {
        return;
    };
    let Ok(fp) = u64::from_str_radix(fp, 16) else {
        return;
    };
    let mut w = workers.lock();
    if w.len() < 10_000 || w.contains_key(name) {
        w.insert(name.to_string(), (fp, Instant::now()));
    }
}
