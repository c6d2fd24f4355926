//! One connection's handler: reads frames, validates them (SPEC section 7: every bad input gets
//! a typed error and the connection goes on where it can), answers control messages, and hands
//! produce messages to the pipeline. Its one writer task (`writer.rs`) owns the socket's
//! sending half; everything this side says goes through the connection's CONTROL queue.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc::error::TrySendError, watch};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::aligner::Ingest;
use super::codec::{self, Code, ProtoError};
use super::messages::{self, About};
use super::outbound::{Conflate, Outbound};
use super::replay::Resume;
use super::{writer, Shared};
use crate::engine::Priority;
use crate::tensor::{find_non_finite_bytes, DType};

/// A produce message, from either encoding, before validation.
struct Produce<'a> {
    stream: &'a str,
    key: Cow<'a, str>,
    modality: &'a str,
    dtype: DType,
    priority: Priority,
    n: usize,
    payload: Bytes,
    last: bool,
    ack: bool,
    id: Option<Value>,
}

struct Conn {
    shared: Arc<Shared>,
    out: Arc<Outbound>,
    /// Streams produced into or subscribed to (the per-connection limit), interned.
    streams: HashSet<Arc<str>>,
    subscribed: HashSet<Arc<str>>,
    draining: bool,
}

/// Serves one upgraded connection until it closes.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    ws: WebSocketStream<TcpStream>,
    out: Arc<Outbound>,
    mut stop: watch::Receiver<bool>,
) {
    let (sink, mut stream) = ws.split();
    let m = Arc::clone(&shared.m);
    let writer = tokio::spawn(writer::run(Arc::clone(&out), sink, shared.writer_cfg(), m));
    let mut c = Conn {
        draining: *stop.borrow(),
        shared,
        out: Arc::clone(&out),
        streams: HashSet::new(),
        subscribed: HashSet::new(),
    };
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    out.reserve_room().await;
                    c.text(t.as_str()).await
                }
                Some(Ok(Message::Binary(b))) => {
                    out.reserve_room().await;
                    c.binary(b).await
                }
                Some(Ok(Message::Close(_))) | None => {
                    out.stop();
                    break;
                }
                Some(Ok(_)) => {} // ping (answered by tungstenite), pong
                Some(Err(WsError::Capacity(e))) => {
                    let msg = format!("{e} (max_frame_bytes {})", c.shared.cfg.max_frame_bytes);
                    c.error(Code::FrameTooLarge, &msg, &About::default());
                    out.close_after_drain(1009, "frame_too_large");
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(conn = out.id, "read error: {e}");
                    out.stop();
                    break;
                }
            },
            _ = out.done() => break,
            r = stop.changed(), if !c.draining => {
                c.draining = true;
                if r.is_ok() {
                    out.push_control(messages::shutdown(c.shared.cfg.shutdown_grace.as_secs_f64() * 1e3));
                }
            }
        }
    }
    c.shared.registry.remove(c.subscribed.drain(), &out);
    if writer.await.is_err() {
        tracing::error!(conn = out.id, "the writer task panicked");
        out.finish();
    }
}

impl Conn {
    fn error(&self, code: Code, msg: &str, about: &About<'_>) {
        self.shared.m.error(code);
        self.out.push_control(messages::error(code, msg, about));
    }

    fn check_name(&self, what: &str, s: &str) -> Result<(), ProtoError> {
        let max = self.shared.cfg.max_name_bytes;
        if s.is_empty() || s.len() > max {
            return Err(ProtoError::new(
                Code::InvalidName,
                format!("{what} must be 1 to {max} bytes, got {}", s.len()),
            ));
        }
        Ok(())
    }

    /// The interned stream, counting it against the per-connection limit.
    fn use_stream(&mut self, s: &str) -> Result<Arc<str>, ProtoError> {
        if let Some(a) = self.streams.get(s) {
            return Ok(Arc::clone(a));
        }
        let max = self.shared.cfg.max_streams_per_connection;
        if self.streams.len() >= max {
            return Err(ProtoError::new(
                Code::TooManyStreams,
                format!("this connection already uses {max} streams (max_streams_per_connection)"),
            ));
        }
        let a: Arc<str> = Arc::from(s);
        self.streams.insert(Arc::clone(&a));
        Ok(a)
    }

    async fn binary(&mut self, frame: Bytes) {
        let p = match codec::parse_produce(&frame) {
            Ok(p) => p,
            Err(e) => {
                let id = Value::from(codec::produce_id(&frame));
                let id = (id != 0).then_some(&id);
                return self.error(
                    e.code,
                    &e.message,
                    &About {
                        id,
                        ..About::default()
                    },
                );
            }
        };
        let id = (p.id != 0).then(|| Value::from(p.id));
        let pr = Produce {
            stream: p.stream,
            key: Cow::Borrowed(p.key),
            modality: p.modality,
            dtype: p.dtype,
            priority: p.priority,
            n: p.n,
            payload: p.payload.clone(),
            last: p.last,
            ack: p.ack,
            id,
        };
        self.produce(pr).await
    }

