//! A connection's `samples` frames (PROTOCOL 4.4): validated as a whole, copied and scanned for
//! NaN/Inf on this connection's task into pooled buffers (docs/DESIGN.md section 4), then handed
//! to the pipeline as one message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;

use super::{check_name, Conn};
use crate::engine::{BufferPool, PooledBlocks, Priority};
use crate::model::FusionHead;
use crate::protocol::notices::About;
use crate::protocol::{self, Code, ProtoError};
use crate::server::ingest::keys::FrameKeys;
use crate::server::ingest::pipeline::refuse_samples;
use crate::server::ingest::queue::{IngestMsg, IngestSamples};
use crate::tensor::copy_finite;

impl Conn {
    /// A `samples` frame (PROTOCOL 4.4): validated as a whole (one error refuses every sample of
    /// it), then handed to the pipeline as one message weighing one ingest slot per row.
    pub(super) async fn samples(&mut self, frame: Bytes) {
        let f = match protocol::parse_samples(&frame) {
            Ok(f) => f,
            Err(e) => return self.frame_error(&frame, e),
        };
        let id = (f.id != 0).then(|| Value::from(f.id));
        let about = About {
            id: id.as_ref(),
            stream: Some(f.stream),
            ..About::default()
        };
        let ing = match self.validate_samples(&f, id.clone()) {
            Ok(i) => i,
            Err(e) => return self.error(e.code, &e.message, &about),
        };
        let rows = ing.rows();
        let sh = Arc::clone(&self.shared);
        sh.m.produce.increment(rows as u64);
        self.out.begin_request();
        let deadline = tokio::time::Instant::now() + sh.cfg.ingest_wait;
        let mut msg = IngestMsg::Samples(ing);
        let refused = loop {
            match sh.ingest.try_push(msg) {
                Ok(()) => return,
                Err(TrySendError::Closed(_)) => break None,
                Err(TrySendError::Full(m)) => msg = m,
            }
            // Full: BULK is shed at once, other classes wait up to `ingest_wait` (PROTOCOL 5.1).
            if f.priority == Priority::Bulk || tokio::time::Instant::now() >= deadline {
                break Some(msg);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        self.out.end_request();
        match refused {
            None => self.error(Code::Shutdown, "the server is shutting down", &about),
            Some(IngestMsg::Samples(ing)) => {
                let why = "the ingest queue is full (the server is saturated)";
                refuse_samples(&sh, &ing, why);
            }
            Some(IngestMsg::One(_)) => {}
        }
    }

    fn validate_samples(
        &mut self,
        f: &protocol::SamplesFrame<'_>,
        id: Option<Value>,
    ) -> Result<IngestSamples, ProtoError> {
        if self.draining {
            return Err(ProtoError::new(
                Code::Shutdown,
                "the server is shutting down",
            ));
        }
        let sh = &self.shared;
        let c = check_frame(&sh.head, sh.cfg.max_name_bytes, sh.engine.buffer_pool(), f)?;
        let stream = self.use_stream(f.stream)?;
        Ok(IngestSamples {
            stream,
            keys: c.keys,
            dtype: f.dtype,
            priority: f.priority,
            modalities: c.modalities,
            blocks: c.blocks,
            ack: f.ack,
            id,
            producer: Arc::clone(&self.out),
        })
    }
}

/// What a `samples` frame becomes once checked: its modalities' head indices, their blocks
/// copied out of the frame, its keys.
pub(crate) struct CheckedFrame {
    pub modalities: Vec<usize>,
    pub blocks: PooledBlocks,
    pub keys: Arc<FrameKeys>,
}

/// Checks a parsed `samples` frame against the head and `max_name_bytes` (stream and key
/// names, modalities known, widths right) and copies each block out of the frame into a
/// buffer from `pool`, scanning it for NaN/Inf in the same pass (docs/DESIGN.md section 4):
/// the frame's buffer is free again as soon as this returns, and on a bad value nothing of the
/// frame is kept (the blocks copied so far go back to the pool).
pub(crate) fn check_frame(
    head: &FusionHead,
    max_name: usize,
    pool: &Arc<BufferPool>,
    f: &protocol::SamplesFrame<'_>,
) -> Result<CheckedFrame, ProtoError> {
    check_name(max_name, "stream", f.stream)?;
    for (i, k) in f.keys.iter().enumerate() {
        check_name(max_name, "key", k)
            .map_err(|e| ProtoError::new(e.code, format!("sample {i}: {}", e.message)))?;
    }
    let mut modalities = Vec::with_capacity(f.modalities.len());
    let mut blocks = PooledBlocks::new(Arc::clone(pool));
    for (&(name, width), block) in f.modalities.iter().zip(&f.blocks) {
        let Some(mi) = head.modality_index(name) else {
            return Err(ProtoError::new(
                Code::UnknownModality,
                format!(
                    "unknown modality \"{name}\" (the head has {})",
                    head.modality_list()
                ),
            ));
        };
        let want = head.modalities[mi].width;
        if width != want {
            return Err(ProtoError::new(
                Code::WrongWidth,
                format!("modality \"{name}\" has width {want}, got {width} values"),
            ));
        }
        let mut buf = blocks.buffer(block.len());
        if let Err(e) = copy_finite(f.dtype, block, &mut buf) {
            blocks.give_back(buf);
            return Err(ProtoError::new(
                Code::NonFinite,
                format!(
                    "modality \"{name}\" of sample {} (key \"{}\"): element {} is NaN or Inf",
                    e / width,
                    f.keys.get(e / width).copied().unwrap_or_default(),
                    e % width
                ),
            ));
        }
        blocks.push(buf);
        modalities.push(mi);
    }
    let keys = FrameKeys::new(&f.keys)
        .ok_or_else(|| ProtoError::new(Code::Malformed, "the frame's keys exceed 4 GiB"))?;
    Ok(CheckedFrame {
        modalities,
        blocks,
        keys,
    })
}
