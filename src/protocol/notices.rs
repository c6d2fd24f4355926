//! Every JSON text message the server sends (docs/PROTOCOL.md sections 3 and 5): `welcome`,
//! `ack`, `error`, `pong` and each `notice` (`shed`, `device`, `shutdown`, `backpressure`,
//! `ingest_backpressure`, `dropped`, `unrecoverable`). The one place their JSON is built.

use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use super::code::Code;
use super::frame::VERSION_2;
use crate::model::FusionHead;

/// Names of the send classes, index = class (PROTOCOL 5: CONTROL, then the three priorities).
pub const CLASS_NAMES: [&str; 4] = ["control", "critical", "important", "bulk"];

/// What an error or ack is about (fields present only when known).
#[derive(Debug, Default, Clone)]
pub struct About<'a> {
    /// The request id to echo.
    pub id: Option<&'a Value>,
    /// Stream.
    pub stream: Option<&'a str>,
    /// Sample key.
    pub key: Option<&'a str>,
    /// Modality.
    pub modality: Option<&'a str>,
}

fn put_about(o: &mut Map<String, Value>, a: &About<'_>) {
    if let Some(id) = a.id {
        o.insert("id".into(), id.clone());
    }
    if let Some(s) = a.stream {
        o.insert("stream".into(), s.into());
    }
    if let Some(k) = a.key {
        o.insert("key".into(), k.into());
    }
    if let Some(m) = a.modality {
        o.insert("modality".into(), m.into());
    }
}

fn put_error(o: &mut Map<String, Value>, code: Code, message: &str) {
    o.insert("type".into(), "error".into());
    o.insert("code".into(), code.as_str().into());
    o.insert("message".into(), message.into());
    o.insert("retry".into(), (code == Code::Overloaded).into());
}

fn put_shed(o: &mut Map<String, Value>, reason: &str) {
    o.insert("type".into(), "notice".into());
    o.insert("kind".into(), "shed".into());
    o.insert("reason".into(), reason.into());
}

fn text(o: Map<String, Value>) -> Message {
    Message::text(Value::Object(o).to_string())
}

/// An `error` message.
pub fn error(code: Code, message: &str, about: &About<'_>) -> Message {
    let mut o = Map::new();
    put_error(&mut o, code, message);
    put_about(&mut o, about);
    text(o)
}

fn ack_map(op: &str, about: &About<'_>) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("type".into(), "ack".into());
    o.insert("op".into(), op.into());
    put_about(&mut o, about);
    o
}

/// An `ack` message.
pub fn ack(op: &str, about: &About<'_>) -> Message {
    text(ack_map(op, about))
}

/// The `ack` of a `samples` frame: how many samples it brought.
pub fn ack_samples(about: &About<'_>, samples: usize) -> Message {
    let mut o = ack_map("samples", about);
    o.insert("samples".into(), samples.into());
    text(o)
}

/// The `ack` of a subscribe: the server's epoch, the stream's last stream seq (later results
/// come live) and how many results were set aside for replay.
pub fn ack_subscribe(about: &About<'_>, epoch: u64, last: u64, replay: usize) -> Message {
    let mut o = ack_map("subscribe", about);
    o.insert("epoch".into(), epoch.into());
    o.insert("last".into(), last.into());
    o.insert("replay".into(), replay.into());
    text(o)
}

/// A `shed` notice (a BULK produce message refused under saturation).
pub fn shed(about: &About<'_>, reason: &str) -> Message {
    let mut o = Map::new();
    put_shed(&mut o, reason);
    put_about(&mut o, about);
    text(o)
}

/// One `error` (or, for shed BULK samples, one `shed` notice) about several samples of one
/// stream: `keys` lists them all, `key` is set too when there is exactly one.
pub fn about_samples(
    code: Code,
    message: &str,
    stream: &str,
    keys: &[&str],
    shed: bool,
) -> Message {
    let mut o = Map::new();
    if shed {
        put_shed(&mut o, message);
    } else {
        put_error(&mut o, code, message);
    }
    o.insert("stream".into(), stream.into());
    if let [k] = keys {
        o.insert("key".into(), (*k).into());
    }
    o.insert(
        "keys".into(),
        keys.iter().map(|&k| Value::from(k)).collect(),
    );
    text(o)
}

/// A `pong`.
pub fn pong(id: Option<&Value>) -> Message {
    let mut o = Map::new();
    o.insert("type".into(), "pong".into());
    if let Some(id) = id {
        o.insert("id".into(), id.clone());
    }
    text(o)
}

/// A `device` notice.
pub fn device(name: &str, state: &str) -> Message {
    Message::text(
        json!({"type": "notice", "kind": "device", "device": name, "state": state}).to_string(),
    )
}

/// A `heartbeat` (PROTOCOL 3): the server's clock, ms since the Unix epoch.
pub fn heartbeat(ts_ms: u64) -> Message {
    Message::text(format!("{{\"type\":\"heartbeat\",\"ts_ms\":{ts_ms}}}"))
}

/// The `shutdown` notice.
pub fn shutdown(grace_ms: f64) -> Message {
    Message::text(json!({"type": "notice", "kind": "shutdown", "grace_ms": grace_ms}).to_string())
}

