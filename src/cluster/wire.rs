//! The batch and result formats on NATS (docs/DESIGN.md section 11): a batch (gateway ->
//! workers, on the work-queue stream) and its results (worker -> the gateway that sent it); the
//! per-stream results shared between gateways are in [`super::wire_rows`]. Compact
//! little-endian binary with a magic and a version; every length is checked against what is
//! left, so a truncated or hostile message decodes to an error, never a panic or a huge
//! allocation.
//!
//! Versions: a version-2 batch (`FEB2`) also carries each row's priority, and its result
//! (`FER2`) carries the rows back (stream, key, priority, mask), so that a restarted gateway can
//! fan out the results of batches it published before the restart. A worker answers a
//! version-1 batch with a version-1 result: workers can be upgraded before gateways.

use std::time::Duration;

use crate::batch::Outputs;
use crate::engine::Priority;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostMat};

const BATCH_MAGIC: [&[u8; 4]; 2] = [b"FEB1", b"FEB2"];
const RESULT_MAGIC: [&[u8; 4]; 2] = [b"FER1", b"FER2"];

/// A batch as the gateway publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct WireBatch {
    /// Unique across gateways and restarts (`<gateway id>.<sequence>`); also the results'
    /// `Nats-Msg-Id` (JetStream's duplicate window, docs/DESIGN.md section 11).
    pub id: String,
    /// The subject the results go to (the sending gateway's).
    pub reply: String,
    /// The head fingerprint the gateway batched for ([`super::fingerprint`]).
    pub fingerprint: u64,
    /// The batch's class (the highest of its samples).
    pub priority: Priority,
    /// The format version (1 or 2; the gateway sends 2): a worker answers in the same.
    pub version: u8,
    /// Per row: the sample's stream and key (echoed in a version-2 result).
    pub streams: Vec<String>,
    /// Per row.
    pub keys: Vec<String>,
    /// Per row, the sample's class (version 2; a version-1 batch decodes as `priority`).
    pub priorities: Vec<Priority>,
    /// One `[rows, width]` matrix per modality, in the head's order.
    pub inputs: Vec<HostMat>,
    /// `[rows, M]` presence mask.
    pub mask: Vec<u8>,
}

/// Bytes of a batch message besides its rows, at most: the magic, the batch id and reply
/// subject (names of at most 256 bytes each), the fingerprint, counts, and 9 bytes per modality.
const BATCH_FIXED_BYTES: usize = 4096;

/// The most rows a batch may hold for its message ([`WireBatch::encode`]) to be at most
/// `max_payload` bytes (the NATS server's limit) whatever its rows: every feature in f32 (a
/// batch that mixes dtypes is widened to f32), every stream and key name `max_name_bytes` long,
/// for a head of these modality `widths`. At least 1.
pub fn max_batch_rows(max_payload: usize, widths: &[usize], max_name_bytes: usize) -> usize {
    let row =
        widths.iter().map(|w| w * 4).sum::<usize>() + widths.len() + 2 * (4 + max_name_bytes) + 1;
    (max_payload.saturating_sub(BATCH_FIXED_BYTES) / row.max(1)).max(1)
}

/// A batch's outcome as the worker publishes it.
#[derive(Debug, Clone, PartialEq)]
pub struct WireResult {
    /// The batch's id.
    pub id: String,
    /// The outputs and where they were computed, or the engine's error (machine code, text).
    pub outcome: std::result::Result<Computed, (String, String)>,
    /// The batch's rows, echoed (version 2); None in a version-1 result.
    pub rows: Option<Rows>,
}

/// A batch's rows as a version-2 result echoes them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rows {
    /// Per row: the sample's stream.
    pub streams: Vec<String>,
    /// Per row: the sample's key.
    pub keys: Vec<String>,
    /// Per row: the sample's class.
    pub priorities: Vec<Priority>,
    /// `[rows, M]` presence mask.
    pub mask: Vec<u8>,
}

