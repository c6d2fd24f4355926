//! The binary produce frame (docs/PROTOCOL.md section 4.1): one modality of one sample.
//! [`Produce`] is a produce message from either encoding (binary or JSON), before validation
//! against the head.

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::Value;

use super::code::{Code, ProtoError};
use super::frame::{
    dtype_code, dtype_of, priority_code, priority_of, u16_at, u32_at, FLAG_ACK, FLAG_LAST,
    KIND_PRODUCE, MAGIC, PRODUCE_HEADER, VERSION,
};
use crate::engine::Priority;
use crate::tensor::DType;

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
}
