//! Client text messages (docs/PROTOCOL.md section 3): `hello`, `ping`, `subscribe`,
//! `unsubscribe` and the JSON form of `produce`, decoded from their parsed JSON.

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::Value;

use super::code::{Code, ProtoError};
use super::frame::{priority_named, VERSION, VERSION_2};
use super::produce::Produce;
use crate::engine::Priority;
use crate::tensor::DType;

/// A client text (JSON) message, decoded; it borrows from the parsed JSON value.
#[derive(Debug, Clone)]
pub enum ClientMessage<'a> {
    /// `hello` with protocol version 1 or 2; `binary` when results are to be sent as binary
    /// frames.
    Hello {
        /// `"results": "binary"`.
        binary: bool,
        /// The protocol version of the session ([`VERSION`] or [`VERSION_2`]).
        version: u8,
        /// `"batch_results": true`: results may come several to a frame (PROTOCOL 4.5).
        batch: bool,
        /// `"send_queue"`: the CRITICAL, IMPORTANT and BULK send queue sizes asked for (each
        /// at least 1; None where not asked, PROTOCOL 2).
        send_queue: [Option<usize>; 3],
    },
    /// `ping`.
    Ping,
    /// `subscribe` to a stream.
    Subscribe {
        /// Stream name (not yet checked against `max_name_bytes`).
        stream: &'a str,
    },
    /// `unsubscribe` from a stream.
    Unsubscribe {
        /// Stream name.
        stream: &'a str,
    },
    /// `produce` in its JSON form.
    Produce(Produce<'a>),
}

