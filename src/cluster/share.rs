//! Results shared between gateways (docs/DESIGN.md section 11, "Several gateways"). A gateway
//! that has a batch's results publishes them once per (batch, stream) to
//! `fusion.streams.<token>` of `FUSION_STREAMS`, with `<batch id>:<token>` as `Nats-Msg-Id`
//! (a second publish within the duplicate window is stored once and acked as a duplicate).
//! A gateway follows a stream from the moment a local subscriber of it appears (one ordered
//! consumer per followed stream, started 1 s before that moment, made again from the next
//! stream sequence after any error) and hands the rows another gateway originated to the
//! [`Sink`], which fans them out like local results. It stops following a stream the sink no
//! longer wants (no subscriber and nothing in the replay buffer).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::streams::{nats_err, stream_subject, SHARED_STREAM};
use super::wire::Rows;
use super::wire_rows::{Row, StreamRows};
use crate::batch::Outputs;
use crate::error::{Error, Result};

/// How far before its first local subscriber a followed stream is read (clocks of the gateway
/// and NATS may differ a little; a few results from before the subscribe are harmless).
const FOLLOW_MARGIN: Duration = Duration::from_secs(1);
/// Silence after which a follower asks the sink whether the stream is still wanted.
const IDLE: Duration = Duration::from_secs(3);
/// The wait before a follower makes its consumer again after an error.
const RETRY: Duration = Duration::from_millis(250);
/// The most streams one gateway follows at a time.
const MAX_FOLLOWED: usize = 10_000;

/// Where rows from other gateways (and from this gateway's earlier process) go: the server's
/// fan-out (`src/server/fanout/remote.rs`).
pub trait Sink: Send + Sync {
    /// Fans the rows out to the stream's subscribers as local results (stream seq, replay
    /// buffer, every subscriber).
    fn deliver(&self, rows: &StreamRows);
    /// Whether this gateway still wants the stream's results from other gateways.
    fn wants(&self, stream: &str) -> bool;
}

/// A gateway's side of the sharing.
pub struct Share {
    js: jetstream::Context,
    /// This gateway's id (`StreamRows::origin`).
    origin: String,
    fingerprint: u64,
    /// `(D, M)` of the head.
    shape: (usize, usize),
    sink: OnceLock<Arc<dyn Sink>>,
    followed: Arc<Mutex<HashSet<String>>>,
}

impl Share {
    pub fn new(
        js: jetstream::Context,
        origin: &str,
        fingerprint: u64,
        shape: (usize, usize),
    ) -> Share {
        Share {
            js,
            origin: origin.to_string(),
            fingerprint,
            shape,
            sink: OnceLock::new(),
            followed: Arc::default(),
        }
    }

    /// Sets the sink (once; later calls are ignored).
    pub fn set_sink(&self, sink: Arc<dyn Sink>) {
        let _ = self.sink.set(sink);
    }

    /// Publishes a live batch's results for the other gateways (this gateway fans them out
    /// itself) as core NATS publishes that JetStream stores, without waiting for its
    /// acknowledgement (measured in docs/PERF.md: the acked publish cost the gateway a third
    /// more CPU per sample). A share NATS does not take (the connection away) is logged and
    /// counted; a share JetStream does not store is not seen here: the other gateways'
    /// subscribers miss those rows (docs/DESIGN.md section 11).
    pub fn publish(&self, batch: &str, rows: &Rows, out: &Outputs) {
        let msgs: Vec<(String, String, Vec<u8>)> =
            group(&self.origin, self.fingerprint, self.shape, batch, rows, out)
                .into_iter()
                .map(|g| {
                    let subject = stream_subject(&g.stream);
                    (msg_id(batch, &subject), subject, g.encode())
                })
                .collect();
        let client = self.js.client();
        // In a task: the local fan-out never waits for the NATS connection.
        tokio::spawn(async move {
            for (id, subject, payload) in msgs {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
                match client
                    .publish_with_headers(subject, headers, payload.into())
                    .await
                {
                    Ok(()) => metrics::counter!("fusion_nats_shared_total").increment(1),
                    Err(e) => {
                        metrics::counter!("fusion_nats_share_refused_total").increment(1);
                        tracing::warn!("NATS gateway: results {id} not shared: {e}");
                    }
                }
            }
        });
    }

