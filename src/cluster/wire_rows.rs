//! The results of one batch for one stream, as a gateway shares them with the other gateways
//! (docs/DESIGN.md section 11, "Several gateways"): published to `fusion.streams.<token>` of
//! the stream `FUSION_STREAMS`, one message per (batch, stream). Same conventions as
//! [`super::wire`]: little-endian, a magic with the version, every length checked.

use super::wire::{bad, priority_of, put_floats, put_str, put_u32, Reader};
use crate::engine::Priority;
use crate::error::Result;

const ROWS_MAGIC: &[u8; 4] = b"FES1";

/// One batch's results for one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRows {
    /// The gateway that published the batch (its `--gateway-id`): it delivered these rows to
    /// its own subscribers itself, so it skips this message.
    pub origin: String,
    /// The batch id (with the stream's token, the message's `Nats-Msg-Id`).
    pub batch: String,
    /// The head fingerprint the rows were computed with; a gateway with another head drops them.
    pub fingerprint: u64,
    /// The stream's name (the subject carries only a hash of it).
    pub stream: String,
    /// `D`, the fused width of every row.
    pub dim: usize,
    /// `M`, the number of modalities of every row.
    pub modalities: usize,
    /// The rows, in the batch's order.
    pub rows: Vec<Row>,
}

/// One sample's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The sample's key.
    pub key: String,
    /// The sample's class (CRITICAL and IMPORTANT results are kept for replay).
    pub priority: Priority,
    /// `[M]` presence mask.
    pub mask: Vec<u8>,
    /// `[D]`.
    pub fused: Vec<f32>,
    /// `[M]`.
    pub weights: Vec<f32>,
}

impl StreamRows {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        let per_row = 16 + 4 * (self.dim + 2 * self.modalities);
        let mut w = Vec::with_capacity(64 + self.stream.len() + self.rows.len() * per_row);
        w.extend_from_slice(ROWS_MAGIC);
        put_str(&mut w, &self.origin);
        put_str(&mut w, &self.batch);
        w.extend_from_slice(&self.fingerprint.to_le_bytes());
        put_str(&mut w, &self.stream);
        put_u32(&mut w, self.dim);
        put_u32(&mut w, self.modalities);
        put_u32(&mut w, self.rows.len());
        for r in &self.rows {
            put_str(&mut w, &r.key);
            w.push(r.priority as u8);
            w.extend_from_slice(&r.mask);
            put_floats(&mut w, &r.fused);
            put_floats(&mut w, &r.weights);
        }
        w
    }

    /// Decodes a message; every row must have `dim` fused values and `modalities` weights and
    /// mask bytes.
    pub fn decode(b: &[u8]) -> Result<StreamRows> {
        let mut r = Reader::new(b, ROWS_MAGIC)?;
        let origin = r.string()?;
        let batch = r.string()?;
        let fingerprint = r.u64()?;
        let stream = r.string()?;
        let dim = r.u32()?;
        let modalities = r.u32()?;
        let n = r.u32()?;
        let mut rows = Vec::new();
        for _ in 0..n {
            let key = r.string()?;
            let priority = priority_of(r.u8()?).ok_or_else(|| bad("priority"))?;
            let mut mask = Vec::with_capacity(modalities.min(4096));
            for _ in 0..modalities {
                mask.push(r.u8()?);
            }
            let fused = r.floats()?;
            let weights = r.floats()?;
            if fused.len() != dim || weights.len() != modalities {
                return Err(bad("row size"));
            }
            rows.push(Row {
                key,
                priority,
                mask,
                fused,
                weights,
            });
        }
        r.end()?;
        Ok(StreamRows {
            origin,
            batch,
            fingerprint,
            stream,
            dim,
            modalities,
            rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StreamRows {
        StreamRows {
            origin: "gw-a".into(),
            batch: "gw-a.i1.3".into(),
            fingerprint: 42,
            stream: "cam/1 \u{e9}.*>".into(),
            dim: 2,
            modalities: 3,
            rows: (0..3)
                .map(|i| Row {
                    key: format!("k{i}"),
                    priority: Priority::ALL[i % 3],
                    mask: vec![1, 0, 1],
                    fused: vec![i as f32, -1.5],
                    weights: vec![0.5, 0.0, 0.5],
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(StreamRows::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn every_truncation_and_a_wrong_width_are_errors() {
        let e = sample().encode();
        for cut in 0..e.len() {
            assert!(StreamRows::decode(&e[..cut]).is_err(), "cut at {cut}");
        }
        let mut s = sample();
        s.rows[1].fused.push(1.0);
        assert!(StreamRows::decode(&s.encode()).is_err());
        let mut t = sample().encode();
        t.push(0);
        assert!(StreamRows::decode(&t).is_err());
    }
}
