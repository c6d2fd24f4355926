//! A Rust client for the streaming server (docs/PROTOCOL.md): connect (with a bearer token),
//! produce, subscribe, a [`Client::fuse`] request/response helper, and a stream of
//! [`Event`]s (results, errors, notices, the close).
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

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::engine::Priority;
pub use crate::server::codec::DecodedResult as FuseResult;
use crate::server::codec::{self, decode_result, encode_produce, FLAG_ACK, FLAG_LAST};
use crate::tensor::DType;

/// Client-side failures, each with a stable [`ClientError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection or handshake failed (HTTP 401 and 503 included).
    #[error("connect: {0}")]
    Connect(String),
    /// The server answered with an error message.
    #[error("server error {code}: {message}")]
    Server {
        /// The protocol's stable code (`wrong_width`, `overloaded`, ...).
        code: String,
        /// Its text.
        message: String,
    },
    /// The connection is closed.
    #[error("connection closed ({code:?}): {reason}")]
    Closed {
        /// WebSocket close code, if the server sent one.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// The server said something this client does not understand, or a bad argument.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl ClientError {
    /// Stable machine code.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Connect(_) => "connect",
            ClientError::Server { code, .. } => code,
            ClientError::Closed { .. } => "closed",
            ClientError::Protocol(_) => "protocol",
            ClientError::Timeout(_) => "timeout",
        }
    }
}

/// Client result.
pub type ClientResult<T> = std::result::Result<T, ClientError>;

/// Something the server sent.
#[derive(Debug, Clone)]
pub enum Event {
    /// A fused sample.
    Result(FuseResult),
    /// An `error` message (`code`, `message`, and the raw JSON).
    Error {
        /// Stable code.
        code: String,
        /// Text.
        message: String,
        /// The whole message.
        raw: Value,
    },
    /// Any other control message (`ack`, `notice`, `pong`, `heartbeat`, `welcome`).
    Control(Value),
    /// The connection closed (last event).
    Closed {
        /// Close code, if any.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
}

/// What the server said in `welcome`.
#[derive(Debug, Clone)]
pub struct Welcome {
    /// Modality names and widths, head order.
    pub modalities: Vec<(String, usize)>,
    /// Fused width D.
    pub dim: usize,
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
    subscribed: std::collections::HashSet<String>,
    /// How long [`Client::fuse`] and the acknowledged calls wait. Default 30 s.
    pub timeout: Duration,
}

impl Client {
    /// Connects, says hello (binary results) and waits for the welcome. `url` is
    /// `ws://host:port/`; `token` is sent as `Authorization: Bearer`.
    pub async fn connect(url: &str, token: Option<&str>) -> ClientResult<Client> {
        Self::connect_with(url, token, true).await
    }

