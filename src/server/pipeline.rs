//! The data path after validation: one task owns the aligner and the dynamic batcher (up to
//! `max_batch` samples or `max_batch_delay` after the first, critical first), submits batches
//! to the engine without blocking, and each batch's completion fans results out to the
//! subscribers of their streams by try-pushing into the subscribers' queues.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::aligner::{Aligner, Ingest, IngestMsg, IngestSamples, Offer, Part, Sample};
use super::codec::{Code, ResultView};
use super::messages::{self, About};
use super::outbound::Outbound;
use super::Shared;
use crate::batch::Batch;
use crate::engine::{BatchResult, Priority};
use crate::error::Result;
use crate::tensor::{bytes_to_f32, DType, HostMat};

/// What the fan-out needs of a sample once its features are in the batch.
struct Meta {
    stream: Arc<str>,
    key: String,
    priority: Priority,
    mask: Vec<u8>,
    producers: Vec<Arc<Outbound>>,
}

/// Runs until `stop` fires and everything open and in flight is done (or `shutdown_grace`).
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<IngestMsg>,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    let mut aligner = Aligner::new(
        shared.head.num_modalities(),
        cfg.align_timeout,
        cfg.max_open_samples,
    );
    let mut pending: [VecDeque<Sample>; 3] = Default::default();
    let mut oldest: Option<Instant> = None;
    let mut inflight: JoinSet<()> = JoinSet::new();
    let mut expired = Vec::new();
    loop {
        let deadline = [
            aligner.next_deadline(),
            oldest.map(|t| t + cfg.max_batch_delay),
        ]
        .into_iter()
        .flatten()
        .min();
        let fill = ingest_fill(&shared);
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            msg = rx.recv() => {
                let Some(first) = msg else { break };
                let now = Instant::now();
                take(&shared, &mut aligner, first, fill, now, &mut pending, &mut oldest);
                // Take what else is queued without going back to the scheduler.
                for _ in 0..1024 {
                    match rx.try_recv() {
                        Ok(m) => take(&shared, &mut aligner, m, fill, now, &mut pending, &mut oldest),
                        Err(_) => break,
                    }
                }
            }
            _ = sleep_opt(deadline) => {}
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
        }
        let now = Instant::now();
        aligner.expire(now, &mut expired);
        timed_out(&shared, &mut expired, &mut pending, &mut oldest, now);
        shared.m.open_samples.set(aligner.len() as f64);
        flush(
            &shared,
            &mut pending,
            &mut oldest,
            &mut inflight,
            now,
            false,
        );
        let open = aligner.len() as f64 / cfg.max_open_samples.max(1) as f64;
        shared.pressure.observe(open.max(ingest_fill(&shared)));
    }
    // Shutdown: what is queued and open is fused with what it has, then in-flight finishes.
    rx.close();
    let now = Instant::now();
    while let Ok(m) = rx.try_recv() {
        take(
            &shared,
            &mut aligner,
            m,
            0.0,
            now,
            &mut pending,
            &mut oldest,
        );
    }
    aligner.drain(&mut expired);
    timed_out(&shared, &mut expired, &mut pending, &mut oldest, now);
    flush(&shared, &mut pending, &mut oldest, &mut inflight, now, true);
    shared.m.open_samples.set(0.0);
    let drained = tokio::time::timeout(cfg.shutdown_grace, async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown: in-flight batches did not finish within the grace period");
    }
}

/// Fill of the bounded stages after the aligner: the ingest queue (connections to this task;
/// its messages plus the rows of its `samples` frames) and the engine's admitted batches.
fn ingest_fill(shared: &Shared) -> f64 {
    let q = &shared.ingest;
    let queue = shared.ingest_queued() as f64 / q.max_capacity().max(1) as f64;
    queue.max(shared.engine.saturation())
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn about(ing: &Ingest) -> About<'_> {
    About {
        id: ing.id.as_ref(),
        stream: Some(&ing.stream),
        key: Some(&ing.key),
        modality: None,
    }
}

/// One message from the ingest queue: a modality to align, or whole samples to batch.
#[allow(clippy::too_many_arguments)]
fn take(
    shared: &Shared,
    aligner: &mut Aligner,
    msg: IngestMsg,
    engine_fill: f64,
    now: Instant,
    pending: &mut [VecDeque<Sample>; 3],
    oldest: &mut Option<Instant>,
) {
    let open = aligner.len() as f64 / shared.cfg.max_open_samples.max(1) as f64;
    match msg {
        IngestMsg::One(ing) => {
            shared
                .pressure
                .producing(open.max(engine_fill), &ing.producer);
            offer(shared, aligner, ing, now, pending, oldest)
        }
        IngestMsg::Samples(s) => {
            shared
                .ingest_rows
                .fetch_sub(s.rows(), std::sync::atomic::Ordering::AcqRel);
            shared
                .pressure
                .producing(open.max(engine_fill), &s.producer);
            whole_samples(shared, s, now, pending, oldest);
        }
    }
}

