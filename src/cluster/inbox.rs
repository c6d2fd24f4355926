//! The gateway's results inbox (docs/DESIGN.md section 11): the results of this gateway id's
//! batches, read from the results stream (`FUSION_RESULTS`, filtered on this gateway's subject)
//! through the id's durable consumer, each acked once handled, rather than a core subscription:
//! results published while the gateway was cut off from NATS (a NATS restart, a reconnect) are
//! still read, and a gateway restarted with the same id reads what its earlier process had not
//! acked. A result of this process's batches completes its waiting batch once (a later copy is
//! dropped and counted); a result of a batch an earlier process published has no producer any
//! more and is fanned out to its streams' subscribers only ([`Share::orphan`]), once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::share::Share;
use super::streams::gateway_consumer;
use super::wire::WireResult;
use crate::engine::BatchResult;
use crate::error::{Error, Result};

/// Batch id -> the batch waiting for its results.
pub type Waiters = Mutex<HashMap<String, oneshot::Sender<Result<BatchResult>>>>;

/// Silence, with batches waiting, after which the inbox makes its consumer again.
const IDLE: Duration = Duration::from_secs(3);
/// How long the inbox waits before making its consumer again after an error.
const RETRY: Duration = Duration::from_millis(250);
/// How long a result handed to this gateway stays unacked before JetStream offers it again.
pub const ACK_WAIT: Duration = Duration::from_secs(5);
/// Earlier batches' ids remembered as fanned out (a redelivered copy is dropped).
const ORPHANS_KEPT: usize = 100_000;

/// The reader of one gateway's results.
pub struct Inbox {
    js: jetstream::Context,
    /// The gateway id.
    gateway: String,
    /// `<gateway id>.<incarnation>.`: the prefix of this process's batch ids.
    mine: String,
    waiters: Arc<Waiters>,
    duplicates: Arc<AtomicU64>,
    share: Arc<Share>,
    /// Earlier batches already fanned out, oldest first.
    orphans: (HashSet<String>, VecDeque<String>),
}

impl Inbox {
    /// Makes (or finds, after a restart) the gateway id's durable consumer.
    pub async fn open(
        js: &jetstream::Context,
        gateway: &str,
        mine: &str,
        waiters: &Arc<Waiters>,
        duplicates: &Arc<AtomicU64>,
        share: &Arc<Share>,
    ) -> Result<Inbox> {
        gateway_consumer(js, gateway, ACK_WAIT).await?;
        Ok(Inbox {
            js: js.clone(),
            gateway: gateway.to_string(),
            mine: mine.to_string(),
            waiters: Arc::clone(waiters),
            duplicates: Arc::clone(duplicates),
            share: Arc::clone(share),
            orphans: (HashSet::new(), VecDeque::new()),
        })
    }

    /// Reads results until the process ends, making the consumer again after any error.
    pub async fn run(mut self) {
        loop {
            if let Err(e) = self.read().await {
                tracing::warn!("NATS gateway: results inbox: {e}; reading again from there");
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn read(&mut self) -> std::result::Result<(), String> {
        let consumer = gateway_consumer(&self.js, &self.gateway, ACK_WAIT)
            .await
            .map_err(|e| e.to_string())?;
        let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
        loop {
            // A consumer cut off by a NATS restart may wait forever: when batches are waiting
            // and nothing came for a while, make it again (what was not acked comes again).
            let m = match tokio::time::timeout(IDLE, msgs.next()).await {
                Ok(Some(m)) => m.map_err(|e| e.to_string())?,
                Ok(None) => break,
                Err(_) if self.waiters.lock().is_empty() => continue,
                Err(_) => {
                    tracing::debug!("NATS gateway: no result for {IDLE:?}; remaking the consumer");
                    return Ok(());
                }
            };
            self.handle(&m.payload).await?;
            if let Err(e) = m.ack().await {
                tracing::debug!("NATS gateway: ack of a result failed: {e}");
            }
        }
        Err("the consumer ended".into())
    }

    /// One result: to its waiting batch, or (an earlier process's batch) to its streams'
    /// subscribers. An error means "not handled": the result is not acked and comes again.
    async fn handle(&mut self, payload: &[u8]) -> std::result::Result<(), String> {
        let r = match WireResult::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("NATS gateway: dropped an undecodable result: {e}");
                return Ok(());
            }
        };
        if r.id.starts_with(&self.mine) {
            deliver(&self.waiters, &self.duplicates, r);
            return Ok(());
        }
        if self.orphans.0.contains(&r.id) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("fusion_nats_duplicates_dropped_total").increment(1);
            return Ok(());
        }
        match (&r.outcome, &r.rows) {
            (Ok(c), Some(rows)) => {
                let n = self
                    .share
                    .orphan(&r.id, rows, &c.outputs)
                    .await
                    .map_err(|e| e.to_string())?;
                metrics::counter!("fusion_nats_earlier_results_total").increment(n as u64);
                tracing::info!(batch = %r.id, rows = n, "NATS gateway: results of an earlier process's batch fanned out");
            }
            (Err((code, _)), _) => {
                tracing::info!(batch = %r.id, %code, "NATS gateway: an earlier process's batch failed; no producer to tell")
            }
            (Ok(_), None) => tracing::warn!(
                batch = %r.id,
                "NATS gateway: an earlier batch's result without its rows (a version-1 worker): dropped"
            ),
        }
        self.orphans.0.insert(r.id.clone());
        self.orphans.1.push_back(r.id);
        if self.orphans.1.len() > ORPHANS_KEPT {
            if let Some(old) = self.orphans.1.pop_front() {
                self.orphans.0.remove(&old);
            }
        }
        Ok(())
    }
}

/// Hands a result to its waiting batch; a result whose id has no waiter was already delivered
/// (or timed out) and is dropped.
fn deliver(waiters: &Waiters, duplicates: &AtomicU64, r: WireResult) {
    let Some(tx) = waiters.lock().remove(&r.id) else {
        duplicates.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fusion_nats_duplicates_dropped_total").increment(1);
        tracing::debug!(batch = %r.id, "NATS gateway: duplicate result dropped");
        return;
    };
    let res = match r.outcome {
        Ok(c) => Ok(BatchResult {
            outputs: c.outputs,
            device: c.device,
            device_index: 0,
            retries: c.retries,
            device_time: c.device_time,
            total_time: Duration::ZERO,
        }),
        Err((code, msg)) => Err(match code.as_str() {
            "overloaded" => Error::Overloaded(msg),
            "timeout" => Error::Timeout(msg),
            "shutdown" => Error::Shutdown(msg),
            _ => Error::Runtime(format!("worker: {code}: {msg}")),
        }),
    };
    let _ = tx.send(res);
}
