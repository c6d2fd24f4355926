//! A Rust client for the streaming server (docs/PROTOCOL.md): connect (with a bearer token),
//! produce, subscribe, [`Client::fuse`] and [`Client::fuse_batch`] request/response helpers, and a stream of
//! [`Event`]s (results, errors, notices, the close). It speaks protocol version 2, tracks the
//! server epoch and the last stream seq received per subscribed stream, and
//! [`Client::reconnect`] resumes every subscription where it stopped (replay, section 7.4).
//! `wss://` URLs connect over TLS; [`Client::connect_with_options`] takes a CA file for a
//! self-signed server certificate ([`ConnectOptions`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), fusion_engine::client::ClientError> {
//! use fusion_engine::client::Client;
//! use fusion_engine::engine::Priority;
//! let mut c = Client::connect("ws://127.0.0.1:7878", None).await?;
//! let text = vec![0.1f32; 768];
//! let r = c.fuse("demo", &[("text", &text[..])], Priority::Critical).await?;
//! println!("fused {} values, weights {:?}", r.fused.len(), r.weights);
//! # Ok(()) }
//! ```
//!
//! Rooms: `wire` (the socket: connect, hello, the reader task turning frames into events),
//! `event` ([`Event`], [`ClientError`]), `resume` (resume points, subscribe options,
//! conflation), `batch` ([`Client::fuse_batch`]), `connect` (connect, hello, reconnect); this
//! file: [`Client`] and its requests.

mod batch;
mod connect;
mod event;
mod resume;
mod wire;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::engine::Priority;
pub use crate::protocol::DecodedResult as FuseResult;
use crate::protocol::{encode_produce, encode_samples, FLAG_ACK, FLAG_LAST};
use crate::tensor::DType;
pub use event::{ClientError, ClientResult, Event};
pub use resume::{Conflate, ResumePoint, SubscribeOptions};
pub use wire::ConnectOptions;

/// What the server said in `welcome`.
#[derive(Debug, Clone)]
pub struct Welcome {
    /// Modality names and widths, head order.
    pub modalities: Vec<(String, usize)>,
    /// Fused width D.
    pub dim: usize,
    /// The server's epoch (0 from a server without replay).
    pub epoch: u64,
    /// The whole message (limits included).
    pub raw: Value,
}

/// A connection to a fusion-engine server.
pub struct Client {
    tx: mpsc::Sender<Message>,
    events: mpsc::Receiver<Event>,
    backlog: VecDeque<Event>,
    welcome: Welcome,
    prefix: u64,
    next: u64,
    /// Subscribed streams and their conflation (restored by a reconnect).
    subscribed: HashMap<String, Option<Conflate>>,
    tracker: resume::Tracker,
    url: String,
    token: Option<String>,
    ca_file: Option<PathBuf>,
    binary: bool,
    batch: bool,
    /// Send queue sizes asked for in `hello` (kept for reconnects).
    send_queue: Option<[usize; 3]>,
    /// How long [`Client::fuse`] and the acknowledged calls wait. Default 30 s.
    pub timeout: Duration,
}

impl Client {
    /// Sends a raw text frame.
    pub async fn send_text(&self, text: String) -> ClientResult<()> {
        self.send(Message::text(text)).await
    }

    /// Sends a raw binary frame.
    pub async fn send_binary(&self, bytes: Vec<u8>) -> ClientResult<()> {
        self.send(Message::binary(bytes)).await
    }

    async fn send(&self, m: Message) -> ClientResult<()> {
        self.tx.send(m).await.map_err(|_| ClientError::Closed {
            code: None,
            reason: "the connection is closed".into(),
        })
    }

    /// Subscribes to `stream` (new results only) and waits for the server's ack.
    pub async fn subscribe(&mut self, stream: &str) -> ClientResult<()> {
        self.subscribe_with(stream, SubscribeOptions::default())
            .await
    }

    /// Subscribes with a resume point (what was missed since is replayed, section 7.4) and/or
    /// BULK conflation (section 7.5), and waits for the ack. Already subscribed: the resume
    /// point is ignored by the server.
    pub async fn subscribe_with(
        &mut self,
        stream: &str,
        opts: SubscribeOptions,
    ) -> ClientResult<()> {
        let mut extra = serde_json::Map::new();
        if let Some(r) = opts.resume {
            extra.insert("resume".into(), r.to_json());
        }
        if let Some(c) = opts.conflate {
            extra.insert("conflate".into(), c.as_str().into());
        }
        if !self.subscribed.contains_key(stream) {
            self.tracker.start(stream, opts.resume);
        }
        self.control_acked("subscribe", stream, extra).await?;
        self.subscribed.insert(stream.to_string(), opts.conflate);
        Ok(())
    }

    /// Unsubscribes and waits for the ack.
    pub async fn unsubscribe(&mut self, stream: &str) -> ClientResult<()> {
        self.subscribed.remove(stream);
        self.tracker.forget(stream);
        self.control_acked("unsubscribe", stream, serde_json::Map::new())
            .await
    }

    async fn control_acked(
        &mut self,
        op: &str,
        stream: &str,
        mut msg: serde_json::Map<String, Value>,
    ) -> ClientResult<()> {
        self.next += 1;
        let id = format!("{op}-{}", self.next);
        msg.insert("type".into(), op.into());
        msg.insert("stream".into(), stream.into());
        msg.insert("id".into(), id.as_str().into());
        self.send_text(Value::Object(msg).to_string()).await?;
        self.wait_for(op, |e| match e {
            Event::Control(v) if v["type"] == "ack" && v["id"] == id.as_str() => Some(Ok(())),
            Event::Error { code, message, raw } if raw["id"] == id.as_str() => {
                Some(Err(ClientError::Server {
                    code: code.clone(),
                    message: message.clone(),
                }))
            }
            _ => None,
        })
        .await?
    }

