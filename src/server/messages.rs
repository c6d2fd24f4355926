//! JSON control messages the server sends (docs/PROTOCOL.md section 3): `welcome`, `ack`,
//! `error`, `notice`s.

use serde_json::{json, Map, Value};
use tokio_tungstenite::tungstenite::Message;

use super::codec::{Code, VERSION_2};
use super::config::ServerConfig;
use crate::model::FusionHead;

/// What an error or ack is about (fields present only when known).
#[derive(Debug, Default, Clone)]
pub(crate) struct About<'a> {
    pub id: Option<&'a Value>,
    pub stream: Option<&'a str>,
    pub key: Option<&'a str>,
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

/// An `error` message.
pub(crate) fn error(code: Code, message: &str, about: &About<'_>) -> Message {
    let mut o = Map::new();
    o.insert("type".into(), "error".into());
    o.insert("code".into(), code.as_str().into());
    o.insert("message".into(), message.into());
    o.insert("retry".into(), (code == Code::Overloaded).into());
    put_about(&mut o, about);
    Message::text(Value::Object(o).to_string())
}

/// An `ack` message.
pub(crate) fn ack(op: &str, about: &About<'_>) -> Message {
    let mut o = Map::new();
    o.insert("type".into(), "ack".into());
    o.insert("op".into(), op.into());
    put_about(&mut o, about);
    Message::text(Value::Object(o).to_string())
}

/// The `ack` of a `samples` frame: how many samples it brought.
pub(crate) fn ack_samples(about: &About<'_>, samples: usize) -> Message {
    let mut o = Map::new();
    o.insert("type".into(), "ack".into());
    o.insert("op".into(), "samples".into());
    put_about(&mut o, about);
    o.insert("samples".into(), samples.into());
    Message::text(Value::Object(o).to_string())
}

/// The `ack` of a subscribe: the server's epoch, the stream's last stream seq (later results
/// come live) and how many results were set aside for replay.
pub(crate) fn ack_subscribe(about: &About<'_>, epoch: u64, last: u64, replay: usize) -> Message {
    let mut o = Map::new();
    o.insert("type".into(), "ack".into());
    o.insert("op".into(), "subscribe".into());
    put_about(&mut o, about);
    o.insert("epoch".into(), epoch.into());
    o.insert("last".into(), last.into());
    o.insert("replay".into(), replay.into());
    Message::text(Value::Object(o).to_string())
}

/// A `shed` notice (a BULK produce message refused under saturation).
pub(crate) fn shed(about: &About<'_>, reason: &str) -> Message {
    let mut o = Map::new();
    o.insert("type".into(), "notice".into());
    o.insert("kind".into(), "shed".into());
    o.insert("reason".into(), reason.into());
    put_about(&mut o, about);
    Message::text(Value::Object(o).to_string())
}

/// A `pong`.
pub(crate) fn pong(id: Option<&Value>) -> Message {
    let mut o = Map::new();
    o.insert("type".into(), "pong".into());
    if let Some(id) = id {
        o.insert("id".into(), id.clone());
    }
    Message::text(Value::Object(o).to_string())
}

/// A `device` notice.
pub(crate) fn device(name: &str, state: &str) -> Message {
    Message::text(
        json!({"type": "notice", "kind": "device", "device": name, "state": state}).to_string(),
    )
}

/// The `shutdown` notice.
pub(crate) fn shutdown(grace_ms: f64) -> Message {
    Message::text(json!({"type": "notice", "kind": "shutdown", "grace_ms": grace_ms}).to_string())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `welcome` body without `results` and `version` (set per connection).
pub(crate) fn welcome_base(cfg: &ServerConfig, head: &FusionHead, epoch: u64) -> Value {
    let mods: Vec<Value> = head
        .modalities
        .iter()
        .map(|m| json!({"name": m.name, "width": m.width}))
        .collect();
    let q = &cfg.send_queue;
    json!({
        "type": "welcome",
        "version": VERSION_2,
        "versions": [1, VERSION_2],
        "server": concat!("fusion-engine/", env!("CARGO_PKG_VERSION")),
        "epoch": epoch,
        "head": {"modalities": mods, "dim": head.dim},
        "limits": {
            "max_frame_bytes": cfg.max_frame_bytes,
            "max_name_bytes": cfg.max_name_bytes,
            "max_streams_per_connection": cfg.max_streams_per_connection,
            "max_open_samples": cfg.max_open_samples,
            "align_timeout_ms": ms(cfg.align_timeout),
            "min_modalities": cfg.min_modalities,
            "max_batch": cfg.max_batch,
            "max_batch_delay_ms": ms(cfg.max_batch_delay),
            "send_queue": {"critical": q.critical, "important": q.important,
                           "bulk": q.bulk, "control": q.control},
            "send_timeout_ms": ms(cfg.send_timeout),
            "heartbeat_interval_ms": ms(cfg.heartbeat_interval),
            "replay_messages": cfg.replay_messages,
            "replay_age_ms": ms(cfg.replay_age),
        },
    })
}

/// The `welcome` for a connection speaking `version`.
pub(crate) fn welcome(base: &Value, binary: bool, version: u8, batch: bool) -> Message {
    let mut v = base.clone();
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

/// One `error` (or, for shed BULK samples, one `shed` notice) about several samples of one
/// stream: `keys` lists them all, `key` is set too when there is exactly one.
pub(crate) fn about_samples(
    code: Code,
    message: &str,
    stream: &str,
    keys: &[String],
    shed: bool,
) -> Message {
    let mut o = Map::new();
    if shed {
        o.insert("type".into(), "notice".into());
        o.insert("kind".into(), "shed".into());
        o.insert("reason".into(), message.into());
    } else {
        o.insert("type".into(), "error".into());
        o.insert("code".into(), code.as_str().into());
        o.insert("message".into(), message.into());
        o.insert("retry".into(), (code == Code::Overloaded).into());
    }
    o.insert("stream".into(), stream.into());
    if let [k] = keys {
        o.insert("key".into(), k.as_str().into());
    }
    o.insert(
        "keys".into(),
        keys.iter().map(|k| Value::from(k.as_str())).collect(),
    );
    Message::text(Value::Object(o).to_string())
}
