//! The bounded ingest queue between the connection readers and the pipeline task, and its
//! accounting in one place: a `samples` frame counts as its rows (sample x modality), a single
//! produce message as one, against `ingest_capacity` (docs/PROTOCOL.md section 5.1).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::keys::FrameKeys;
use crate::engine::{PooledBlocks, Priority};
use crate::server::fanout::outbound::Outbound;
use crate::tensor::DType;

/// One produce message after validation, on its way to the aligner.
#[derive(Debug)]
pub(crate) struct Ingest {
    pub stream: Arc<str>,
    pub key: String,
    pub modality: usize,
    pub dtype: DType,
    pub priority: Priority,
    /// Exactly `width * dtype.size()` little-endian bytes, all finite.
    pub payload: Bytes,
    pub last: bool,
    pub ack: bool,
    /// The request id, echoed in acks and errors.
    pub id: Option<serde_json::Value>,
    pub producer: Arc<Outbound>,
}

/// Whole samples of one `samples` frame after validation: complete on arrival, they skip the
/// aligner and go to the batcher.
#[derive(Debug)]
pub(crate) struct IngestSamples {
    pub stream: Arc<str>,
    /// One key per row, in one allocation.
    pub keys: Arc<FrameKeys>,
    pub dtype: DType,
    pub priority: Priority,
    /// Head index of each modality in the frame, frame order.
    pub modalities: Vec<usize>,
    /// One `[N, width]` block per listed modality (all finite, exact lengths), copied out of
    /// the frame into pooled buffers.
    pub blocks: PooledBlocks,
    pub ack: bool,
    pub id: Option<serde_json::Value>,
    pub producer: Arc<Outbound>,
}

impl IngestSamples {
    /// Rows (sample x modality) it carries: its weight against `ingest_capacity`.
    pub fn rows(&self) -> usize {
        self.keys.len() * self.modalities.len()
    }
}

/// What a connection hands to the pipeline.
#[derive(Debug)]
pub(crate) enum IngestMsg {
    /// One modality of one sample.
    One(Ingest),
    /// Many whole samples.
    Samples(IngestSamples),
}

/// The sending side of the ingest queue, shared by every connection reader; the pipeline holds
/// the receiver.
pub(crate) struct IngestQueue {
    tx: mpsc::Sender<IngestMsg>,
    /// Rows (sample x modality) queued in `samples` frames: they count against
    /// `ingest_capacity` like as many single produce messages.
    rows: AtomicUsize,
}

impl IngestQueue {
    /// A queue of `capacity` messages (or rows) and its receiver.
    pub fn new(capacity: usize) -> (IngestQueue, mpsc::Receiver<IngestMsg>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let q = IngestQueue {
            tx,
            rows: AtomicUsize::new(0),
        };
        (q, rx)
    }

    /// Capacity, in messages (or rows).
    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// What waits, in the capacity's unit: messages plus the rows of the `samples` frames among
    /// them.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
            + self.rows.load(Ordering::Acquire)
    }

    /// `queued / capacity`.
    pub fn fill(&self) -> f64 {
        self.queued() as f64 / self.capacity().max(1) as f64
    }

    /// Whether there is room for `rows` more rows of a `samples` frame: queued messages plus
    /// queued rows stay within the capacity (a frame larger than that is let in when no other
    /// frame is queued, so that it is not refused forever).
    fn room_for(&self, rows: usize) -> bool {
        self.rows.load(Ordering::Acquire) == 0 || self.queued() + rows <= self.capacity()
    }

    /// Queues `msg` if there is room now; gives it back otherwise (`Full`), or when the
    /// pipeline is gone (`Closed`).
    // The message is handed back whole in `Full` so that the caller can retry it without a
    // copy; boxing it would cost an allocation per produce message on the hot path.
    #[allow(clippy::result_large_err)]
    pub fn try_push(&self, msg: IngestMsg) -> Result<(), TrySendError<IngestMsg>> {
        let rows = match &msg {
            IngestMsg::One(_) => return self.tx.try_send(msg),
            IngestMsg::Samples(s) => s.rows(),
        };
        if !self.room_for(rows) {
            return Err(TrySendError::Full(msg));
        }
        self.rows.fetch_add(rows, Ordering::AcqRel);
        self.tx.try_send(msg).inspect_err(|_| {
            self.rows.fetch_sub(rows, Ordering::AcqRel);
        })
    }

    /// Queues a single produce message, waiting for room (the caller bounds the wait; a
    /// `samples` frame never waits here: its rows are checked by [`IngestQueue::try_push`]).
    pub async fn push_waiting(
        &self,
        msg: IngestMsg,
    ) -> Result<(), mpsc::error::SendError<IngestMsg>> {
        self.tx.send(msg).await
    }

    /// The pipeline took `msg` off the queue: its rows no longer count.
    pub fn taken(&self, msg: &IngestMsg) {
        if let IngestMsg::Samples(s) = msg {
            self.rows.fetch_sub(s.rows(), Ordering::AcqRel);
        }
    }
}
