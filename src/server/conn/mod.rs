//! One connection's handler: reads frames, validates them (docs/DESIGN.md section 7: every bad input gets
//! a typed error and the connection goes on where it can), answers control messages, and hands
//! produce messages to the pipeline. Its one writer task (`writer.rs`) owns the socket's
//! sending half; everything this side says goes through the connection's CONTROL queue. Its
//! `samples` frames have their own room ([`samples`]).

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc::error::TrySendError, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::fanout::outbound::{Conflate, Outbound};
use super::fanout::replay::Resume;
use super::fanout::writer;
use super::ingest::pipeline::refuse;
use super::ingest::queue::{Ingest, IngestMsg};
use super::shared::Shared;
use super::split::{ReadSide, WriteSide};
use crate::engine::Priority;
use crate::protocol::notices::{self, About};
use crate::protocol::{self, ClientMessage, Code, Produce, ProtoError};
use crate::tensor::find_non_finite_bytes;

pub(crate) mod bench;
pub(crate) mod frames;
mod samples;

use frames::{FrameReader, Incoming, ReadError};

/// A stream name or key of 1 to `max` bytes (`max_name_bytes`).
fn check_name(max: usize, what: &str, s: &str) -> Result<(), ProtoError> {
    if s.is_empty() || s.len() > max {
        return Err(ProtoError::new(
            Code::InvalidName,
            format!("{what} must be 1 to {max} bytes, got {}", s.len()),
        ));
    }
    Ok(())
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
    mut reader: FrameReader<ReadSide>,
    sink: WebSocketStream<WriteSide>,
    out: Arc<Outbound>,
    mut stop: watch::Receiver<bool>,
) {
    let m = Arc::clone(&shared.m);
    let writer = tokio::spawn(writer::write_loop(
        Arc::clone(&out),
        sink,
        shared.writer_cfg(),
        m,
    ));
    let mut c = Conn {
        draining: *stop.borrow(),
        shared,
        out: Arc::clone(&out),
        streams: HashSet::new(),
        subscribed: HashSet::new(),
    };
    loop {
        tokio::select! {
            msg = reader.next() => match msg {
                Ok(Some(Incoming::Text(t))) => {
                    out.reserve_room().await;
                    c.text(t.as_str()).await
                }
                Ok(Some(Incoming::Binary(b))) => {
                    out.reserve_room().await;
                    c.binary(b).await
                }
                Ok(Some(Incoming::Ping(p))) => {
                    out.reserve_room().await;
                    out.push_control(Message::Pong(p));
                }
                Ok(Some(Incoming::Close(code))) => {
                    // Echo the client's code (RFC 6455 5.5.1), after nothing more.
                    out.close_now(code.unwrap_or(1000), "closed_by_peer");
                    break;
                }
                Ok(None) => {
                    out.stop();
                    break;
                }
                Err(e) => {
                    tracing::debug!(conn = out.id, "read error: {e}");
                    match (&e, e.close_code()) {
                        // Said in an error first (PROTOCOL 1), then closed after what is queued.
                        (ReadError::TooLarge { max, .. }, Some(code)) => {
                            let msg = format!("{e} (max_frame_bytes {max})");
                            c.error(Code::FrameTooLarge, &msg, &About::default());
                            out.close_after_drain(code, "frame_too_large");
                        }
                        (_, Some(code)) => out.close_now(code, "protocol_error"),
                        (_, None) => out.stop(),
                    }
                    break;
                }
            },
            _ = out.done() => break,
            r = stop.changed(), if !c.draining => {
                c.draining = true;
                if r.is_ok() {
                    out.push_control(notices::shutdown(c.shared.cfg.shutdown_grace.as_secs_f64() * 1e3));
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
        self.out.push_control(notices::error(code, msg, about));
    }

    fn check_name(&self, what: &str, s: &str) -> Result<(), ProtoError> {
        check_name(self.shared.cfg.max_name_bytes, what, s)
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
        if frame.get(3) == Some(&protocol::KIND_SAMPLES) {
            return self.samples(frame).await;
        }
        let p = match protocol::parse_produce(&frame) {
            Ok(p) => p,
            Err(e) => return self.frame_error(&frame, e),
        };
        let pr = p.to_produce();
        self.produce(pr).await
    }

    /// An undecodable binary frame: the error names its request id when the header has one.
    fn frame_error(&self, frame: &[u8], e: ProtoError) {
        let id = Value::from(protocol::produce_id(frame));
        let id = (id != 0).then_some(&id);
        self.error(
            e.code,
            &e.message,
            &About {
                id,
                ..About::default()
            },
        )
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
        let refused = match tx.try_push(IngestMsg::One(ing)) {
            Ok(()) => return,
            Err(TrySendError::Closed(_)) => {
                self.out.end_request();
                return self.error(Code::Shutdown, "the server is shutting down", &about);
            }
            Err(TrySendError::Full(_)) if p.priority == Priority::Bulk => true,
            Err(TrySendError::Full(msg)) => {
                let wait = self.shared.cfg.ingest_wait;
                match tokio::time::timeout(wait, tx.push_waiting(msg)).await {
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
            refuse(&self.shared, &self.out, p.priority, &about, why);
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
        let v = match protocol::parse_client_json(t) {
            Ok(v) => v,
            Err(e) => return self.error(e.code, &e.message, &About::default()),
        };
        let id = v.get("id");
        let about = About {
            id,
            ..About::default()
        };
        match protocol::decode_client_message(&v) {
            Ok(ClientMessage::Hello {
                binary,
                version,
                batch,
                send_queue,
            }) => {
                self.out.set_encoding(binary, version);
                self.out.set_batch_results(batch);
                // Asked-for queue sizes, capped at `max_send_queue`; the welcome says what
                // this connection got (PROTOCOL 2).
                if send_queue.iter().any(Option::is_some) {
                    let (now, max) = (self.out.send_queue(), self.shared.cfg.max_send_queue);
                    let mut caps = now;
                    for (c, asked) in caps.iter_mut().zip(send_queue) {
                        if let Some(n) = asked {
                            *c = n.clamp(1, max);
                        }
                    }
                    self.out.set_send_queue(caps);
                }
                self.out.push_control(notices::welcome(
                    &self.shared.welcome,
                    binary,
                    version,
                    batch,
                    self.out.send_queue(),
                ));
            }
            Ok(ClientMessage::Ping) => self.out.push_control(notices::pong(id)),
            Ok(ClientMessage::Subscribe { stream }) => {
                if let Err(e) = self.subscription(true, stream, &v) {
                    self.error(e.code, &e.message, &about);
                }
            }
            Ok(ClientMessage::Unsubscribe { stream }) => {
                if let Err(e) = self.subscription(false, stream, &v) {
                    self.error(e.code, &e.message, &about);
                }
            }
            Ok(ClientMessage::Produce(p)) => self.produce(p).await,
            Err(e) => {
                self.error(e.code, &e.message, &about);
                // Only `hello` is refused for its version: the connection cannot go on.
                if e.code == Code::UnsupportedVersion {
                    self.out.close_after_drain(1002, "unsupported_version");
                }
            }
        }
    }

    fn subscription(&mut self, sub: bool, stream: &str, v: &Value) -> Result<(), ProtoError> {
        let id = v.get("id");
        self.check_name("stream", stream)?;
        let about = About {
            id,
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
                    notices::ack_subscribe(&about, a.epoch, a.last, a.replay)
                });
            if let Some(gw) = &sh.nats {
                // Other gateways' results of the stream too (docs/DESIGN.md section 11).
                gw.follow(&s);
            }
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
            self.out.push_control(notices::ack("unsubscribe", &about));
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
