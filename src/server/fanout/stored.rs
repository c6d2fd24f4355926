//! A fused result as the server keeps it after its batch: in the replay buffer (CRITICAL and
//! IMPORTANT) and waiting in a resuming subscriber's queue. Shared (`Arc`) by both, so a
//! result is stored once however many subscribers replay it.

use std::sync::Arc;

use crate::engine::Priority;
use crate::protocol::ResultView;

/// A result kept for replay (CRITICAL and IMPORTANT only).
#[derive(Debug)]
pub(crate) struct Entry {
    pub stream: Arc<str>,
    pub key: String,
    pub stream_seq: u64,
    pub priority: Priority,
    pub mask: Vec<u8>,
    pub fused: Vec<f32>,
    pub weights: Vec<f32>,
}

impl Entry {
    /// The result as the codec encodes it.
    pub fn view(&self, replayed: bool) -> ResultView<'_> {
        ResultView {
            stream: &self.stream,
            key: &self.key,
            priority: self.priority,
            mask: &self.mask,
            fused: &self.fused,
            weights: &self.weights,
            stream_seq: self.stream_seq,
            replayed,
        }
    }

    /// What it costs in memory, for `replay_max_bytes`.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Entry>()
            + self.key.len()
            + self.mask.len()
            + 4 * (self.fused.len() + self.weights.len())
    }
}
