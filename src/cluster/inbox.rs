//! The gateway's results inbox (docs/DESIGN.md section 11): the results of this gateway's
//! batches, read from the results stream (`FUSION_RESULTS`, filtered on this gateway's
//! subject) by an ordered consumer rather than a core subscription, so that results published
//! while the gateway was cut off from NATS (a NATS restart, a reconnect) are still read: after
//! any error the consumer is made again from the stream sequence after the last result read.
//! Each result completes its waiting batch once; a later copy is dropped and counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::streams::{nats_err, RESULT_STREAM};
use super::wire::WireResult;
use crate::engine::BatchResult;
use crate::error::{Error, Result};

/// Batch id -> the batch waiting for its results.
pub type Waiters = Mutex<HashMap<String, oneshot::Sender<Result<BatchResult>>>>;

/// Silence, with batches waiting, after which the inbox makes its consumer again.
const IDLE: Duration = Duration::from_secs(3);
/// How long the inbox waits before making its consumer again after an error.
const RETRY: Duration = Duration::from_millis(250);

/// The reader of one gateway's results.
pub struct Inbox {
    js: jetstream::Context,
    subject: String,
    /// The stream sequence of the next result to read.
    next: u64,
    waiters: Arc<Waiters>,
    duplicates: Arc<AtomicU64>,
}

impl Inbox {
    /// Starts after the last result stored now (a new gateway id has none before it).
    pub async fn open(
        js: &jetstream::Context,
        subject: &str,
        waiters: &Arc<Waiters>,
        duplicates: &Arc<AtomicU64>,
    ) -> Result<Inbox> {
        let mut stream = js
            .get_stream(RESULT_STREAM)
            .await
            .map_err(|e| nats_err("opening the result stream", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| nats_err("reading the result stream", e))?;
        Ok(Inbox {
            js: js.clone(),
            subject: subject.to_string(),
            next: info.state.last_sequence + 1,
            waiters: Arc::clone(waiters),
            duplicates: Arc::clone(duplicates),
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
        let stream = self
            .js
            .get_stream(RESULT_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: self.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: self.next,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
        loop {
            // A consumer cut off by a NATS restart may wait forever: when batches are waiting
            // and nothing came for a while, make it again (from `next`: nothing is skipped).
            let m = match tokio::time::timeout(IDLE, msgs.next()).await {
                Ok(Some(m)) => m.map_err(|e| e.to_string())?,
                Ok(None) => break,
                Err(_) if self.waiters.lock().is_empty() => continue,
                Err(_) => {
                    tracing::debug!("NATS gateway: no result for {IDLE:?}; remaking the consumer");
                    return Ok(());
                }
            };
            if let Ok(i) = m.info() {
                self.next = self.next.max(i.stream_sequence + 1);
            }
            deliver(&self.waiters, &self.duplicates, &m.payload);
        }
        Err("the consumer ended".into())
    }
}

/// Hands a result to its waiting batch; a result whose id has no waiter was already delivered
/// (or timed out) and is dropped.
fn deliver(waiters: &Waiters, duplicates: &AtomicU64, payload: &[u8]) {
    let r = match WireResult::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("NATS gateway: dropped an undecodable result: {e}");
            return;
        }
    };
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
