//! A submitted batch (a job), its one-shot reply, and the [`Ticket`] the caller holds.
//!
//! Exactly-once delivery: the reply sender sits in a `Mutex<Option<_>>` and is *taken* to
//! deliver, so a second delivery is impossible by construction; the engine additionally only
//! accepts a completion from the worker generation the job is currently assigned to, so a late
//! result from an abandoned (hung) worker never even reaches the reply. Attempts to deliver
//! twice are counted (`fusion_engine_duplicate_deliveries_total`), and must stay at zero.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::buffers::BufferPool;
use crate::batch::{Batch, Outputs};
use crate::error::{Error, Result};

/// Scheduling class of a batch; higher classes leave the engine's pending queue first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Latency-critical.
    Critical = 0,
    /// Normal.
    #[default]
    Important = 1,
    /// Throughput traffic.
    Bulk = 2,
}

impl Priority {
    /// All classes, highest first.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Important, Priority::Bulk];
}

/// A fused batch as delivered to the caller.
#[derive(Debug, Clone)]
pub struct BatchResult {
    /// `fused` `[B, D]` and `weights` `[B, M]`.
    pub outputs: Outputs,
    /// The device that computed it, e.g. `cpu:0`.
    pub device: String,
    /// Index of that device in the engine's device list.
    pub device_index: usize,
    /// Runs that failed before this one (0 = first try).
    pub retries: u32,
    /// Time on the device (including injected latency).
    pub device_time: Duration,
    /// Time from submission to delivery.
    pub total_time: Duration,
}

type Reply = oneshot::Sender<Result<BatchResult>>;

/// The shared part of a job: the batch and its reply slot.
#[derive(Debug)]
pub(crate) struct JobInner {
    pub id: u64,
    pub batch: Arc<Batch>,
    pub priority: Priority,
    pub submitted: Instant,
    reply: Mutex<Option<Reply>>,
    /// Where the batch's buffers go when the engine drops it (docs/DESIGN.md section 6).
    buffers: Arc<BufferPool>,
}

impl Drop for JobInner {
    /// The last reference to the job is gone: no device runs or will run its batch any more,
    /// so its buffers can be handed out again (unless the caller still shares the batch).
    fn drop(&mut self) {
        if let Some(b) = Arc::get_mut(&mut self.batch) {
            self.buffers.give_batch(b);
        }
    }
}

impl JobInner {
    /// Delivers the result once; returns false when it had already been delivered.
    pub fn deliver(&self, r: Result<BatchResult>, duplicates: &AtomicU64) -> bool {
        match self.reply.lock().take() {
            Some(tx) => {
                // The caller may have dropped its ticket; that is its choice, not an error.
                let _ = tx.send(r);
                true
            }
            None => {
                duplicates.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fusion_engine_duplicate_deliveries_total").increment(1);
                tracing::error!(job = self.id, "suppressed a second delivery of a batch");
                false
            }
        }
    }
}

/// A job as the engine tracks it: shared inner part plus retry bookkeeping.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub inner: Arc<JobInner>,
    /// Runs that started and failed (device error, panic, hang).
    pub failed_runs: u32,
    /// Devices this job failed on; avoided for its retry while another device is usable.
    pub avoid: Vec<usize>,
}

impl Job {
    pub fn new(
        id: u64,
        batch: Arc<Batch>,
        priority: Priority,
        buffers: Arc<BufferPool>,
    ) -> (Job, Ticket) {
        let (tx, rx) = oneshot::channel();
        let inner = Arc::new(JobInner {
            id,
            batch,
            priority,
            submitted: Instant::now(),
            reply: Mutex::new(Some(tx)),
            buffers,
        });
        let job = Job {
            inner,
            failed_runs: 0,
            avoid: Vec::new(),
        };
        (job, Ticket { id, rx })
    }

    pub fn rows(&self) -> usize {
        self.inner.batch.rows
    }

    /// Whether it has waited at least `aging` since submission (anti-starvation).
    pub fn aged(&self, now: Instant, aging: Duration) -> bool {
        now.saturating_duration_since(self.inner.submitted) >= aging
    }
}

/// The caller's handle on a submitted batch. Await it (it is a `Future`, cheap to poll from a
/// tokio task: nothing blocks) or call [`Ticket::wait`] from a plain thread. It resolves
/// exactly once: with the result, or with the error that ended the batch (a bad input, a
/// device failure after the retry, a queue timeout, or shutdown).
#[derive(Debug)]
pub struct Ticket {
    id: u64,
    rx: oneshot::Receiver<Result<BatchResult>>,
}

fn dropped() -> Error {
    Error::Shutdown("the engine dropped the batch without a result".into())
}

impl Ticket {
    /// The engine's id of this batch.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Blocks the current thread until the batch is done. Do not call it from inside an async
    /// runtime (await the ticket there); tokio panics on blocking in its worker threads.
    pub fn wait(self) -> Result<BatchResult> {
        self.rx.blocking_recv().unwrap_or_else(|_| Err(dropped()))
    }

    /// The result if it is already there; the ticket back otherwise.
    pub fn try_take(mut self) -> std::result::Result<Result<BatchResult>, Ticket> {
        match self.rx.try_recv() {
            Ok(r) => Ok(r),
            Err(oneshot::error::TryRecvError::Empty) => Err(self),
            Err(oneshot::error::TryRecvError::Closed) => Ok(Err(dropped())),
        }
    }
}

impl Future for Ticket {
    type Output = Result<BatchResult>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(dropped())))
    }
}