    async fn produce(&mut self, p: Produce<'_>) {
        let about = About {
            id: p.id.as_ref(),
            stream: Some(p.stream),
            key: Some(&p.key),
            modality: Some(p.modality),
        };
        let ing = match self.validate(&p) {
            Ok(i) => i,
            Err(e) => return self.error(e.code, &e.message, &about),
        };
        self.shared.m.produce.increment(1);
        let tx = &self.shared.ingest;
        self.out.begin_request();
        let refused = match tx.try_send(ing) {
            Ok(()) => return,
            Err(TrySendError::Closed(_)) => {
                self.out.end_request();
                return self.error(Code::Shutdown, "the server is shutting down", &about);
            }
            Err(TrySendError::Full(_)) if p.priority == Priority::Bulk => true,
            Err(TrySendError::Full(ing)) => {
                let wait = self.shared.cfg.ingest_wait;
                match tokio::time::timeout(wait, tx.send(ing)).await {
                    Ok(Ok(())) => return,
                    Ok(Err(_)) => {
                        self.out.end_request();
                        return self.error(Code::Shutdown, "the server is shutting down", &about);
                    }
                    Err(_) => true,
                }
            }
        };
        self.out.end_request();
        if refused {
            let why = "the ingest queue is full (the server is saturated)";
            super::pipeline::refuse(&self.shared, &self.out, p.priority, &about, why);
        }
    }

    fn validate(&mut self, p: &Produce<'_>) -> Result<Ingest, ProtoError> {
        if self.draining {
            return Err(ProtoError::new(
                Code::Shutdown,
                "the server is shutting down",
            ));
        }
        self.check_name("stream", p.stream)?;
        self.check_name("key", &p.key)?;
        let head = &self.shared.head;
        let Some(mi) = head.modality_index(p.modality) else {
            return Err(ProtoError::new(
                Code::UnknownModality,
                format!(
                    "unknown modality \"{}\" (the head has {})",
                    p.modality,
                    head.modality_list()
                ),
            ));
        };
        let width = head.modalities[mi].width;
        if p.n != width {
            return Err(ProtoError::new(
                Code::WrongWidth,
                format!(
                    "modality \"{}\" has width {width}, got {} values",
                    p.modality, p.n
                ),
            ));
        }
        if let Some(i) = find_non_finite_bytes(p.dtype, &p.payload) {
            return Err(ProtoError::new(
                Code::NonFinite,
                format!("modality \"{}\" element {i} is NaN or Inf", p.modality),
            ));
        }
        let stream = self.use_stream(p.stream)?;
        Ok(Ingest {
            stream,
            key: p.key.to_string(),
            modality: mi,
            dtype: p.dtype,
            priority: p.priority,
            payload: p.payload.clone(),
            last: p.last,
            ack: p.ack,
            id: p.id.clone(),
            producer: Arc::clone(&self.out),
        })
    }

    async fn text(&mut self, t: &str) {
        let v: Value = match serde_json::from_str(t) {
            Ok(v) => v,
            Err(e) => {
                return self.error(
                    Code::Malformed,
                    &format!("not JSON: {e}"),
                    &About::default(),
                )
            }
        };
        let id = v.get("id");
        let about = About {
            id,
            ..About::default()
        };
        let Some(ty) = v.get("type").and_then(Value::as_str) else {
            let msg = "a text message must be a JSON object with a string \"type\"";
            return self.error(Code::Malformed, msg, &about);
        };
        match ty {
            "hello" => self.hello(&v, &about),
            "ping" => self.out.push_control(messages::pong(id)),
            "subscribe" | "unsubscribe" => {
                if let Err(e) = self.subscription(ty == "subscribe", &v) {
                    self.error(e.code, &e.message, &about);
                }
            }
            "produce" => match json_produce(&v) {
                Ok(p) => self.produce(p).await,
                Err(e) => self.error(e.code, &e.message, &about),
            },
            other => {
                let msg = format!("unknown message type \"{other}\" (hello, subscribe, unsubscribe, produce, ping)");
                self.error(Code::UnknownType, &msg, &about)
            }
        }
    }

    fn hello(&mut self, v: &Value, about: &About<'_>) {
        let version = match v.get("version").and_then(Value::as_u64) {
            Some(1) => codec::VERSION,
            Some(2) => codec::VERSION_2,
            _ => {
                let msg = format!(
                    "protocol version {} is not supported (this server speaks 1 and 2)",
                    v["version"]
                );
                self.error(Code::UnsupportedVersion, &msg, about);
                self.out.close_after_drain(1002, "unsupported_version");
                return;
            }
        };
        let binary = match v.get("results").map(|r| r.as_str()) {
            None | Some(Some("json")) => false,
            Some(Some("binary")) => true,
            _ => {
                return self.error(
                    Code::Malformed,
                    "\"results\" must be \"json\" or \"binary\"",
                    about,
                )
            }
        };
        self.out.set_encoding(binary, version);
        self.out
            .push_control(messages::welcome(&self.shared.welcome, binary, version));
    }

