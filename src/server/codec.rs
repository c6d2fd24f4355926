//! The wire format of docs/PROTOCOL.md: binary produce frames (parse), client JSON control
//! messages (decode), binary and JSON result frames (encode), and the stable error codes. Pure
//! functions, no I/O: the client uses the same code for the other direction, and the fuzz
//! targets (fuzz/) drive the decoders directly.

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::Value;

use crate::engine::Priority;
use crate::tensor::DType;

pub use super::samples::{encode_samples, parse_samples, SamplesFrame, KIND_SAMPLES};

/// Protocol version of produce frames (their layout is the same in both protocol versions).
pub const VERSION: u8 = 1;
/// The newest protocol version: results carry the stream seq (32-byte binary header).
pub const VERSION_2: u8 = 2;
/// Binary result flag (version 2): the result is a replay (docs/PROTOCOL.md section 7.4).
pub const RESULT_FLAG_REPLAYED: u8 = 1;
/// First two bytes of every binary frame.
pub const MAGIC: [u8; 2] = *b"FE";
/// Binary `kind`: produce (client to server).
pub const KIND_PRODUCE: u8 = 1;
/// Binary `kind`: result (server to client).
pub const KIND_RESULT: u8 = 2;
/// Binary frame kind: several results in one frame (PROTOCOL 4.5, after `batch_results`).
pub const KIND_RESULTS: u8 = 4;
/// Produce flag: answer with an ack.
pub const FLAG_ACK: u8 = 1;
/// Produce flag: last modality of the sample.
pub const FLAG_LAST: u8 = 2;
/// Produce header length.
pub const PRODUCE_HEADER: usize = 24;
/// Result header length (protocol version 1).
pub const RESULT_HEADER: usize = 24;
/// Result header length (protocol version 2: the stream seq follows the seq).
pub const RESULT_HEADER_V2: usize = 32;

/// Stable error codes of the protocol (section 6 of docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// Undecodable frame or message.
    Malformed,
    /// Protocol version other than 1.
    UnsupportedVersion,
    /// Unknown message type or binary kind.
    UnknownType,
    /// The head has no such modality.
    UnknownModality,
    /// Wrong element count.
    WrongWidth,
    /// Unknown dtype code.
    BadDtype,
    /// Unknown priority.
    BadPriority,
    /// NaN or Inf in the payload.
    NonFinite,
    /// Empty or too long stream or key.
    InvalidName,
    /// Unsubscribe from a stream not subscribed.
    UnknownStream,
    /// Too many distinct streams on one connection.
    TooManyStreams,
    /// The modality already arrived for the open sample.
    DuplicateModality,
    /// Align timeout with fewer than `min_modalities`.
    IncompleteSample,
    /// A bounded queue is full; retry later.
    Overloaded,
    /// The batch failed on the devices.
    DeviceError,
    /// The batch timed out in the engine.
    Timeout,
    /// The server is shutting down.
    Shutdown,
    /// Frame over `max_frame_bytes`.
    FrameTooLarge,
    /// A server bug.
    Internal,
}

impl Code {
    /// The stable machine tag.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::Malformed => "malformed",
            Code::UnsupportedVersion => "unsupported_version",
            Code::UnknownType => "unknown_type",
            Code::UnknownModality => "unknown_modality",
            Code::WrongWidth => "wrong_width",
            Code::BadDtype => "bad_dtype",
            Code::BadPriority => "bad_priority",
            Code::NonFinite => "non_finite",
            Code::InvalidName => "invalid_name",
            Code::UnknownStream => "unknown_stream",
            Code::TooManyStreams => "too_many_streams",
            Code::DuplicateModality => "duplicate_modality",
            Code::IncompleteSample => "incomplete_sample",
            Code::Overloaded => "overloaded",
            Code::DeviceError => "device_error",
            Code::Timeout => "timeout",
            Code::Shutdown => "shutdown",
            Code::FrameTooLarge => "frame_too_large",
            Code::Internal => "internal",
        }
    }

    /// The protocol code for an engine error.
    pub fn of_engine_error(e: &crate::error::Error) -> Code {
        use crate::error::Error as E;
        match e {
            E::Overloaded(_) => Code::Overloaded,
            E::Timeout(_) => Code::Timeout,
            E::Shutdown(_) => Code::Shutdown,
            E::InputNonFinite { .. } => Code::NonFinite,
            E::InputShape { .. } => Code::WrongWidth,
            E::Device { .. } | E::BackendUnavailable { .. } => Code::DeviceError,
            _ => Code::Internal,
        }
    }
}