    /// Fans out the results of a batch this gateway's earlier process published (it has no
    /// producer waiting any more): each stream's rows are published for the other gateways and
    /// delivered here only when JetStream stored them now, not as a duplicate of what the
    /// earlier process shared (and so fanned out) before it died. After an error the caller
    /// tries again, which skips the streams stored now (their publish is then a duplicate).
    pub async fn orphan(&self, batch: &str, rows: &Rows, out: &Outputs) -> Result<usize> {
        let sink = self.sink.get().ok_or_else(|| {
            Error::Runtime("NATS gateway: no fan-out attached for earlier results".into())
        })?;
        let mut delivered = 0;
        for g in group(&self.origin, self.fingerprint, self.shape, batch, rows, out) {
            let subject = stream_subject(&g.stream);
            let id = msg_id(batch, &subject);
            let ack = publish(&self.js, subject, &id, g.encode()).await?;
            if !ack.duplicate {
                sink.deliver(&g);
                delivered += g.rows.len();
            }
        }
        Ok(delivered)
    }

    /// Follows `stream` (idempotent): its rows from other gateways go to the sink from now on
    /// (and from up to [`FOLLOW_MARGIN`] before).
    pub fn follow(&self, stream: &str) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        {
            let mut f = self.followed.lock();
            if f.contains(stream) {
                return;
            }
            if f.len() >= MAX_FOLLOWED {
                tracing::warn!(
                    "NATS gateway: following {MAX_FOLLOWED} streams already; \"{stream}\" gets \
                     this gateway's results only"
                );
                return;
            }
            f.insert(stream.to_string());
        }
        let since = async_nats::datetime::now();
        let start = async_nats::datetime::from_nanos(
            since.unix_timestamp_nanos() - FOLLOW_MARGIN.as_nanos() as i128,
        )
        .unwrap_or(since);
        let follower = Follower {
            js: self.js.clone(),
            origin: self.origin.clone(),
            fingerprint: self.fingerprint,
            shape: self.shape,
            stream: stream.to_string(),
            sink: Arc::clone(sink),
            followed: Arc::clone(&self.followed),
            policy: DeliverPolicy::ByStartTime { start_time: start },
        };
        tokio::spawn(follower.run());
    }
}

/// A batch's results, one message per stream, in the order of the streams' first rows; a row
/// the outputs or the mask do not cover is left out.
fn group(
    origin: &str,
    fingerprint: u64,
    (d, m): (usize, usize),
    batch: &str,
    rows: &Rows,
    out: &Outputs,
) -> Vec<StreamRows> {
    let mut groups: Vec<StreamRows> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, stream) in rows.streams.iter().enumerate() {
        let (Some(key), Some(&priority), Some(mask), Some(fused), Some(weights)) = (
            rows.keys.get(i),
            rows.priorities.get(i),
            rows.mask.get(i * m..(i + 1) * m),
            out.fused.get(i * d..(i + 1) * d),
            out.weights.get(i * m..(i + 1) * m),
        ) else {
            continue;
        };
        let g = *index.entry(stream).or_insert_with(|| {
            groups.push(StreamRows {
                origin: origin.to_string(),
                batch: batch.to_string(),
                fingerprint,
                stream: stream.clone(),
                dim: d,
                modalities: m,
                rows: Vec::new(),
            });
            groups.len() - 1
        });
        groups[g].rows.push(Row {
            key: key.clone(),
            priority,
            mask: mask.to_vec(),
            fused: fused.to_vec(),
            weights: weights.to_vec(),
        });
    }
    groups
}

/// `<batch id>:<subject token>`: the same (batch, stream) always has the same id.
fn msg_id(batch: &str, subject: &str) -> String {
    let token = subject.rsplit('.').next().unwrap_or(subject);
    format!("{batch}:{token}")
}

async fn publish(
    js: &jetstream::Context,
    subject: String,
    id: &str,
    payload: Vec<u8>,
) -> Result<jetstream::publish::PublishAck> {
    let msg = PublishMessage::build()
        .payload(payload.into())
        .message_id(id);
    let ack = js
        .send_publish(subject, msg)
        .await
        .map_err(|e| nats_err("sharing results", e))?;
    let ack = ack
        .await
        .map_err(|e| nats_err("shared results not stored", e))?;
    metrics::counter!("fusion_nats_shared_total").increment(1);
    Ok(ack)
}