    fn subscription(&mut self, sub: bool, v: &Value) -> Result<(), ProtoError> {
        let Some(stream) = v.get("stream").and_then(Value::as_str) else {
            return Err(ProtoError::new(
                Code::Malformed,
                "\"stream\" (a string) is required",
            ));
        };
        self.check_name("stream", stream)?;
        let about = About {
            id: v.get("id"),
            stream: Some(stream),
            ..About::default()
        };
        if sub {
            let resume = resume_point(v)?;
            let conflate = conflate_mode(v)?;
            let s = self.use_stream(stream)?;
            self.out.set_conflate(&s, conflate);
            let sh = &self.shared;
            sh.replay
                .subscribe(&sh.registry, &s, &self.out, resume, |a| {
                    messages::ack_subscribe(&about, a.epoch, a.last, a.replay)
                });
            self.subscribed.insert(s);
        } else {
            if !self.subscribed.remove(stream) {
                return Err(ProtoError::new(
                    Code::UnknownStream,
                    format!("not subscribed to \"{stream}\""),
                ));
            }
            self.shared.registry.unsubscribe(stream, &self.out);
            self.out.forget_stream(stream);
            self.out.push_control(messages::ack("unsubscribe", &about));
        }
        Ok(())
    }
}

/// The optional `resume` of a subscribe: `{"epoch": E, "after": N}`, with optional per-class
/// `critical` / `important` overriding `after` (default 0).
fn resume_point(v: &Value) -> Result<Option<Resume>, ProtoError> {
    let Some(r) = v.get("resume").filter(|r| !r.is_null()) else {
        return Ok(None);
    };
    let bad = |m: &str| ProtoError::new(Code::Malformed, format!("\"resume\": {m}"));
    let Some(epoch) = r.get("epoch").and_then(Value::as_u64) else {
        return Err(bad("\"epoch\" (a non-negative integer) is required"));
    };
    let seq = |k: &str, default: u64| match r.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .ok_or_else(|| bad(&format!("\"{k}\" must be a non-negative integer"))),
    };
    let after = seq("after", 0)?;
    Ok(Some(Resume {
        epoch,
        critical: seq("critical", after)?,
        important: seq("important", after)?,
    }))
}

/// The optional `conflate` of a subscribe: `"key"`, `"stream"`, or `"none"` / absent.
fn conflate_mode(v: &Value) -> Result<Option<Conflate>, ProtoError> {
    match v.get("conflate") {
        None | Some(Value::Null) => Ok(None),
        Some(c) => match c.as_str() {
            Some("none") => Ok(None),
            Some("key") => Ok(Some(Conflate::Key)),
            Some("stream") => Ok(Some(Conflate::Stream)),
            _ => Err(ProtoError::new(
                Code::Malformed,
                "\"conflate\" must be \"key\", \"stream\" or \"none\"",
            )),
        },
    }
}

/// Parses the JSON form of produce.
fn json_produce(v: &Value) -> Result<Produce<'_>, ProtoError> {
    let bad = |m: &str| ProtoError::new(Code::Malformed, m.to_string());
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| bad(&format!("\"{k}\" (a string) is required")))
    };
    let stream = field("stream")?;
    let modality = field("modality")?;
    let key = match v.get("key") {
        Some(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Some(Value::Number(n)) if n.is_u64() => Cow::Owned(n.to_string()),
        _ => {
            return Err(bad(
                "\"key\" (a string or a non-negative integer) is required",
            ))
        }
    };
    let priority = match v.get("priority") {
        None => Priority::Important,
        Some(p) => p.as_str().and_then(codec::priority_named).ok_or_else(|| {
            ProtoError::new(
                Code::BadPriority,
                "\"priority\" must be \"critical\", \"important\" or \"bulk\"",
            )
        })?,
    };
    let Some(values) = v.get("values").and_then(Value::as_array) else {
        return Err(bad("\"values\" (an array of numbers) is required"));
    };
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for x in values {
        let f = x
            .as_f64()
            .ok_or_else(|| bad("\"values\" must hold numbers only"))?;
        bytes.extend_from_slice(&(f as f32).to_le_bytes());
    }
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(Produce {
        stream,
        key,
        modality,
        dtype: DType::F32,
        priority,
        n: values.len(),
        payload: Bytes::from(bytes),
        last: flag("last"),
        ack: flag("ack"),
        id: v.get("id").cloned(),
    })
}