/// The samples of a `samples` frame, complete on arrival: each becomes a [`Sample`] whose parts
/// share the frame's buffer, queued for the batcher like a sample the aligner completed.
fn whole_samples(
    shared: &Shared,
    s: IngestSamples,
    now: Instant,
    pending: &mut [VecDeque<Sample>; 3],
    oldest: &mut Option<Instant>,
) {
    let m = shared.head.num_modalities();
    let widths: Vec<usize> = s
        .modalities
        .iter()
        .map(|&mi| shared.head.modalities.get(mi).map_or(0, |md| md.width) * s.dtype.size())
        .collect();
    let n = s.keys.len();
    for (i, key) in s.keys.iter().enumerate() {
        let mut parts = vec![None; m];
        for ((&mi, block), &row) in s.modalities.iter().zip(&s.blocks).zip(&widths) {
            if let Some(slot) = parts.get_mut(mi) {
                *slot = Some(Part {
                    dtype: s.dtype,
                    payload: block.slice(i * row..(i + 1) * row),
                });
            }
        }
        enqueue(
            Sample {
                stream: Arc::clone(&s.stream),
                key: key.clone(),
                priority: s.priority,
                parts,
                present: s.modalities.len(),
                producers: vec![Arc::clone(&s.producer)],
            },
            now,
            pending,
            oldest,
        );
    }
    if s.ack {
        let a = About {
            id: s.id.as_ref(),
            stream: Some(&s.stream),
            key: None,
            modality: None,
        };
        s.producer.push_control(messages::ack_samples(&a, n));
    }
    // After the reply is queued: the reader reserved CONTROL room for it.
    s.producer.end_request();
}

/// A `samples` frame refused as a whole under saturation: one `shed` notice (BULK) or one
/// retryable `overloaded` error naming every key.
pub(crate) fn refuse_samples(shared: &Shared, s: &IngestSamples, why: &str) {
    let producers = std::slice::from_ref(&s.producer);
    let samples = s.keys.iter().map(|k| (&s.stream, k, s.priority, producers));
    tell_producers(shared, samples, Code::Overloaded, why);
}

fn offer(
    shared: &Shared,
    aligner: &mut Aligner,
    ing: Ingest,
    now: Instant,
    pending: &mut [VecDeque<Sample>; 3],
    oldest: &mut Option<Instant>,
) {
    let name = |i: usize| shared.head.modalities.get(i).map(|m| m.name.as_str());
    let producer = Arc::clone(&ing.producer);
    let ack = ing.ack.then(|| {
        (
            ing.producer.clone(),
            ing.id.clone(),
            ing.stream.clone(),
            ing.key.clone(),
            ing.modality,
        )
    });
    match aligner.offer(ing, now) {
        Offer::Complete(s) => enqueue(s, now, pending, oldest),
        Offer::Pending => {}
        Offer::Duplicate(ing) => {
            let a = About {
                modality: name(ing.modality),
                ..about(&ing)
            };
            shared.m.error(Code::DuplicateModality);
            let msg = "this modality already arrived for the open sample; ignored";
            ing.producer
                .push_control(messages::error(Code::DuplicateModality, msg, &a));
        }
        Offer::Full(ing) => {
            let a = About {
                modality: name(ing.modality),
                ..about(&ing)
            };
            let why = format!("{} open samples (max_open_samples)", aligner.len());
            refuse(shared, &ing.producer, ing.priority, &a, &why);
        }
    }
    if let Some((p, id, stream, key, m)) = ack {
        let a = About {
            id: id.as_ref(),
            stream: Some(&stream),
            key: Some(&key),
            modality: name(m),
        };
        p.push_control(messages::ack("produce", &a));
    }
    // After the reply is queued: the reader reserved CONTROL room for it.
    producer.end_request();
}

/// Saturation: BULK is shed with a notice, other classes get a retryable overload error; the
/// producer has been told `ingest_backpressure` `on` before either.
pub(crate) fn refuse(shared: &Shared, to: &Arc<Outbound>, p: Priority, a: &About<'_>, why: &str) {
    shared.pressure.refusing(to);
    if p == Priority::Bulk {
        to.push_control(messages::shed(a, why));
    } else {
        shared.m.error(Code::Overloaded);
        to.push_control(messages::error(Code::Overloaded, why, a));
    }
}

fn enqueue(
    s: Sample,
    now: Instant,
    pending: &mut [VecDeque<Sample>; 3],
    oldest: &mut Option<Instant>,
) {
    oldest.get_or_insert(now);
    pending[s.priority as usize].push_back(s);
}

