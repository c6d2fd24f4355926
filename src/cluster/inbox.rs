//! The gateway's results inbox (docs/DESIGN.md section 11): the results of this gateway id's
//! batches, read from the results stream (`FUSION_RESULTS`, filtered on this gateway's subject)
//! through the id's durable consumer, acked once handled, rather than a core subscription:
//! results published while the gateway was cut off from NATS (a NATS restart, a reconnect) are
//! still read, and a gateway restarted with the same id reads what its earlier process had not
//! acked. A result of this process's batches completes its waiting batch once (a later copy is
//! dropped and counted); a result of a batch an earlier process published has no producer any
//! more and is fanned out to its streams' subscribers only ([`Share::orphan`]), once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// The most results handled before the inbox acks (the last of them)...
const ACK_EVERY: usize = 256;
/// ...and the longest a handled result waits for its ack.
const ACK_DELAY: Duration = Duration::from_millis(20);
/// Attempts at fanning out an earlier batch's results, [`RETRY`] apart (30 s).
const ORPHAN_TRIES: u32 = 120;

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
        // The last result handled and not acked yet, how many are behind it and since when:
        // acking it acks them all (AckPolicy::All), after ACK_DELAY or ACK_EVERY results.
        let mut unacked: Option<jetstream::Message> = None;
        let (mut behind, mut since) = (0usize, Instant::now());
        let r = loop {
            let wait = if unacked.is_some() {
                ACK_DELAY.saturating_sub(since.elapsed())
            } else {
                IDLE
            };
            // A consumer cut off by a NATS restart may wait forever: when batches are waiting
            // and nothing came for a while, make it again (what was not acked comes again).
            let m = match tokio::time::timeout(wait, msgs.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => break Err(e.to_string()),
                Ok(None) => break Err("the consumer ended".into()),
                Err(_) if unacked.is_some() => {
                    ack(unacked.take()).await;
                    continue;
                }
                Err(_) if self.waiters.lock().is_empty() => continue,
                Err(_) => {
                    tracing::debug!("NATS gateway: no result for {IDLE:?}; remaking the consumer");
                    break Ok(());
                }
            };
            self.handle(&m.payload).await;
            if unacked.is_none() {
                (behind, since) = (0, Instant::now());
            }
            unacked = Some(m);
            behind += 1;
            if behind >= ACK_EVERY || since.elapsed() >= ACK_DELAY {
                ack(unacked.take()).await;
            }
        };
        ack(unacked).await;
        r
    }

    /// One result: to its waiting batch, or (an earlier process's batch) to its streams'
    /// subscribers. Acking a later result acks this one, so an earlier batch's results are
    /// retried here (NATS away) for up to [`ORPHAN_TRIES`] x [`RETRY`], then dropped with an
    /// error.
    async fn handle(&mut self, payload: &[u8]) {
        let r = match WireResult::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("NATS gateway: dropped an undecodable result: {e}");
                return;
            }
        };
        if r.id.starts_with(&self.mine) {
            deliver(&self.waiters, &self.duplicates, r);
            return;
        }
        if self.orphans.0.contains(&r.id) {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("fusion_nats_duplicates_dropped_total").increment(1);
            return;
        }
        match (&r.outcome, &r.rows) {
            (Ok(c), Some(rows)) => {
                let mut tries = 0;
                let n = loop {
                    match self.share.orphan(&r.id, rows, &c.outputs).await {
                        Ok(n) => break n,
                        Err(e) if tries + 1 >= ORPHAN_TRIES => {
                            tracing::error!(
                                batch = %r.id,
                                "NATS gateway: results of an earlier process's batch dropped: {e}"
                            );
                            break 0;
                        }
                        Err(_) => tries += 1,
                    }
                    tokio::time::sleep(RETRY).await;
                };
                metrics::counter!("fusion_nats_earlier_results_total").increment(n as u64);
                tracing::info!(
                    batch = %r.id,
                    rows = n,
                    "NATS gateway: results of an earlier process's batch fanned out"
                );
            }
            (Err((code, _)), _) => {
                tracing::info!(
                    batch = %r.id,
                    %code,
                    "NATS gateway: an earlier process's batch failed; no producer to tell"
                )
            }
            (Ok(_), None) => tracing::warn!(
                batch = %r.id,
                "NATS gateway: an earlier batch's result without its rows (version 1): dropped"
            ),
        }
        self.orphans.0.insert(r.id.clone());
        self.orphans.1.push_back(r.id);
        if self.orphans.1.len() > ORPHANS_KEPT {
            if let Some(old) = self.orphans.1.pop_front() {
                self.orphans.0.remove(&old);
            }
        }
    }
}

/// Acks `m` and (AckPolicy::All) every result before it; a lost ack only means a redelivery,
/// which is dropped as a duplicate.
async fn ack(m: Option<jetstream::Message>) {
    if let Some(m) = m {
        if let Err(e) = m.ack().await {
            tracing::debug!("NATS gateway: ack of a result failed: {e}");
        }
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
