//! A fused result as the server keeps it after its batch: encoded once, as a version 2 binary
//! result (docs/PROTOCOL.md 4.2) with seq 0, into shared memory (`Bytes`). The replay buffer
//! (CRITICAL and IMPORTANT), every subscriber's queue that holds it, and a resuming
//! subscriber's replay all hold references to that one encoding, never copies; each
//! connection's writer writes its own seq into the copy it sends (docs/DESIGN.md section 5.3).

use std::sync::Arc;

use bytes::Bytes;

use crate::engine::Priority;
use crate::protocol::{self, ResultView, VERSION_2};

/// What a shared `Bytes` allocation costs beyond its bytes: the `bytes` crate's shared header
/// (buffer pointer, capacity, reference count).
const SHARED_HEADER: usize = 3 * std::mem::size_of::<usize>();

/// One encoded result (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub stream: Arc<str>,
    pub stream_seq: u64,
    pub priority: Priority,
    /// The version 2 binary result, seq 0 and flags 0.
    pub frame: Bytes,
}

impl Stored {
    /// Encodes `r` (its `stream_seq` set) once.
    pub fn new(stream: &Arc<str>, r: &ResultView<'_>) -> Stored {
        Stored {
            stream: Arc::clone(stream),
            stream_seq: r.stream_seq,
            priority: r.priority,
            frame: Bytes::from(protocol::encode_result(r, VERSION_2)),
        }
    }

    /// What it costs in memory, for `replay_max_bytes` (docs/PROTOCOL.md 7.4): its slot, its
    /// encoding and that encoding's shared header. Queues holding it add nothing: they hold the
    /// same bytes.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Stored>() + self.frame.len() + SHARED_HEADER
    }
}
