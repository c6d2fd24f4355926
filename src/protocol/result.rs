//! One fused result on the wire: the binary result frame (docs/PROTOCOL.md section 4.2, with
//! the stream seq in version 2) and its JSON form; encode (server) and decode (client).

use bytes::{BufMut, Bytes};

use super::frame::{
    priority_code, priority_name, priority_of, u16_at, u32_at, KIND_RESULT, MAGIC,
    RESULT_FLAG_REPLAYED, RESULT_HEADER, RESULT_HEADER_V2, VERSION, VERSION_2,
};
use crate::engine::Priority;

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

/// Offset of the seq field in a binary result.
pub const SEQ_OFFSET: usize = 16;

/// Encodes a binary result in protocol `version` (1 or 2) with seq 0 (patch it with
/// [`with_seq`]). Names over 65535 bytes never reach here (the server limits them to
/// `max_name_bytes`); they would be truncated.
pub fn encode_result(r: &ResultView<'_>, version: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(encoded_result_len(r, version));
    encode_result_into(r, version, &mut v);
    v
}

/// Bytes [`encode_result`] writes for `r` in protocol `version`.
pub fn encoded_result_len(r: &ResultView<'_>, version: u8) -> usize {
    let header = if version >= VERSION_2 {
        RESULT_HEADER_V2
    } else {
        RESULT_HEADER
    };
    let sl = r.stream.len().min(u16::MAX as usize);
    let kl = r.key.len().min(u16::MAX as usize);
    header + sl + kl + r.weights.len() + 4 * (r.fused.len() + r.weights.len())
}

/// [`encode_result`] appending to `v` (e.g. several results into one buffer).
pub fn encode_result_into(r: &ResultView<'_>, version: u8, v: &mut impl BufMut) {
    let v2 = version >= VERSION_2;
    let sl = r.stream.len().min(u16::MAX as usize);
    let kl = r.key.len().min(u16::MAX as usize);
    let (d, m) = (r.fused.len(), r.weights.len());
    v.put_slice(&MAGIC);
    let (ver, flags) = if v2 {
        let f = if r.replayed { RESULT_FLAG_REPLAYED } else { 0 };
        (VERSION_2, f)
    } else {
        (VERSION, 0)
    };
    v.put_slice(&[ver, KIND_RESULT, priority_code(r.priority), flags]);
    v.put_slice(&(sl as u16).to_le_bytes());
    v.put_slice(&(kl as u16).to_le_bytes());
    v.put_slice(&(m.min(u16::MAX as usize) as u16).to_le_bytes());
    v.put_slice(&(d as u32).to_le_bytes());
    v.put_slice(&0u64.to_le_bytes());
    if v2 {
        v.put_slice(&r.stream_seq.to_le_bytes());
    }
    v.put_slice(&r.stream.as_bytes()[..sl]);
    v.put_slice(&r.key.as_bytes()[..kl]);
    v.put_slice(r.mask);
    v.put_slice(bytemuck::cast_slice(r.fused));
    v.put_slice(bytemuck::cast_slice(r.weights));
}

/// A copy of an encoded binary result with `seq` written in.
pub fn with_seq(encoded: &[u8], seq: u64) -> Bytes {
    let mut v = encoded.to_vec();
    patch_result(&mut v, seq, false);
    Bytes::from(v)
}

/// Writes `seq` into an encoded binary result (4.2) and, in version 2 when `replayed`, the
/// replayed flag (bit 0 of byte 5); a buffer too short to be a result is left as it is. The
/// server encodes a result once for every subscriber and writes each one's seq into the copy
/// it sends (docs/DESIGN.md section 5.3).
pub fn patch_result(encoded: &mut [u8], seq: u64, replayed: bool) {
    if let Some(s) = encoded.get_mut(SEQ_OFFSET..SEQ_OFFSET + 8) {
        s.copy_from_slice(&seq.to_le_bytes());
    }
    if replayed && encoded.len() >= RESULT_HEADER_V2 && encoded[2] == VERSION_2 {
        encoded[5] |= RESULT_FLAG_REPLAYED;
    }
}

/// The version 1 form of a version 2 binary result (4.2): the same fields without the stream
/// seq, flags 0; `None` when `v2` is not a version 2 result.
pub fn result_v1_of_v2(v2: &[u8]) -> Option<Vec<u8>> {
    if v2.len() < RESULT_HEADER_V2 || v2[0..2] != MAGIC || v2[2] != VERSION_2 {
        return None;
    }
    let mut v = Vec::with_capacity(v2.len() - (RESULT_HEADER_V2 - RESULT_HEADER));
    v.extend_from_slice(&v2[..RESULT_HEADER]);
    v[2] = VERSION;
    v[5] = 0;
    v.extend_from_slice(&v2[RESULT_HEADER_V2..]);
    Some(v)
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
        // Version 1 made from version 2, and the seq and replayed flag written in.
        let mut v1 = result_v1_of_v2(&encode_result(&r, VERSION_2)).unwrap();
        patch_result(&mut v1, 42, true);
        assert_eq!(v1, e.to_vec());
        let mut v2 = encode_result(
            &ResultView {
                replayed: false,
                ..r.clone()
            },
            VERSION_2,
        );
        patch_result(&mut v2, 43, true);
        assert_eq!(v2, e2.to_vec());
        let j: serde_json::Value =
            serde_json::from_str(&json_result(&json_result_tail(&r), 9)).unwrap();
        assert_eq!(j["seq"], 9);
        assert_eq!(j["stream_seq"], 7);
        assert_eq!(j["replayed"], true);
        assert_eq!(j["key"], "k");
        assert_eq!(j["weights"][0], 1.0);
    }
}