/// The reader of one followed stream.
struct Follower {
    js: jetstream::Context,
    origin: String,
    fingerprint: u64,
    shape: (usize, usize),
    stream: String,
    sink: Arc<dyn Sink>,
    followed: Arc<Mutex<HashSet<String>>>,
    /// Where the next consumer starts.
    policy: DeliverPolicy,
}

impl Follower {
    async fn run(mut self) {
        loop {
            match self.read().await {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    "NATS gateway: following \"{}\": {e}; reading again from there",
                    self.stream
                ),
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Reads until the stream is no longer wanted (Ok) or an error.
    async fn read(&mut self) -> std::result::Result<(), String> {
        let stream = self
            .js
            .get_stream(SHARED_STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: stream_subject(&self.stream),
                deliver_policy: self.policy,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
        loop {
            let m = match tokio::time::timeout(IDLE, msgs.next()).await {
                Ok(Some(m)) => m.map_err(|e| e.to_string())?,
                Ok(None) => return Err("the consumer ended".into()),
                Err(_) => {
                    // Unwanted: stop, under the lock `follow` takes, so that a subscriber
                    // arriving now starts a new follower.
                    let mut f = self.followed.lock();
                    if !self.sink.wants(&self.stream) {
                        f.remove(&self.stream);
                        return Ok(());
                    }
                    continue;
                }
            };
            if let Ok(i) = m.info() {
                self.policy = DeliverPolicy::ByStartSequence {
                    start_sequence: i.stream_sequence + 1,
                };
            }
            self.handle(&m.payload);
        }
    }

    fn handle(&self, payload: &[u8]) {
        let rows = match StreamRows::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("NATS gateway: dropped undecodable shared results: {e}");
                return;
            }
        };
        if rows.origin == self.origin {
            return; // this gateway fanned them out itself
        }
        if rows.stream != self.stream
            || rows.fingerprint != self.fingerprint
            || (rows.dim, rows.modalities) != self.shape
        {
            metrics::counter!("fusion_nats_shared_dropped_total").increment(1);
            tracing::warn!(
                "NATS gateway: dropped results of batch {} shared by {}: another stream or head",
                rows.batch,
                rows.origin
            );
            return;
        }
        metrics::counter!("fusion_nats_shared_delivered_total").increment(rows.rows.len() as u64);
        self.sink.deliver(&rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Priority;

    #[test]
    fn one_message_per_stream_in_row_order() {
        let rows = Rows {
            streams: ["a", "b", "a", "c"].map(String::from).to_vec(),
            keys: ["k0", "k1", "k2", "k3"].map(String::from).to_vec(),
            priorities: vec![
                Priority::Critical,
                Priority::Bulk,
                Priority::Important,
                Priority::Bulk,
            ],
            mask: vec![1, 1, 0, 1, 1, 0, 1, 1],
        };
        // D = 1, M = 2; the last row has no outputs and is left out.
        let out = Outputs {
            fused: vec![0.0, 1.0, 2.0],
            weights: vec![0.5, 0.5, 0.0, 1.0, 1.0, 0.0],
        };
        let g = group("gw", 9, (1, 2), "gw.i1.0", &rows, &out);
        let streams: Vec<&str> = g.iter().map(|s| s.stream.as_str()).collect();
        assert_eq!(streams, ["a", "b"]);
        let a = &g[0];
        assert_eq!(
            (a.origin.as_str(), a.batch.as_str(), a.fingerprint),
            ("gw", "gw.i1.0", 9)
        );
        let keys: Vec<&str> = a.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["k0", "k2"]);
        assert_eq!(a.rows[1].fused, vec![2.0]);
        assert_eq!(a.rows[1].weights, vec![1.0, 0.0]);
        assert_eq!(a.rows[1].mask, vec![1, 0]);
        assert_eq!(a.rows[1].priority, Priority::Important);
        assert_eq!(g[1].rows[0].weights, vec![0.0, 1.0]);
        assert_eq!(msg_id("gw.i1.0", "fusion.streams.abcd"), "gw.i1.0:abcd");
    }
}
