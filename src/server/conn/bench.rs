//! A fixed `samples` frame through the ingest check, for `benches/ingest.rs` (doc-hidden): the
//! connection's own parse and [`check_frame`] (names, widths, each block scanned for NaN/Inf and
//! kept in the frame or copied into a pooled buffer in the same pass, the keys), without a
//! socket, so that its instructions can be counted (callgrind) whatever else the host runs.

use std::sync::Arc;

use bytes::Bytes;

use super::samples::{check_frame, Placement};
use crate::engine::{BufferPool, Priority};
use crate::model::FusionHead;
use crate::protocol;
use crate::tensor::DType;

/// One frame of `rows` samples of the embedded head's modalities, and the pool its blocks go to.
pub struct IngestBench {
    head: FusionHead,
    pool: Arc<BufferPool>,
    frame: Bytes,
    max_name: usize,
    in_frame: bool,
}

impl IngestBench {
    /// A frame of `rows` samples (keys `bench-000000`...) with finite values in `dtype` (f32 or
    /// f16; anything else is taken as f32).
    pub fn new(rows: usize, dtype: DType) -> IngestBench {
        let head = FusionHead::embedded();
        let dtype = if dtype == DType::F16 {
            DType::F16
        } else {
            DType::F32
        };
        let keys: Vec<String> = (0..rows).map(|i| format!("bench-{i:06}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let names: Vec<&str> = head.modalities.iter().map(|m| m.name.as_str()).collect();
        let blocks: Vec<Vec<u8>> = head
            .modalities
            .iter()
            .map(|m| {
                let values = (0..rows * m.width).map(|i| ((i % 97) as f32 - 48.0) / 64.0);
                match dtype {
                    DType::F16 => values
                        .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                    _ => values.flat_map(f32::to_le_bytes).collect(),
                }
            })
            .collect();
        let blocks: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let frame = protocol::encode_samples(
            "bench",
            &keys,
            &names,
            &blocks,
            dtype,
            Priority::Important,
            false,
            0,
        )
        .unwrap_or_default();
        IngestBench {
            head,
            pool: Arc::new(BufferPool::default()),
            frame: Bytes::from(frame),
            max_name: crate::server::config::ServerConfig::default().max_name_bytes,
            in_frame: false,
        }
    }

    /// Keeps the blocks in the frame (scanned only, as with a CPU-only engine) instead of
    /// copying them into the pool's buffers (as with CUDA).
    pub fn in_frame(mut self, yes: bool) -> IngestBench {
        self.in_frame = yes;
        self
    }

    /// Parses and checks the frame once; the rows it accepted (0 on an error). Its blocks go
    /// back to the pool when they are dropped here, as a batch's do after its run.
    pub fn run(&mut self) -> usize {
        let Ok(f) = protocol::parse_samples(&self.frame) else {
            return 0;
        };
        let place = if self.in_frame {
            Placement::InFrame
        } else {
            Placement::Copied
        };
        match check_frame(&self.head, self.max_name, &self.pool, place, &f) {
            Ok(c) => c.keys.len(),
            Err(_) => 0,
        }
    }
}