/// A protocol error: code + human text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// Stable code.
    pub code: Code,
    /// Human-readable explanation.
    pub message: String,
}

impl ProtoError {
    /// A new error.
    pub fn new(code: Code, message: impl Into<String>) -> ProtoError {
        ProtoError {
            code,
            message: message.into(),
        }
    }
}

/// Wire code of a dtype.
pub const fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

pub(crate) fn dtype_of(c: u8) -> Option<DType> {
    match c {
        0 => Some(DType::F32),
        1 => Some(DType::F16),
        2 => Some(DType::BF16),
        _ => None,
    }
}

/// Wire code of a priority.
pub const fn priority_code(p: Priority) -> u8 {
    p as u8
}

/// The priority of a wire code.
pub fn priority_of(c: u8) -> Option<Priority> {
    match c {
        0 => Some(Priority::Critical),
        1 => Some(Priority::Important),
        2 => Some(Priority::Bulk),
        _ => None,
    }
}

/// The priority named in JSON.
pub fn priority_named(s: &str) -> Option<Priority> {
    match s {
        "critical" => Some(Priority::Critical),
        "important" => Some(Priority::Important),
        "bulk" => Some(Priority::Bulk),
        _ => None,
    }
}

/// Lower-case name of a priority.
pub const fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "critical",
        Priority::Important => "important",
        Priority::Bulk => "bulk",
    }
}

/// A parsed binary produce frame; `payload` shares the frame's buffer.
#[derive(Debug, Clone)]
pub struct ProduceFrame<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// Sample key.
    pub key: &'a str,
    /// Modality name.
    pub modality: &'a str,
    /// Payload dtype.
    pub dtype: DType,
    /// Class.
    pub priority: Priority,
    /// Ack requested.
    pub ack: bool,
    /// Last modality of the sample.
    pub last: bool,
    /// Request id (0 = none).
    pub id: u32,
    /// Element count.
    pub n: usize,
    /// Little-endian elements.
    pub payload: Bytes,
}

pub(crate) fn u16_at(b: &[u8], i: usize) -> usize {
    u16::from_le_bytes([b[i], b[i + 1]]) as usize
}

pub(crate) fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Request id of a frame whose header is long enough, for error replies (0 otherwise).
pub fn produce_id(frame: &[u8]) -> u32 {
    if frame.len() >= PRODUCE_HEADER {
        u32_at(frame, 16)
    } else {
        0
    }
}

/// The header fields produce (4.1) and samples (4.4) frames share: the length, magic,
/// version, kind (`kind`, else `unknown_type`), dtype and priority; returns those two.
pub(crate) fn client_header(b: &[u8], kind: u8) -> Result<(DType, Priority), ProtoError> {
    let bad = |m: String| Err(ProtoError::new(Code::Malformed, m));
    if b.len() < PRODUCE_HEADER {
        return bad(format!(
            "binary frame of {} bytes is shorter than the {PRODUCE_HEADER}-byte header",
            b.len()
        ));
    }
    if b[0..2] != MAGIC {
        return bad("binary frame does not start with the magic \"FE\"".into());
    }
    if b[2] != VERSION {
        return Err(ProtoError::new(
            Code::UnsupportedVersion,
            format!(
                "binary frame version {} (this server speaks {VERSION})",
                b[2]
            ),
        ));
    }
    if b[3] != kind {
        return Err(ProtoError::new(
            Code::UnknownType,
            format!(
                "binary frame kind {} (clients send 1 = produce or 3 = samples)",
                b[3]
            ),
        ));
    }
    let Some(dtype) = dtype_of(b[4]) else {
        return Err(ProtoError::new(
            Code::BadDtype,
            format!("dtype code {} (0 f32, 1 f16, 2 bf16)", b[4]),
        ));
    };
    let Some(priority) = priority_of(b[5]) else {
        return Err(ProtoError::new(
            Code::BadPriority,
            format!("priority code {} (0 critical, 1 important, 2 bulk)", b[5]),
        ));
    };
    Ok((dtype, priority))
}