/// `hello`'s optional `send_queue`: `{"critical": N, "important": N, "bulk": N}`, each key
/// optional, each N a positive integer.
fn send_queue_of(v: Option<&Value>) -> Result<[Option<usize>; 3], ProtoError> {
    let mut out = [None; 3];
    let Some(v) = v else {
        return Ok(out);
    };
    let bad = || {
        ProtoError::new(
            Code::Malformed,
            "\"send_queue\" must be an object of \"critical\", \"important\" and \"bulk\" \
             sizes, each a positive integer",
        )
    };
    let o = v.as_object().ok_or_else(bad)?;
    for (k, n) in o {
        let slot = match k.as_str() {
            "critical" => 0,
            "important" => 1,
            "bulk" => 2,
            _ => return Err(bad()),
        };
        let n = n.as_u64().filter(|n| *n >= 1).ok_or_else(bad)?;
        out[slot] = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    Ok(out)
}

/// Parses a client text frame as JSON (the first step of [`decode_client_message`]).
pub fn parse_client_json(text: &str) -> Result<Value, ProtoError> {
    serde_json::from_str(text)
        .map_err(|e| ProtoError::new(Code::Malformed, format!("not JSON: {e}")))
}

/// Decodes a parsed client text message: its `type` and that type's fields.
pub fn decode_client_message(v: &Value) -> Result<ClientMessage<'_>, ProtoError> {
    let Some(ty) = v.get("type").and_then(Value::as_str) else {
        return Err(ProtoError::new(
            Code::Malformed,
            "a text message must be a JSON object with a string \"type\"",
        ));
    };
    match ty {
        "hello" => {
            let version = match v.get("version").and_then(Value::as_u64) {
                Some(1) => VERSION,
                Some(2) => VERSION_2,
                _ => {
                    let version = v.get("version").unwrap_or(&Value::Null);
                    return Err(ProtoError::new(
                        Code::UnsupportedVersion,
                        format!(
                            "protocol version {version} is not supported (this server speaks 1 and 2)"
                        ),
                    ));
                }
            };
            let binary = match v.get("results").map(|r| r.as_str()) {
                None | Some(Some("json")) => false,
                Some(Some("binary")) => true,
                _ => {
                    return Err(ProtoError::new(
                        Code::Malformed,
                        "\"results\" must be \"json\" or \"binary\"",
                    ))
                }
            };
            let batch = match v.get("batch_results") {
                None | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) if binary => true,
                Some(Value::Bool(true)) => {
                    return Err(ProtoError::new(
                        Code::Malformed,
                        "\"batch_results\" needs \"results\": \"binary\"",
                    ))
                }
                Some(_) => {
                    return Err(ProtoError::new(
                        Code::Malformed,
                        "\"batch_results\" must be true or false",
                    ))
                }
            };
            Ok(ClientMessage::Hello {
                binary,
                version,
                batch,
                send_queue: send_queue_of(v.get("send_queue"))?,
            })
        }
        "ping" => Ok(ClientMessage::Ping),
        "subscribe" | "unsubscribe" => {
            let Some(stream) = v.get("stream").and_then(Value::as_str) else {
                return Err(ProtoError::new(
                    Code::Malformed,
                    "\"stream\" (a string) is required",
                ));
            };
            Ok(if ty == "subscribe" {
                ClientMessage::Subscribe { stream }
            } else {
                ClientMessage::Unsubscribe { stream }
            })
        }
        "produce" => json_produce(v).map(ClientMessage::Produce),
        other => Err(ProtoError::new(
            Code::UnknownType,
            format!(
                "unknown message type \"{other}\" (hello, subscribe, unsubscribe, produce, ping)"
            ),
        )),
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
        Some(p) => p.as_str().and_then(priority_named).ok_or_else(|| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_decode() {
        let msg = |t: &str| {
            parse_client_json(t).and_then(|v| decode_client_message(&v).map(|m| format!("{m:?}")))
        };
        let code = |t: &str| msg(t).unwrap_err().code;
        assert!(msg(r#"{"type":"hello","version":1,"results":"binary"}"#)
            .unwrap()
            .contains("binary: true"));
        assert!(msg(r#"{"type":"hello","version":2}"#)
            .unwrap()
            .contains("version: 2"));
        assert_eq!(
            code(r#"{"type":"hello","version":3}"#),
            Code::UnsupportedVersion
        );
        assert_eq!(
            code(r#"{"type":"hello","version":1,"results":3}"#),
            Code::Malformed
        );
        assert!(
            msg(r#"{"type":"hello","version":2,"send_queue":{"important":5000,"bulk":7}}"#)
                .unwrap()
                .contains("send_queue: [None, Some(5000), Some(7)]")
        );
        for bad in [
            r#""send_queue":3"#,
            r#""send_queue":{"important":0}"#,
            r#""send_queue":{"important":-1}"#,
            r#""send_queue":{"important":2.5}"#,
            r#""send_queue":{"control":10}"#,
        ] {
            let t = format!(r#"{{"type":"hello","version":2,{bad}}}"#);
            assert_eq!(code(&t), Code::Malformed, "{t}");
        }
        assert_eq!(code("[1]"), Code::Malformed);
        assert_eq!(code("{"), Code::Malformed);
        assert_eq!(code(r#"{"type":"nope"}"#), Code::UnknownType);
        assert_eq!(code(r#"{"type":"subscribe"}"#), Code::Malformed);
        assert_eq!(
            code(
                r#"{"type":"produce","stream":"s","key":1,"modality":"m","values":[],"priority":"x"}"#
            ),
            Code::BadPriority
        );
        let v = parse_client_json(
            r#"{"type":"produce","stream":"s","key":12,"modality":"m","values":[1,2.5],"id":"r"}"#,
        )
        .unwrap();
        let Ok(ClientMessage::Produce(p)) = decode_client_message(&v) else {
            panic!("not a produce message");
        };
        assert_eq!((p.stream, &*p.key, p.modality, p.n), ("s", "12", "m", 2));
        assert_eq!(p.priority, Priority::Important);
        assert_eq!(&p.payload[4..], &2.5f32.to_le_bytes());
        assert_eq!(p.id, Some(Value::from("r")));
    }
}
