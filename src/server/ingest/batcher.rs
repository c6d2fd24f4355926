//! The dynamic batcher (docs/DESIGN.md section 4): complete samples wait per class; a batch
//! goes to the engine when `max_batch` samples wait or `max_batch_delay` after the oldest
//! (critical first), is assembled in each modality's wire dtype (a run of rows of one `samples`
//! frame with one copy, [`Waiting`]), and its completion is fanned out by a task of its own
//! ([`fan_out`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use super::aligner::Sample;
use super::waiting::{FrameRows, Waiting};
use crate::batch::Batch;
use crate::cluster::wire::Rows;
use crate::engine::{BatchResult, Priority};
use crate::error::Result;
use crate::server::fanout::deliver::{fan_out, Meta};
use crate::server::shared::Shared;
use crate::tensor::{DType, HostMat};

/// Samples waiting for a batch, per class, and the batches in flight.
#[derive(Default)]
pub(crate) struct Batcher {
    /// Each with when it was queued (the start of its latency on the status page).
    pending: [VecDeque<(Instant, Waiting)>; 3],
    /// Samples waiting per class (a frame's rows count each).
    waiting: [usize; 3],
    /// When the oldest waiting sample was queued (None: nothing waits).
    oldest: Option<Instant>,
    inflight: JoinSet<()>,
}

impl Batcher {
    /// Queues a complete sample.
    pub fn enqueue(&mut self, s: Sample, now: Instant) {
        self.push(Waiting::One(s), now);
    }

    /// Queues the whole samples of a `samples` frame, kept together.
    pub fn enqueue_rows(&mut self, r: FrameRows, now: Instant) {
        self.push(Waiting::Rows(r), now);
    }

    fn push(&mut self, w: Waiting, now: Instant) {
        self.oldest.get_or_insert(now);
        let c = w.priority() as usize;
        self.waiting[c] += w.len();
        self.pending[c].push_back((now, w));
    }

    /// When the oldest waiting sample is due (`max_batch_delay` after it was queued).
    pub fn deadline(&self, shared: &Shared) -> Option<Instant> {
        self.oldest.map(|t| t + shared.cfg.max_batch_delay)
    }