/// Parses a binary produce frame (header, lengths, UTF-8); widths are checked by the caller.
pub fn parse_produce(frame: &Bytes) -> Result<ProduceFrame<'_>, ProtoError> {
    let b = &frame[..];
    let bad = |m: String| Err(ProtoError::new(Code::Malformed, m));
    let (dtype, priority) = client_header(b, KIND_PRODUCE)?;
    let flags = b[6];
    if flags & !(FLAG_ACK | FLAG_LAST) != 0 || b[7] != 0 || u16_at(b, 14) != 0 {
        return bad("reserved header bits are not zero".into());
    }
    let (sl, kl, ml) = (u16_at(b, 8), u16_at(b, 10), u16_at(b, 12));
    let n = u32_at(b, 20) as usize;
    let expected = (PRODUCE_HEADER + sl + kl + ml) as u64 + n as u64 * dtype.size() as u64;
    if b.len() as u64 != expected {
        return bad(format!(
            "binary frame is {} bytes; its header says {expected} (24 + {sl} + {kl} + {ml} + {n} x {})",
            b.len(),
            dtype.size()
        ));
    }
    let text = |from: usize, len: usize, what: &str| {
        std::str::from_utf8(&b[from..from + len])
            .map_err(|_| ProtoError::new(Code::Malformed, format!("{what} is not UTF-8")))
    };
    let s0 = PRODUCE_HEADER;
    let stream = text(s0, sl, "stream")?;
    let key = text(s0 + sl, kl, "key")?;
    let modality = text(s0 + sl + kl, ml, "modality")?;
    let p0 = s0 + sl + kl + ml;
    Ok(ProduceFrame {
        stream,
        key,
        modality,
        dtype,
        priority,
        ack: flags & FLAG_ACK != 0,
        last: flags & FLAG_LAST != 0,
        id: u32_at(b, 16),
        n,
        payload: frame.slice(p0..),
    })
}

/// A produce message from either encoding, before validation against the head and the
/// server's limits (names, widths, finiteness are the connection's checks).
#[derive(Debug, Clone)]
pub struct Produce<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// Sample key (a JSON integer key is turned into its decimal text).
    pub key: Cow<'a, str>,
    /// Modality name.
    pub modality: &'a str,
    /// Payload dtype (always F32 for JSON).
    pub dtype: DType,
    /// Class.
    pub priority: Priority,
    /// Element count; `payload.len() == n * dtype.size()`.
    pub n: usize,
    /// Little-endian elements.
    pub payload: Bytes,
    /// Last modality of the sample.
    pub last: bool,
    /// Ack requested.
    pub ack: bool,
    /// Request id echoed in replies (binary: the non-zero u32; JSON: any value).
    pub id: Option<Value>,
}

impl<'a> ProduceFrame<'a> {
    /// The frame as a [`Produce`] message (the payload shares the frame's buffer).
    pub fn to_produce(&self) -> Produce<'a> {
        Produce {
            stream: self.stream,
            key: Cow::Borrowed(self.key),
            modality: self.modality,
            dtype: self.dtype,
            priority: self.priority,
            n: self.n,
            payload: self.payload.clone(),
            last: self.last,
            ack: self.ack,
            id: (self.id != 0).then(|| Value::from(self.id)),
        }
    }
}

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