/// A send-queue `backpressure` notice (PROTOCOL 5). `queued`/`capacity`: all data queues;
/// `class_*`: the class queue last pushed or popped.
pub fn backpressure(
    on: bool,
    queued: usize,
    capacity: usize,
    class: usize,
    class_queued: usize,
    class_capacity: usize,
) -> Message {
    let v = json!({
        "type": "notice", "kind": "backpressure",
        "state": if on { "on" } else { "off" }, "queued": queued, "capacity": capacity,
        "class": CLASS_NAMES[class.min(3)], "class_queued": class_queued,
        "class_capacity": class_capacity,
    });
    Message::text(v.to_string())
}

/// An `ingest_backpressure` notice to producers; `fill` in 0..=1, sent with 3 decimals.
pub fn ingest_backpressure(state: &str, fill: f64) -> Message {
    let fill = (fill.clamp(0.0, 1.0) * 1000.0).round() / 1000.0;
    Message::text(
        json!({"type": "notice", "kind": "ingest_backpressure", "state": state, "fill": fill})
            .to_string(),
    )
}

/// A `dropped` notice: `count` results of `class` dropped for `reason`, in seq `ranges`;
/// `total` dropped on this connection so far.
pub fn dropped(
    class: usize,
    reason: &str,
    count: u64,
    ranges: &[(u64, u64)],
    total: u64,
) -> Message {
    let v = json!({
        "type": "notice", "kind": "dropped",
        "class": CLASS_NAMES[class.min(3)], "reason": reason,
        "count": count, "ranges": ranges, "total": total,
    });
    Message::text(v.to_string())
}

/// An `unrecoverable` notice: results `first..=last` of `stream` (`last` None: every one from
/// `first` on, of the previous epoch) will not be replayed.
pub fn unrecoverable(
    stream: &str,
    class: &str,
    first: u64,
    last: Option<u64>,
    reason: &str,
) -> Message {
    let v: Value = json!({
        "type": "notice", "kind": "unrecoverable", "stream": stream,
        "class": class, "first": first, "last": last, "reason": reason,
    });
    Message::text(v.to_string())
}

/// The limits a server announces in its `welcome` (PROTOCOL 3).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest frame accepted.
    pub max_frame_bytes: usize,
    /// Longest stream, key or modality name.
    pub max_name_bytes: usize,
    /// Streams one connection may use.
    pub max_streams_per_connection: usize,
    /// Samples waiting for modalities.
    pub max_open_samples: usize,
    /// How long a sample waits for its modalities.
    pub align_timeout: Duration,
    /// Modalities a sample needs at the align timeout.
    pub min_modalities: usize,
    /// Samples per batch.
    pub max_batch: usize,
    /// Longest wait to fill a batch.
    pub max_batch_delay: Duration,
    /// Send queue capacity per class: CONTROL, CRITICAL, IMPORTANT, BULK.
    pub send_queue: [usize; 4],
    /// The largest CRITICAL, IMPORTANT or BULK queue a `hello` may ask for.
    pub max_send_queue: usize,
    /// How long a send may block before a slow consumer is closed.
    pub send_timeout: Duration,
    /// Ping interval.
    pub heartbeat_interval: Duration,
    /// Results kept per stream for replay.
    pub replay_messages: usize,
    /// Oldest result kept for replay.
    pub replay_age: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `welcome` body without `results` and `version` (set per connection by [`welcome`]).
pub fn welcome_base(l: &Limits, head: &FusionHead, epoch: u64) -> Value {
    let mods: Vec<Value> = head
        .modalities
        .iter()
        .map(|m| json!({"name": m.name, "width": m.width}))
        .collect();
    let [control, critical, important, bulk] = l.send_queue;
    json!({
        "type": "welcome",
        "version": VERSION_2,
        "versions": [1, VERSION_2],
        "server": concat!("fusion-engine/", env!("CARGO_PKG_VERSION")),
        "epoch": epoch,
        "head": {"modalities": mods, "dim": head.dim},
        "limits": {
            "max_frame_bytes": l.max_frame_bytes,
            "max_name_bytes": l.max_name_bytes,
            "max_streams_per_connection": l.max_streams_per_connection,
            "max_open_samples": l.max_open_samples,
            "align_timeout_ms": ms(l.align_timeout),
            "min_modalities": l.min_modalities,
            "max_batch": l.max_batch,
            "max_batch_delay_ms": ms(l.max_batch_delay),
            "send_queue": {"critical": critical, "important": important,
                           "bulk": bulk, "control": control},
            "max_send_queue": l.max_send_queue,
            "send_timeout_ms": ms(l.send_timeout),
            "heartbeat_interval_ms": ms(l.heartbeat_interval),
            "replay_messages": l.replay_messages,
            "replay_age_ms": ms(l.replay_age),
        },
    })
}

/// The `welcome` for a connection speaking `version`, whose CRITICAL, IMPORTANT and BULK send
/// queues hold `send_queue` results (what its `hello` asked for, or the server's defaults).
pub fn welcome(
    base: &Value,
    binary: bool,
    version: u8,
    batch: bool,
    send_queue: [usize; 3],
) -> Message {
    let mut v = base.clone();
    if let Some(q) = v
        .pointer_mut("/limits/send_queue")
        .and_then(Value::as_object_mut)
    {
        for (name, n) in ["critical", "important", "bulk"]
            .into_iter()
            .zip(send_queue)
        {
            q.insert(name.into(), n.into());
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("version".into(), version.into());
        o.insert(
            "results".into(),
            if binary { "binary" } else { "json" }.into(),
        );
        o.insert("batch_results".into(), batch.into());
    }
    Message::text(v.to_string())
}
