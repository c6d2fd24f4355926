//! The `samples` binary frame (docs/PROTOCOL.md section 4.4): many whole samples of one stream
//! in one frame, each modality's rows back to back (`[N, width]`), so that a coordinator that
//! already holds batches pays the per-frame costs (WebSocket framing, validation, the hand-off to
//! the pipeline, the aligner) once per frame instead of once per modality per sample.
//!
//! Layout: the produce frame's 24-byte header (kind 3; bytes 10..12 are the modality count M and
//! bytes 20..24 the sample count N), the stream name, M modality entries
//! `{u32 width, u16 name_len, name}`, N keys `{u16 key_len, key}`, then for each listed modality
//! in frame order its `N * width` elements.

use bytes::Bytes;

use super::produce::client_header;

use super::code::{Code, ProtoError};
use super::frame::{
    dtype_code, priority_code, u16_at, u32_at, FLAG_ACK, MAGIC, PRODUCE_HEADER, VERSION,
};
use crate::engine::Priority;
use crate::tensor::DType;

/// Binary `kind`: samples (client to server).
pub const KIND_SAMPLES: u8 = 3;

/// A parsed `samples` frame; the blocks share the frame's buffer. Names, widths and
/// finiteness are checked against the head by the caller.
#[derive(Debug, Clone)]
pub struct SamplesFrame<'a> {
    /// Stream name.
    pub stream: &'a str,
    /// Payload dtype.
    pub dtype: DType,
    /// Class of every sample of the frame.
    pub priority: Priority,
    /// Ack requested.
    pub ack: bool,
    /// Request id (0 = none).
    pub id: u32,
    /// `(name, width)` of each modality present in the samples, frame order.
    pub modalities: Vec<(&'a str, usize)>,
    /// One key per sample.
    pub keys: Vec<&'a str>,
    /// One `[N, width]` block of little-endian elements per listed modality, frame order.
    pub blocks: Vec<Bytes>,
}

/// A cursor over the variable part of the frame; every read is bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ProtoError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(ProtoError::new(
                Code::Malformed,
                format!(
                    "samples frame of {} bytes ends inside {what} (at byte {})",
                    self.b.len(),
                    self.at
                ),
            ));
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn text(&mut self, n: usize, what: &str) -> Result<&'a str, ProtoError> {
        let s = self.take(n, what)?;
        std::str::from_utf8(s)
            .map_err(|_| ProtoError::new(Code::Malformed, format!("{what} is not UTF-8")))
    }
}