/// Encodes a binary produce frame (the client side). Strings longer than 65535 bytes are
/// refused.
#[allow(clippy::too_many_arguments)]
pub fn encode_produce(
    stream: &str,
    key: &str,
    modality: &str,
    dtype: DType,
    priority: Priority,
    flags: u8,
    id: u32,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let len16 = |s: &str| u16::try_from(s.len()).ok();
    let (sl, kl, ml) = (len16(stream)?, len16(key)?, len16(modality)?);
    let n = u32::try_from(payload.len() / dtype.size()).ok()?;
    let mut v = Vec::with_capacity(
        PRODUCE_HEADER + stream.len() + key.len() + modality.len() + payload.len(),
    );
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&[
        VERSION,
        KIND_PRODUCE,
        dtype_code(dtype),
        priority_code(priority),
        flags,
        0,
    ]);
    for x in [sl, kl, ml, 0] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(stream.as_bytes());
    v.extend_from_slice(key.as_bytes());
    v.extend_from_slice(modality.as_bytes());
    v.extend_from_slice(payload);
    Some(v)
}

/// One fused sample as it leaves the engine.
#[derive(Debug, Clone)]
pub struct ResultView<'a> {
    /// Stream.
    pub stream: &'a str,
    /// Key.
    pub key: &'a str,
    /// Class.
    pub priority: Priority,
    /// Presence, head order.
    pub mask: &'a [u8],
    /// y, `[D]`.
    pub fused: &'a [f32],
    /// a, `[M]`.
    pub weights: &'a [f32],
    /// Stream seq (docs/PROTOCOL.md section 7.4).
    pub stream_seq: u64,
    /// A replay of a result produced earlier.
    pub replayed: bool,
}

/// Header of a `results` frame (PROTOCOL 4.5): magic, version, kind, then the record count.
pub const RESULTS_HEADER: usize = 8;