fn timed_out(
    shared: &Shared,
    expired: &mut Vec<Sample>,
    pending: &mut [VecDeque<Sample>; 3],
    oldest: &mut Option<Instant>,
    now: Instant,
) {
    let mut incomplete = Vec::new();
    for s in expired.drain(..) {
        shared.m.align_timeouts.increment(1);
        if s.present >= shared.cfg.min_modalities.max(1) {
            enqueue(s, now, pending, oldest);
            continue;
        }
        incomplete.push(s);
    }
    if incomplete.is_empty() {
        return;
    }
    let msg = format!(
        "fewer than min_modalities ({}) modalities arrived within align_timeout",
        shared.cfg.min_modalities
    );
    tell_producers(
        shared,
        incomplete
            .iter()
            .map(|s| (&s.stream, &s.key, s.priority, &s.producers[..])),
        Code::IncompleteSample,
        &msg,
    );
}

/// One message per (producer, stream, shed or not) about many samples, so that a burst of
/// failures costs a producer a few CONTROL slots, not one per sample.
fn tell_producers<'a>(
    shared: &Shared,
    samples: impl Iterator<Item = (&'a Arc<str>, &'a String, Priority, &'a [Arc<Outbound>])>,
    code: Code,
    msg: &str,
) {
    type Group<'g> = (&'g Arc<Outbound>, &'g Arc<str>, bool, Vec<String>);
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (stream, key, prio, producers) in samples {
        let shed = code == Code::Overloaded && prio == Priority::Bulk;
        for p in producers {
            match groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(g.0, p) && g.1 == stream && g.2 == shed)
            {
                Some(g) => g.3.push(key.clone()),
                None => groups.push((p, stream, shed, vec![key.clone()])),
            }
        }
    }
    for (p, stream, shed, keys) in groups {
        if code == Code::Overloaded {
            shared.pressure.refusing(p);
        }
        if !shed {
            shared.m.error(code);
        }
        p.push_control(messages::about_samples(code, msg, stream, &keys, shed));
    }
}

fn flush(
    shared: &Arc<Shared>,
    pending: &mut [VecDeque<Sample>; 3],
    oldest: &mut Option<Instant>,
    inflight: &mut JoinSet<()>,
    now: Instant,
    all: bool,
) {
    let max = shared.cfg.max_batch;
    loop {
        let total: usize = pending.iter().map(|q| q.len()).sum();
        let due = oldest.is_some_and(|t| now >= t + shared.cfg.max_batch_delay);
        if total == 0 || !(total >= max || due || all) {
            break;
        }
        let mut take = Vec::with_capacity(total.min(max));
        for q in pending.iter_mut() {
            while take.len() < max {
                match q.pop_front() {
                    Some(s) => take.push(s),
                    None => break,
                }
            }
        }
        submit(shared, take, inflight);
        *oldest = if pending.iter().all(|q| q.is_empty()) {
            None
        } else {
            Some(now)
        };
    }
}

/// Builds the batch (each modality in its wire dtype when all rows agree, else f32) and hands
/// it to the engine.
fn submit(shared: &Arc<Shared>, samples: Vec<Sample>, inflight: &mut JoinSet<()>) {
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
    match shared.engine.submit(Batch { rows, inputs, mask }, priority) {
        Ok(ticket) => {
            let sh = Arc::clone(shared);
            inflight.spawn(async move {
                let r = ticket.await;
                fan_out(&sh, metas, r);
            });
        }
        Err(e) => fan_out(shared, metas, Err(e)),
    }
}

/// Sends each result to every subscriber of its stream, or the error to its producers.
fn fan_out(shared: &Shared, metas: Vec<Meta>, r: Result<BatchResult>) {
    let res = match r {
        Ok(res) => res,
        Err(e) => {
            let code = Code::of_engine_error(&e);
            let it = metas
                .iter()
                .map(|m| (&m.stream, &m.key, m.priority, &m.producers[..]));
            tell_producers(shared, it, code, &e.to_string());
            return;
        }
    };
    let (d, m) = (shared.head.dim, shared.head.num_modalities());
    for (i, meta) in metas.iter().enumerate() {
        let (Some(fused), Some(weights)) = (
            res.outputs.fused.get(i * d..(i + 1) * d),
            res.outputs.weights.get(i * m..(i + 1) * m),
        ) else {
            continue;
        };
        let view = ResultView {
            stream: &meta.stream,
            key: &meta.key,
            priority: meta.priority,
            mask: &meta.mask,
            fused,
            weights,
            stream_seq: 0,
            replayed: false,
        };
        // Stream seq, replay buffer, then every subscriber (replay.rs).
        shared.replay.deliver(&shared.registry, &meta.stream, &view);
    }
    // Every result was encoded into its own message: the buffers go back to the engine.
    shared.engine.recycle(res.outputs);
}