/// Parses a `samples` frame (header, table, keys, exact length, UTF-8).
pub fn parse_samples(frame: &Bytes) -> Result<SamplesFrame<'_>, ProtoError> {
    let b = &frame[..];
    let bad = |m: String| Err(ProtoError::new(Code::Malformed, m));
    let (dtype, priority) = client_header(b, KIND_SAMPLES)?;
    let flags = b[6];
    if flags & !FLAG_ACK != 0 || b[7] != 0 || u32_at(b, 20) != 0 {
        return bad(
            "reserved header bits are not zero (samples frames have no `last` flag)".into(),
        );
    }
    let (sl, m, n) = (u16_at(b, 8), u16_at(b, 10), u32_at(b, 12) as usize);
    if m == 0 || n == 0 {
        return bad(format!(
            "a samples frame needs at least one modality and one sample (M = {m}, N = {n})"
        ));
    }
    let mut c = Cursor {
        b,
        at: PRODUCE_HEADER,
    };
    let stream = c.text(sl, "stream")?;
    let mut modalities = Vec::with_capacity(m);
    let mut row_elems: u64 = 0;
    for j in 0..m {
        let e = c.take(6, "the modality table")?;
        let width = u32_at(e, 0) as usize;
        let name = c.text(u16_at(e, 4), "a modality name")?;
        if modalities.iter().any(|&(x, _)| x == name) {
            return Err(ProtoError::new(
                Code::DuplicateModality,
                format!("modality \"{name}\" is listed twice (entry {j})"),
            ));
        }
        row_elems += width as u64;
        modalities.push((name, width));
    }
    // Every key takes at least 2 bytes: a count the frame cannot hold is refused before
    // anything is allocated for it.
    if n as u64 * 2 > (b.len() - c.at) as u64 {
        return bad(format!(
            "samples frame of {} bytes cannot hold the keys of {n} samples",
            b.len()
        ));
    }
    // One UTF-8 check for a section of short keys (samples_keys.rs), else one per key.
    let keys = match super::samples_keys::short_keys(b, c.at, n) {
        Some((keys, end)) => {
            c.at = end;
            keys
        }
        None => (0..n)
            .map(|_| {
                c.take(2, "the keys")
                    .and_then(|l| c.text(u16_at(l, 0), "a key"))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let expected = n as u64 * row_elems * dtype.size() as u64;
    let rest = (b.len() - c.at) as u64;
    if rest != expected {
        return bad(format!(
            "samples frame has {rest} payload bytes; its table says {expected} \
             ({n} samples x {row_elems} elements x {} bytes)",
            dtype.size()
        ));
    }
    let mut blocks = Vec::with_capacity(m);
    for &(_, w) in &modalities {
        let len = n * w * dtype.size();
        blocks.push(frame.slice(c.at..c.at + len));
        c.at += len;
    }
    Ok(SamplesFrame {
        stream,
        dtype,
        priority,
        ack: flags & FLAG_ACK != 0,
        id: u32_at(b, 16),
        modalities,
        keys,
        blocks,
    })
}

/// Encodes a `samples` frame (the client side). `blocks[j]` holds `keys.len()` rows of
/// modality `modalities[j]` (little-endian `dtype` elements); `None` when a length does not fit
/// its field or a block's length is not `keys.len()` whole rows.
#[allow(clippy::too_many_arguments)]
pub fn encode_samples(
    stream: &str,
    keys: &[&str],
    modalities: &[&str],
    blocks: &[&[u8]],
    dtype: DType,
    priority: Priority,
    ack: bool,
    id: u32,
) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    encode_samples_into(
        &mut v, stream, keys, modalities, blocks, dtype, priority, ack, id,
    )?;
    Some(v)
}

/// [`encode_samples`] appended to `out`, whose capacity a caller can reuse frame after frame.
/// On `None`, `out` is left as it was.
#[allow(clippy::too_many_arguments)]
pub fn encode_samples_into(
    out: &mut Vec<u8>,
    stream: &str,
    keys: &[&str],
    modalities: &[&str],
    blocks: &[&[u8]],
    dtype: DType,
    priority: Priority,
    ack: bool,
    id: u32,
) -> Option<()> {
    let key_bytes: usize = keys.iter().map(|k| k.len()).sum();
    let mut next = keys.iter();
    let key = |v: &mut Vec<u8>| {
        if let Some(k) = next.next() {
            v.extend_from_slice(k.as_bytes());
        }
    };
    let sizes = (keys.len(), key_bytes);
    let head = (stream, dtype, priority, ack, id);
    encode_samples_keyed(out, head, sizes, key, modalities, blocks)
}

/// [`encode_samples_into`] with the keys written by `key` instead of taken from a slice:
/// `head` is `(stream, dtype, priority, ack, id)`, `sizes` is `(N, about how many key bytes in
/// all)`, and `key` is called N times, in sample order, each time appending one key's UTF-8
/// bytes to the frame (the encoder writes its length in front). On `None`, `out` is left as
/// it was.
pub fn encode_samples_keyed<F>(
    out: &mut Vec<u8>,
    head: (&str, DType, Priority, bool, u32),
    sizes: (usize, usize),
    key: F,
    modalities: &[&str],
    blocks: &[&[u8]],
) -> Option<()>
where
    F: FnMut(&mut Vec<u8>),
{
    let at = out.len();
    let r = write_samples(out, head, sizes, key, modalities, blocks);
    if r.is_none() {
        out.truncate(at);
    }
    r
}

fn write_samples<F>(
    v: &mut Vec<u8>,
    (stream, dtype, priority, ack, id): (&str, DType, Priority, bool, u32),
    (n, key_bytes): (usize, usize),
    mut key: F,
    modalities: &[&str],
    blocks: &[&[u8]],
) -> Option<()>
where
    F: FnMut(&mut Vec<u8>),
{
    if n == 0 || modalities.is_empty() || modalities.len() != blocks.len() {
        return None;
    }
    let len16 = |s: &str| u16::try_from(s.len()).ok();
    let row = n.checked_mul(dtype.size())?;
    let names: usize = modalities.iter().map(|m| m.len() + 6).sum();
    let payload: usize = blocks.iter().map(|b| b.len()).sum();
    v.reserve(PRODUCE_HEADER + stream.len() + names + 2 * n + key_bytes + payload);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&[
        VERSION,
        KIND_SAMPLES,
        dtype_code(dtype),
        priority_code(priority),
        if ack { FLAG_ACK } else { 0 },
        0,
    ]);
    v.extend_from_slice(&len16(stream)?.to_le_bytes());
    v.extend_from_slice(&u16::try_from(modalities.len()).ok()?.to_le_bytes());
    v.extend_from_slice(&u32::try_from(n).ok()?.to_le_bytes());
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(stream.as_bytes());
    for (m, b) in modalities.iter().zip(blocks) {
        if b.len() % row != 0 {
            return None;
        }
        let w = u32::try_from(b.len() / row).ok()?;
        v.extend_from_slice(&w.to_le_bytes());
        v.extend_from_slice(&len16(m)?.to_le_bytes());
        v.extend_from_slice(m.as_bytes());
    }
    for _ in 0..n {
        let at = v.len();
        v.extend_from_slice(&[0, 0]);
        key(v);
        let l = u16::try_from(v.len() - at - 2).ok()?;
        v[at..at + 2].copy_from_slice(&l.to_le_bytes());
    }
    for b in blocks {
        v.extend_from_slice(b);
    }
    Some(())
}

#[cfg(test)]
#[path = "samples_tests.rs"]
mod tests;