/// The successful part of a [`WireResult`].
#[derive(Debug, Clone, PartialEq)]
pub struct Computed {
    /// `fused` `[B, D]`, `weights` `[B, M]`.
    pub outputs: Outputs,
    /// The worker's device, e.g. `worker-3/cpu:0`.
    pub device: String,
    /// Runs that failed before this one.
    pub retries: u32,
    /// Time on the device.
    pub device_time: Duration,
}

/// Priority from its wire byte (0 critical, 1 important, 2 bulk).
pub fn priority_of(b: u8) -> Option<Priority> {
    Priority::ALL.get(b as usize).copied()
}

fn dtype_byte(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn dtype_of(b: u8) -> Option<DType> {
    [DType::F32, DType::F16, DType::BF16]
        .get(b as usize)
        .copied()
}

impl WireBatch {
    /// Encodes the batch.
    pub fn encode(&self) -> Vec<u8> {
        let data: usize = self.inputs.iter().map(|m| m.bytes.len() + 9).sum();
        let mut w = Vec::with_capacity(64 + data + self.mask.len() + self.id.len());
        let v2 = self.version >= 2;
        w.extend_from_slice(BATCH_MAGIC[usize::from(v2)]);
        put_str(&mut w, &self.id);
        put_str(&mut w, &self.reply);
        w.extend_from_slice(&self.fingerprint.to_le_bytes());
        w.push(self.priority as u8);
        put_u32(&mut w, self.streams.len());
        for (i, (s, k)) in self.streams.iter().zip(&self.keys).enumerate() {
            put_str(&mut w, s);
            put_str(&mut w, k);
            if v2 {
                w.push(self.priorities.get(i).copied().unwrap_or(self.priority) as u8);
            }
        }
        put_u32(&mut w, self.inputs.len());
        for m in &self.inputs {
            w.push(dtype_byte(m.dtype));
            put_u32(&mut w, m.cols);
            put_bytes(&mut w, &m.bytes);
        }
        put_bytes(&mut w, &self.mask);
        w
    }

    /// Decodes a batch; any inconsistency is an error naming what is wrong.
    pub fn decode(b: &[u8]) -> Result<WireBatch> {
        let (mut r, version) = Reader::versioned(b, BATCH_MAGIC)?;
        let id = r.string()?;
        let reply = r.string()?;
        let fingerprint = r.u64()?;
        let priority = priority_of(r.u8()?).ok_or_else(|| bad("priority"))?;
        let rows = r.u32()?;
        let (mut streams, mut keys, mut priorities) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rows {
            streams.push(r.string()?);
            keys.push(r.string()?);
            priorities.push(match version {
                1 => priority,
                _ => priority_of(r.u8()?).ok_or_else(|| bad("priority"))?,
            });
        }
        let m = r.u32()?;
        let mut inputs = Vec::new();
        for _ in 0..m {
            let dtype = dtype_of(r.u8()?).ok_or_else(|| bad("dtype"))?;
            let cols = r.u32()?;
            let bytes = r.bytes()?.to_vec();
            if Some(bytes.len())
                != rows
                    .checked_mul(cols)
                    .and_then(|n| n.checked_mul(dtype.size()))
            {
                return Err(bad("matrix size"));
            }
            inputs.push(HostMat {
                dtype,
                rows,
                cols,
                bytes: bytes.into(),
            });
        }
        let mask = r.bytes()?.to_vec();
        if Some(mask.len()) != rows.checked_mul(m) {
            return Err(bad("mask size"));
        }
        r.end()?;
        Ok(WireBatch {
            id,
            reply,
            fingerprint,
            priority,
            version,
            streams,
            keys,
            priorities,
            inputs,
            mask,
        })
    }
}

impl WireResult {
    /// Encodes the result.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(RESULT_MAGIC[usize::from(self.rows.is_some())]);
        put_str(&mut w, &self.id);
        match &self.outcome {
            Ok(c) => {
                w.push(0);
                put_floats(&mut w, &c.outputs.fused);
                put_floats(&mut w, &c.outputs.weights);
                put_str(&mut w, &c.device);
                put_u32(&mut w, c.retries as usize);
                let us = u64::try_from(c.device_time.as_micros()).unwrap_or(u64::MAX);
                w.extend_from_slice(&us.to_le_bytes());
            }
            Err((code, msg)) => {
                w.push(1);
                put_str(&mut w, code);
                put_str(&mut w, msg);
            }
        }
        if let Some(rows) = &self.rows {
            put_u32(&mut w, rows.streams.len());
            for (i, (s, k)) in rows.streams.iter().zip(&rows.keys).enumerate() {
                put_str(&mut w, s);
                put_str(&mut w, k);
                w.push(rows.priorities.get(i).copied().unwrap_or_default() as u8);
            }
            put_bytes(&mut w, &rows.mask);
        }
        w
    }

    /// Decodes a result.
    pub fn decode(b: &[u8]) -> Result<WireResult> {
        let (mut r, version) = Reader::versioned(b, RESULT_MAGIC)?;
        let id = r.string()?;
        let outcome = match r.u8()? {
            0 => {
                let fused = r.floats()?;
                let weights = r.floats()?;
                let device = r.string()?;
                let retries = u32::try_from(r.u32()?).map_err(|_| bad("retries"))?;
                let device_time = Duration::from_micros(r.u64()?);
                Ok(Computed {
                    outputs: Outputs { fused, weights },
                    device,
                    retries,
                    device_time,
                })
            }
            1 => Err((r.string()?, r.string()?)),
            _ => return Err(bad("outcome")),
        };
        let rows = match version {
            1 => None,
            _ => {
                let n = r.u32()?;
                let mut rows = Rows::default();
                for _ in 0..n {
                    rows.streams.push(r.string()?);
                    rows.keys.push(r.string()?);
                    rows.priorities
                        .push(priority_of(r.u8()?).ok_or_else(|| bad("priority"))?);
                }
                rows.mask = r.bytes()?.to_vec();
                let m = rows.mask.len().checked_div(n).unwrap_or(0);
                let weights = outcome.as_ref().map(|c| c.outputs.weights.len()).ok();
                if m * n != rows.mask.len() || weights.is_some_and(|w| w != m * n) {
                    return Err(bad("rows"));
                }
                Some(rows)
            }
        };
        r.end()?;
        Ok(WireResult { id, outcome, rows })
    }
}