/// Appends one result record (a whole binary result, 4.2) to a `results` frame being built
/// with [`results_frame_start`]; returns false, appending nothing, when the record cannot be
/// framed (over `u32::MAX` bytes or records).
pub fn results_frame_push(frame: &mut Vec<u8>, record: &[u8]) -> bool {
    let (Ok(len), Some(count)) = (
        u32::try_from(record.len()),
        frame
            .get(4..8)
            .and_then(|c| <[u8; 4]>::try_from(c).ok())
            .map(u32::from_le_bytes)
            .and_then(|c| c.checked_add(1)),
    ) else {
        return false;
    };
    frame[4..8].copy_from_slice(&count.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(record);
    true
}

/// Starts a `results` frame (PROTOCOL 4.5) of protocol `version` with no record yet, in a
/// buffer with room for `capacity` bytes of records.
pub fn results_frame_start(version: u8, capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(RESULTS_HEADER + capacity);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&[version, KIND_RESULTS]);
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// The records of a `results` frame (PROTOCOL 4.5), each a whole binary result (4.2); `None`
/// when the frame is not one or its lengths do not add up to the frame exactly.
pub fn split_results(b: &[u8]) -> Option<Vec<&[u8]>> {
    if b.len() < RESULTS_HEADER || b[0..2] != MAGIC || b[3] != KIND_RESULTS {
        return None;
    }
    let count = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(count.min(b.len() / 4));
    let mut at = RESULTS_HEADER;
    for _ in 0..count {
        let len = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        out.push(b.get(at..at.checked_add(len)?)?);
        at += len;
    }
    (at == b.len()).then_some(out)
}

/// Offset of the seq field in a binary result.
pub const SEQ_OFFSET: usize = 16;

/// Encodes a binary result in protocol `version` (1 or 2) with seq 0 (patch it with
/// [`with_seq`]). Names over 65535 bytes never reach here (the server limits them to
/// `max_name_bytes`); they would be truncated.
pub fn encode_result(r: &ResultView<'_>, version: u8) -> Vec<u8> {
    let v2 = version >= VERSION_2;
    let sl = r.stream.len().min(u16::MAX as usize);
    let kl = r.key.len().min(u16::MAX as usize);
    let (d, m) = (r.fused.len(), r.weights.len());
    let header = if v2 { RESULT_HEADER_V2 } else { RESULT_HEADER };
    let mut v = Vec::with_capacity(header + sl + kl + m + 4 * (d + m));
    v.extend_from_slice(&MAGIC);
    let (ver, flags) = if v2 {
        let f = if r.replayed { RESULT_FLAG_REPLAYED } else { 0 };
        (VERSION_2, f)
    } else {
        (VERSION, 0)
    };
    v.extend_from_slice(&[ver, KIND_RESULT, priority_code(r.priority), flags]);
    v.extend_from_slice(&(sl as u16).to_le_bytes());
    v.extend_from_slice(&(kl as u16).to_le_bytes());
    v.extend_from_slice(&(m.min(u16::MAX as usize) as u16).to_le_bytes());
    v.extend_from_slice(&(d as u32).to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    if v2 {
        v.extend_from_slice(&r.stream_seq.to_le_bytes());
    }
    v.extend_from_slice(&r.stream.as_bytes()[..sl]);
    v.extend_from_slice(&r.key.as_bytes()[..kl]);
    v.extend_from_slice(r.mask);
    v.extend_from_slice(bytemuck::cast_slice(r.fused));
    v.extend_from_slice(bytemuck::cast_slice(r.weights));
    v
}

/// A copy of an encoded binary result with `seq` written in.
pub fn with_seq(encoded: &[u8], seq: u64) -> Bytes {
    let mut v = encoded.to_vec();
    if v.len() >= SEQ_OFFSET + 8 {
        v[SEQ_OFFSET..SEQ_OFFSET + 8].copy_from_slice(&seq.to_le_bytes());
    }
    Bytes::from(v)
}

/// The JSON result without its `seq`: everything after `{"type":"result","seq":N,`.
pub fn json_result_tail(r: &ResultView<'_>) -> String {
    let mut v = serde_json::json!({
        "stream": r.stream,
        "stream_seq": r.stream_seq,
        "key": r.key,
        "priority": priority_name(r.priority),
        "mask": r.mask,
        "fused": r.fused,
        "weights": r.weights,
    });
    if r.replayed {
        if let Some(o) = v.as_object_mut() {
            o.insert("replayed".into(), true.into());
        }
    }
    let s = v.to_string();
    // `s` is a JSON object "{...}"; drop its opening brace so a seq can be put in front.
    s.get(1..).unwrap_or("}").to_string()
}

/// The JSON result with `seq`.
pub fn json_result(tail: &str, seq: u64) -> String {
    format!("{{\"type\":\"result\",\"seq\":{seq},{tail}")
}

/// A decoded binary result (the client side).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedResult {
    /// Sequence number (per connection).
    pub seq: u64,
    /// Stream seq (protocol version 2 and JSON results; 0 in a version 1 binary result).
    pub stream_seq: u64,
    /// A replay of a result produced while this client was away.
    pub replayed: bool,
    /// Stream.
    pub stream: String,
    /// Key.
    pub key: String,
    /// Class.
    pub priority: Priority,
    /// Presence, head order.
    pub mask: Vec<u8>,
    /// y.
    pub fused: Vec<f32>,
    /// a.
    pub weights: Vec<f32>,
}

/// Decodes a binary result frame (version 1 or 2).
pub fn decode_result(b: &[u8]) -> Option<DecodedResult> {
    if b.len() < RESULT_HEADER || b[0..2] != MAGIC || b[3] != KIND_RESULT {
        return None;
    }
    let (s0, stream_seq, replayed) = match b[2] {
        VERSION => (RESULT_HEADER, 0, false),
        VERSION_2 if b.len() >= RESULT_HEADER_V2 => (
            RESULT_HEADER_V2,
            u64::from_le_bytes(b[24..32].try_into().ok()?),
            b[5] & RESULT_FLAG_REPLAYED != 0,
        ),
        _ => return None,
    };
    let priority = priority_of(b[4])?;
    let (sl, kl, m) = (u16_at(b, 6), u16_at(b, 8), u16_at(b, 10));
    let d = u32_at(b, 12) as usize;
    let seq = u64::from_le_bytes(b[16..24].try_into().ok()?);
    let m0 = s0 + sl + kl;
    let f0 = m0 + m;
    let w0 = f0 + 4 * d;
    if b.len() != w0 + 4 * m {
        return None;
    }
    let f32s = |from: usize, n: usize| -> Vec<f32> {
        b[from..from + 4 * n]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    Some(DecodedResult {
        seq,
        stream_seq,
        replayed,
        stream: String::from_utf8(b[s0..s0 + sl].to_vec()).ok()?,
        key: String::from_utf8(b[s0 + sl..m0].to_vec()).ok()?,
        priority,
        mask: b[m0..f0].to_vec(),
        fused: f32s(f0, d),
        weights: f32s(w0, m),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_roundtrip_and_errors() {
        let payload: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f = encode_produce(
            "s",
            "k1",
            "text",
            DType::F32,
            Priority::Bulk,
            FLAG_LAST,
            7,
            &payload,
        )
        .unwrap();
        let fb = Bytes::from(f.clone());
        let p = parse_produce(&fb).unwrap();
        assert_eq!(
            (p.stream, p.key, p.modality, p.n, p.id),
            ("s", "k1", "text", 3, 7)
        );
        assert!(p.last && !p.ack);
        assert_eq!(p.priority, Priority::Bulk);
        assert_eq!(&p.payload[..], &payload[..]);
        let mut short = f.clone();
        short.pop();
        assert_eq!(
            parse_produce(&Bytes::from(short)).unwrap_err().code,
            Code::Malformed
        );
        let mut dt = f.clone();
        dt[4] = 9;
        assert_eq!(
            parse_produce(&Bytes::from(dt)).unwrap_err().code,
            Code::BadDtype
        );
        let mut v = f.clone();
        v[2] = 2;
        assert_eq!(
            parse_produce(&Bytes::from(v)).unwrap_err().code,
            Code::UnsupportedVersion
        );
        assert_eq!(
            parse_produce(&Bytes::from_static(b"xx")).unwrap_err().code,
            Code::Malformed
        );
    }

    #[test]
    fn result_roundtrip() {
        let r = ResultView {
            stream: "cam",
            key: "k",
            priority: Priority::Critical,
            mask: &[1, 0],
            fused: &[0.5, -1.0, 2.0],
            weights: &[1.0, 0.0],
            stream_seq: 7,
            replayed: true,
        };
        let e = with_seq(&encode_result(&r, VERSION), 42);
        let d = decode_result(&e).unwrap();
        assert_eq!((d.seq, d.stream_seq, d.replayed), (42, 0, false));
        let e2 = with_seq(&encode_result(&r, VERSION_2), 43);
        assert_eq!(e2.len(), e.len() + 8);
        let d2 = decode_result(&e2).unwrap();
        assert_eq!((d2.seq, d2.stream_seq, d2.replayed), (43, 7, true));
        assert_eq!(d2.fused, d.fused);
        assert_eq!(d.seq, 42);
        assert_eq!(d.fused, vec![0.5, -1.0, 2.0]);
        assert_eq!(d.mask, vec![1, 0]);
        let j: serde_json::Value =
            serde_json::from_str(&json_result(&json_result_tail(&r), 9)).unwrap();
        assert_eq!(j["seq"], 9);
        assert_eq!(j["stream_seq"], 7);
        assert_eq!(j["replayed"], true);
        assert_eq!(j["key"], "k");
        assert_eq!(j["weights"][0], 1.0);
    }

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