    /// Waits for one in-flight batch to finish; never returns while none is in flight.
    pub async fn join_one(&mut self) {
        if self.inflight.join_next().await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits for every in-flight batch.
    pub async fn join_all(&mut self) {
        while self.inflight.join_next().await.is_some() {}
    }

    /// Submits every batch that is full or due (`all`: everything waiting).
    pub fn flush(&mut self, shared: &Arc<Shared>, now: Instant, all: bool) {
        let max = shared.cfg.max_batch;
        loop {
            let total: usize = self.waiting.iter().sum();
            let due = self
                .oldest
                .is_some_and(|t| now >= t + shared.cfg.max_batch_delay);
            if total == 0 || !(total >= max || due || all) {
                break;
            }
            let mut take = Vec::new();
            let mut solo = Vec::new();
            let mut n = 0;
            for (q, count) in self.pending.iter_mut().zip(&mut self.waiting) {
                while n < max {
                    let Some((t, mut w)) = q.pop_front() else {
                        break;
                    };
                    // A whole frame of at least half a batch is a batch of its own, without a
                    // second copy of its rows (docs/DESIGN.md section 4.3); this class takes
                    // nothing more here, so its batches keep the order its rows came in.
                    if w.len() <= max && w.len() * 2 >= max && w.is_whole_frame() {
                        *count -= w.len();
                        solo.push((t, w));
                        break;
                    }
                    // A frame's run longer than the room left is split: the rest waits in front.
                    if let Some(front) = w.split_front(max - n) {
                        q.push_front((t, w));
                        w = front;
                    }
                    n += w.len();
                    *count -= w.len();
                    take.push((t, w));
                }
            }
            if n > 0 {
                self.submit(shared, take, n);
            }
            // After the mixed batch: it holds the higher classes' rows, and earlier rows of the
            // solo frames' own classes.
            for (t, w) in solo {
                let rows = w.len();
                self.submit(shared, vec![(t, w)], rows);
            }
            self.oldest = if self.pending.iter().all(|q| q.is_empty()) {
                None
            } else {
                Some(now)
            };
        }
    }

    /// Builds the batch of `rows` samples (each modality in its wire dtype when all rows agree,
    /// else f32) and hands it to the engine.
    fn submit(&mut self, shared: &Arc<Shared>, mut take: Vec<(Instant, Waiting)>, rows: usize) {
        let head = &shared.head;
        let m = head.num_modalities();
        // A batch that is exactly one frame takes its copied blocks as they are.
        let whole = match take.as_mut_slice() {
            [(_, w)] => w.whole_inputs(head),
            _ => None,
        };
        let inputs = whole.unwrap_or_else(|| assemble(shared, &take, rows));
        let mut mask = shared.engine.batch_buffer(rows * m);
        let mut queued = Vec::with_capacity(rows);
        let mut classes = Vec::with_capacity(rows);
        let mut priority = Priority::Bulk;
        for (t, w) in &take {
            w.append_mask(m, &mut mask);
            queued.extend(std::iter::repeat_n(*t, w.len()));
            classes.extend(std::iter::repeat_n(w.priority() as usize, w.len()));
            priority = priority.min(w.priority());
        }
        let mut metas: Vec<Meta> = Vec::with_capacity(take.len());
        for (_, w) in take {
            w.into_metas(m, &mut metas);
        }
        shared.m.samples.increment(rows as u64);
        shared.m.batch_size.record(rows as f64);
        match dispatch(shared, Batch { rows, inputs, mask }, priority, &metas) {
            Ok(ticket) => {
                let sh = Arc::clone(shared);
                self.inflight.spawn(async move {
                    let r = ticket.await;
                    let ok = r.is_ok();
                    fan_out(&sh, metas, r);
                    if ok {
                        record_latency(&sh, &classes, &queued);
                    }
                });
            }
            Err(e) => fan_out(shared, metas, Err(e)),
        }
    }
}

/// Copies the batch's matrices out of its entries (each modality in its wire dtype when all
/// rows agree, else f32), into buffers from the engine's pool.
fn assemble(shared: &Shared, take: &[(Instant, Waiting)], rows: usize) -> Vec<HostMat> {
    let head = &shared.head;
    let mut inputs = Vec::with_capacity(head.num_modalities());
    let mut tmp = Vec::new();
    for (i, md) in head.modalities.iter().enumerate() {
        let mut dt = None;
        let mut mixed = false;
        for d in take.iter().filter_map(|(_, w)| w.dtype_of(i)) {
            mixed |= dt.is_some_and(|x| x != d);
            dt = Some(d);
        }
        let dtype = if mixed {
            DType::F32
        } else {
            dt.unwrap_or(DType::F32)
        };
        // Appended entry by entry (no zero-fill of the whole matrix first): absent rows are
        // zeros, rows in another dtype are widened to f32.
        let mut bytes = shared.engine.batch_buffer(rows * md.width * dtype.size());
        for (_, w) in take {
            w.append_modality(i, md.width, dtype, &mut bytes, &mut tmp);
        }
        inputs.push(HostMat {
            dtype,
            rows,
            cols: md.width,
            bytes: bytes.into(),
        });
    }
    inputs
}

/// A batch's result to come, from the local engine or from NATS.
type Pending = Pin<Box<dyn Future<Output = Result<BatchResult>> + Send>>;

/// Hands the batch to the local engine, or to the NATS gateway under `serve --nats`
/// (docs/DESIGN.md section 11).
fn dispatch(shared: &Shared, batch: Batch, priority: Priority, metas: &[Meta]) -> Result<Pending> {
    match &shared.nats {
        None => Ok(Box::pin(shared.engine.submit(batch, priority)?)),
        Some(gw) => {
            let samples = || metas.iter().flat_map(Meta::samples);
            let rows = Rows {
                streams: samples().map(|(s, ..)| s.to_string()).collect(),
                keys: samples().map(|(_, k, ..)| k.to_string()).collect(),
                priorities: samples().map(|(_, _, p, _)| p).collect(),
                mask: Vec::new(), // the gateway takes the batch's
            };
            Ok(Box::pin(gw.submit(batch, priority, rows)))
        }
    }
}

/// Records each result's latency, queued for a batch -> handed to its subscribers, per class
/// (`GET /status.json`, docs/DESIGN.md section 8).
fn record_latency(shared: &Shared, classes: &[usize], queued: &[Instant]) {
    let now = Instant::now();
    for c in 0..3 {
        let lat = classes
            .iter()
            .zip(queued)
            .filter(|(k, _)| **k == c)
            .map(|(_, t)| now.saturating_duration_since(*t));
        shared.m.latency.record(c, now, lat);
    }
}