pub(super) fn bad(what: &str) -> Error {
    Error::Runtime(format!("bad cluster message: {what}"))
}

pub(super) fn put_u32(w: &mut Vec<u8>, n: usize) {
    // Every length written here is a batch's rows/columns/bytes, far below 4 GiB (NATS's
    // max_payload is megabytes); saturate rather than wrap, so a decoder rejects it.
    w.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

pub(super) fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len());
    w.extend_from_slice(b);
}

pub(super) fn put_str(w: &mut Vec<u8>, s: &str) {
    put_bytes(w, s.as_bytes());
}

pub(super) fn put_floats(w: &mut Vec<u8>, f: &[f32]) {
    put_u32(w, f.len());
    for x in f {
        w.extend_from_slice(&x.to_le_bytes());
    }
}

/// A bounds-checked cursor.
pub(super) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(b: &'a [u8], magic: &[u8; 4]) -> Result<Reader<'a>> {
        match b.strip_prefix(magic.as_slice()) {
            Some(rest) => Ok(Reader { b: rest }),
            None => Err(bad("magic")),
        }
    }

    /// A reader after one of `magics`, and its version (1 for the first).
    fn versioned(b: &'a [u8], magics: [&[u8; 4]; 2]) -> Result<(Reader<'a>, u8)> {
        match Reader::new(b, magics[1]) {
            Ok(r) => Ok((r, 2)),
            Err(_) => Ok((Reader::new(b, magics[0])?, 1)),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(bad("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    pub(super) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(super) fn u32(&mut self) -> Result<usize> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a) as usize)
    }

    pub(super) fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub(super) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()?;
        self.take(n)
    }

    pub(super) fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("utf-8"))
    }

    pub(super) fn floats(&mut self) -> Result<Vec<f32>> {
        let n = self.u32()?;
        let b = self.take(n.checked_mul(4).ok_or_else(|| bad("length"))?)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    pub(super) fn end(&self) -> Result<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(bad("trailing bytes"))
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
