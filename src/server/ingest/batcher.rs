//! The dynamic batcher (docs/DESIGN.md section 4): complete samples wait per class; a batch
//! goes to the engine when `max_batch` samples wait or `max_batch_delay` after the oldest
//! (critical first), is assembled row by row in each modality's wire dtype, and its completion
//! is fanned out by a task of its own ([`fan_out`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use super::aligner::Sample;
use crate::batch::Batch;
use crate::cluster::wire::Rows;
use crate::engine::{BatchResult, Priority};
use crate::error::Result;
use crate::server::fanout::deliver::{fan_out, Meta};
use crate::server::shared::Shared;
use crate::tensor::{bytes_to_f32, DType, HostMat};

/// Samples waiting for a batch, per class, and the batches in flight.
#[derive(Default)]
pub(crate) struct Batcher {
    /// Each with when it was queued (the start of its latency on the status page).
    pending: [VecDeque<(Instant, Sample)>; 3],
    /// When the oldest waiting sample was queued (None: nothing waits).
    oldest: Option<Instant>,
    inflight: JoinSet<()>,
}

impl Batcher {
    /// Queues a complete sample.
    pub fn enqueue(&mut self, s: Sample, now: Instant) {
        self.oldest.get_or_insert(now);
        self.pending[s.priority as usize].push_back((now, s));
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
            let total: usize = self.pending.iter().map(|q| q.len()).sum();
            let due = self
                .oldest
                .is_some_and(|t| now >= t + shared.cfg.max_batch_delay);
            if total == 0 || !(total >= max || due || all) {
                break;
            }
            let mut take = Vec::with_capacity(total.min(max));
            for q in self.pending.iter_mut() {
                while take.len() < max {
                    match q.pop_front() {
                        Some(s) => take.push(s),
                        None => break,
                    }
                }
            }
            self.submit(shared, take);
            self.oldest = if self.pending.iter().all(|q| q.is_empty()) {
                None
            } else {
                Some(now)
            };
        }
    }

    /// Builds the batch (each modality in its wire dtype when all rows agree, else f32) and hands
    /// it to the engine.
    fn submit(&mut self, shared: &Arc<Shared>, samples: Vec<(Instant, Sample)>) {
        let (queued, samples): (Vec<Instant>, Vec<Sample>) = samples.into_iter().unzip();
        let head = &shared.head;
        let (rows, m) = (samples.len(), head.num_modalities());
        let mut inputs = Vec::with_capacity(m);
        for (i, md) in head.modalities.iter().enumerate() {
            let mut dt = None;
            let mut mixed = false;
            for p in samples.iter().filter_map(|s| s.parts[i].as_ref()) {
                mixed |= dt.is_some_and(|d| d != p.dtype);
                dt = Some(p.dtype);
            }
            let dtype = if mixed {
                DType::F32
            } else {
                dt.unwrap_or(DType::F32)
            };
            let row_bytes = md.width * dtype.size();
            // Appended row by row (no zero-fill of the whole matrix first): absent rows are zeros,
            // a row in another dtype is widened to f32. Payload lengths were checked at ingest; a
            // row of any other length would be zeros, never a shifted matrix.
            let mut bytes = Vec::with_capacity(rows * row_bytes);
            let mut tmp = Vec::new();
            for s in &samples {
                let end = bytes.len() + row_bytes;
                match &s.parts[i] {
                    Some(p) if p.dtype == dtype && p.payload.len() == row_bytes => {
                        bytes.extend_from_slice(&p.payload);
                    }
                    Some(p) if p.dtype != dtype && p.payload.len() == md.width * p.dtype.size() => {
                        tmp.clear();
                        tmp.resize(md.width, 0f32);
                        bytes_to_f32(p.dtype, &p.payload, &mut tmp);
                        bytes.extend_from_slice(bytemuck::cast_slice(&tmp));
                    }
                    _ => {}
                }
                bytes.resize(end, 0);
            }
            inputs.push(HostMat {
                dtype,
                rows,
                cols: md.width,
                bytes,
            });
        }
        let mask: Vec<u8> = samples.iter().flat_map(|s| s.mask()).collect();
        let priority = samples.iter().map(|s| s.priority).min().unwrap_or_default();
        let classes: Vec<usize> = samples.iter().map(|s| s.priority as usize).collect();
        let metas: Vec<Meta> = samples
            .into_iter()
            .map(|s| Meta {
                mask: s.mask(),
                stream: s.stream,
                key: s.key,
                priority: s.priority,
                producers: s.producers,
            })
            .collect();
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

/// A batch's result to come, from the local engine or from NATS.
type Pending = Pin<Box<dyn Future<Output = Result<BatchResult>> + Send>>;

/// Hands the batch to the local engine, or to the NATS gateway under `serve --nats`
/// (docs/DESIGN.md section 11).
fn dispatch(shared: &Shared, batch: Batch, priority: Priority, metas: &[Meta]) -> Result<Pending> {
    match &shared.nats {
        None => Ok(Box::pin(shared.engine.submit(batch, priority)?)),
        Some(gw) => {
            let rows = Rows {
                streams: metas.iter().map(|m| m.stream.to_string()).collect(),
                keys: metas.iter().map(|m| m.key.clone()).collect(),
                priorities: metas.iter().map(|m| m.priority).collect(),
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