    /// [`Client::connect`], choosing binary or JSON results.
    pub async fn connect_with(
        url: &str,
        token: Option<&str>,
        binary: bool,
    ) -> ClientResult<Client> {
        let cerr = |e: &dyn std::fmt::Display| ClientError::Connect(e.to_string());
        let mut req = url.into_client_request().map_err(|e| cerr(&e))?;
        if let Some(t) = token {
            let v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| cerr(&e))?;
            req.headers_mut().insert("authorization", v);
        }
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true)
            .await
            .map_err(|e| cerr(&e))?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut out_rx) = mpsc::channel::<Message>(1024);
        let (ev_tx, events) = mpsc::channel::<Event>(4096);
        tokio::spawn(async move {
            // Feed what is queued into the write buffer and flush once it runs empty (or every
            // 64 messages): a burst of produce frames costs a few syscalls, not one each.
            'run: while let Some(mut m) = out_rx.recv().await {
                let mut n = 0;
                loop {
                    let close = matches!(m, Message::Close(_));
                    if sink.feed(m).await.is_err() {
                        break 'run;
                    }
                    n += 1;
                    if close {
                        let _ = sink.flush().await;
                        break 'run;
                    }
                    match out_rx.try_recv() {
                        Ok(next) if n < 64 => m = next,
                        Ok(next) => {
                            if sink.flush().await.is_err() {
                                break 'run;
                            }
                            n = 0;
                            m = next;
                        }
                        Err(_) => break,
                    }
                }
                if sink.flush().await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut closed = (None, "connection ended without a close frame".to_string());
            while let Some(m) = stream.next().await {
                let ev = match m {
                    Ok(Message::Binary(b)) => match decode_result(&b) {
                        Some(r) => Event::Result(r),
                        None => Event::Control(json!({"type": "undecodable_binary"})),
                    },
                    Ok(Message::Text(t)) => text_event(t.as_str()),
                    Ok(Message::Close(f)) => {
                        if let Some(f) = f {
                            closed = (Some(u16::from(f.code)), f.reason.to_string());
                        }
                        break;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        closed.1 = e.to_string();
                        break;
                    }
                };
                if ev_tx.send(ev).await.is_err() {
                    return;
                }
            }
            let _ = ev_tx
                .send(Event::Closed {
                    code: closed.0,
                    reason: closed.1,
                })
                .await;
        });
        let prefix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (&tx as *const _ as u64);
        let mut c = Client {
            tx,
            events,
            backlog: VecDeque::new(),
            welcome: Welcome {
                modalities: Vec::new(),
                dim: 0,
                raw: Value::Null,
            },
            prefix,
            next: 0,
            subscribed: Default::default(),
            timeout: Duration::from_secs(30),
        };
        let results = if binary { "binary" } else { "json" };
        c.send_text(json!({"type": "hello", "version": 1, "results": results}).to_string())
            .await?;
        let w = c
            .wait_for("welcome", |e| match e {
                Event::Control(v) if v["type"] == "welcome" => Some(v.clone()),
                _ => None,
            })
            .await?;
        let modalities = w["head"]["modalities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some((
                            m["name"].as_str()?.to_string(),
                            m["width"].as_u64()? as usize,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let dim = w["head"]["dim"].as_u64().unwrap_or(0) as usize;
        c.welcome = Welcome {
            modalities,
            dim,
            raw: w,
        };
        Ok(c)
    }

    /// The server's welcome (head modalities, D, limits).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

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

    /// Subscribes to `stream` and waits for the server's ack.
    pub async fn subscribe(&mut self, stream: &str) -> ClientResult<()> {
        self.control_acked("subscribe", stream).await?;
        self.subscribed.insert(stream.to_string());
        Ok(())
    }

    /// Unsubscribes and waits for the ack.
    pub async fn unsubscribe(&mut self, stream: &str) -> ClientResult<()> {
        self.subscribed.remove(stream);
        self.control_acked("unsubscribe", stream).await
    }

    async fn control_acked(&mut self, op: &str, stream: &str) -> ClientResult<()> {
        self.next += 1;
        let id = format!("{op}-{}", self.next);
        self.send_text(json!({"type": op, "stream": stream, "id": id}).to_string())
            .await?;
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

    /// The next event (events set aside by [`Client::fuse`] first). `None` after `Closed`.
    pub async fn next_event(&mut self) -> Option<Event> {
        match self.backlog.pop_front() {
            Some(e) => Some(e),
            None => self.events.recv().await,
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
        if !self.subscribed.contains(stream) {
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

fn text_event(t: &str) -> Event {
    let v: Value = match serde_json::from_str(t) {
        Ok(v) => v,
        Err(_) => return Event::Control(json!({"type": "undecodable_text", "text": t})),
    };
    match v["type"].as_str() {
        Some("error") => Event::Error {
            code: v["code"].as_str().unwrap_or("").to_string(),
            message: v["message"].as_str().unwrap_or("").to_string(),
            raw: v,
        },
        Some("result") => {
            let f32s = |k: &str| -> Vec<f32> {
                v[k].as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            Event::Result(FuseResult {
                seq: v["seq"].as_u64().unwrap_or(0),
                stream: v["stream"].as_str().unwrap_or("").to_string(),
                key: v["key"].as_str().unwrap_or("").to_string(),
                priority: v["priority"]
                    .as_str()
                    .and_then(codec::priority_named)
                    .unwrap_or_default(),
                mask: v["mask"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect())
                    .unwrap_or_default(),
                fused: f32s("fused"),
                weights: f32s("weights"),
            })
        }
        _ => Event::Control(v),
    }
}