    /// Produces one modality of a sample as a binary F32 frame (fire and forget: errors arrive
    /// as [`Event::Error`]). `last` completes the sample now.
    pub async fn produce(
        &self,
        stream: &str,
        key: &str,
        modality: &str,
        values: &[f32],
        priority: Priority,
        last: bool,
    ) -> ClientResult<()> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        self.produce_raw(
            stream,
            key,
            modality,
            DType::F32,
            bytes,
            priority,
            if last { FLAG_LAST } else { 0 },
            0,
        )
        .await
    }

    /// Produces little-endian `bytes` of `dtype` with explicit flags and request id.
    #[allow(clippy::too_many_arguments)]
    pub async fn produce_raw(
        &self,
        stream: &str,
        key: &str,
        modality: &str,
        dtype: DType,
        bytes: &[u8],
        priority: Priority,
        flags: u8,
        id: u32,
    ) -> ClientResult<()> {
        let f = encode_produce(
            stream,
            key,
            modality,
            dtype,
            priority,
            flags & (FLAG_ACK | FLAG_LAST),
            id,
            bytes,
        )
        .ok_or_else(|| ClientError::Protocol("a name is longer than 65535 bytes".into()))?;
        self.send_binary(f).await
    }

    /// Produces whole samples in one `samples` frame (PROTOCOL 4.4): `features[j]` is
    /// `(modality, rows)` with `rows` holding `keys.len()` rows of that modality back to back
    /// (row-major `[N, width]`). Each sample is complete on arrival (modalities not listed are
    /// masked out). Fire and forget, like [`Client::produce`]; `id` (non-zero) asks for an
    /// `ack` naming it.
    pub async fn produce_samples(
        &self,
        stream: &str,
        keys: &[&str],
        features: &[(&str, &[f32])],
        priority: Priority,
        id: u32,
    ) -> ClientResult<()> {
        let names: Vec<&str> = features.iter().map(|(m, _)| *m).collect();
        let blocks: Vec<&[u8]> = features
            .iter()
            .map(|(_, x)| bytemuck::cast_slice::<f32, u8>(x))
            .collect();
        let f = encode_samples(
            stream,
            keys,
            &names,
            &blocks,
            DType::F32,
            priority,
            id != 0,
            id,
        )
        .ok_or_else(|| {
            ClientError::Protocol(
                "samples frame: no keys or modalities, a block that is not whole rows, or a \
                 name longer than 65535 bytes"
                    .into(),
            )
        })?;
        self.send_binary(f).await
    }

    /// The next event (events set aside by [`Client::fuse`] first). `None` after `Closed`.
    pub async fn next_event(&mut self) -> Option<Event> {
        match self.backlog.pop_front() {
            Some(e) => Some(e),
            None => {
                let e = self.events.recv().await?;
                self.tracker.see(&e);
                Some(e)
            }
        }
    }

    /// Waits for the event `pick` accepts; keeps the others for [`Client::next_event`].
    async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Event) -> Option<T>,
    ) -> ClientResult<T> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let ev = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Err(ClientError::Timeout(what.to_string())),
                Ok(None) => {
                    return Err(ClientError::Closed {
                        code: None,
                        reason: "closed".into(),
                    })
                }
                Ok(Some(e)) => e,
            };
            self.tracker.see(&ev);
            if let Some(t) = pick(&ev) {
                return Ok(t);
            }
            if let Event::Closed { code, reason } = &ev {
                let err = ClientError::Closed {
                    code: *code,
                    reason: reason.clone(),
                };
                self.backlog.push_back(ev);
                return Err(err);
            }
            if self.backlog.len() >= 65536 {
                self.backlog.pop_front();
            }
            self.backlog.push_back(ev);
        }
    }

    /// Request/response: subscribes to `stream` (the first time),
    /// sends each `(modality, features)` of one new sample (the last one flagged `last`, so
    /// absent modalities are masked out at once) and waits for its result.
    pub async fn fuse(
        &mut self,
        stream: &str,
        features: &[(&str, &[f32])],
        priority: Priority,
    ) -> ClientResult<FuseResult> {
        if features.is_empty() {
            return Err(ClientError::Protocol(
                "fuse needs at least one modality".into(),
            ));
        }
        if !self.subscribed.contains_key(stream) {
            self.subscribe(stream).await?;
        }
        self.next += 1;
        let key = format!("fuse-{:x}-{}", self.prefix, self.next);
        for (i, (m, x)) in features.iter().enumerate() {
            self.produce(stream, &key, m, x, priority, i + 1 == features.len())
                .await?;
        }
        self.wait_for("the fused result", |e| match e {
            Event::Result(r) if r.key == key && r.stream == stream => Some(Ok(r.clone())),
            Event::Error { code, message, raw }
                if raw["key"] == key.as_str()
                    || raw["keys"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|k| k == key.as_str())) =>
            {
                Some(Err(ClientError::Server {
                    code: code.clone(),
                    message: message.clone(),
                }))
            }
            _ => None,
        })
        .await?
    }

    /// Closes the connection (normal close).
    pub async fn close(self) {
        let _ = self.tx.send(Message::Close(None)).await;
    }
}
