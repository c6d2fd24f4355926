//! The pipeline task: one task owns the aligner and the batcher. It takes what the connection
//! readers queued (single modalities to align, whole samples to batch), fuses samples the
//! aligner times out, refuses under saturation, and flushes due batches to the engine.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::aligner::{Aligner, Offer, Sample};
use super::batcher::Batcher;
use super::queue::{Ingest, IngestMsg, IngestSamples};
use super::waiting::FrameRows;
use crate::engine::Priority;
use crate::protocol::notices::{self, About};
use crate::protocol::Code;
use crate::server::fanout::deliver::tell_producers;
use crate::server::fanout::outbound::Outbound;
use crate::server::shared::Shared;

/// The pipeline's state: the aligner, the batcher and the samples the aligner just expired.
struct Pipeline {
    shared: Arc<Shared>,
    aligner: Aligner,
    batcher: Batcher,
    expired: Vec<Sample>,
}

/// Runs until `stop` fires and everything open and in flight is done (or `shutdown_grace`).
pub(crate) async fn run_pipeline(
    shared: Arc<Shared>,
    mut rx: tokio::sync::mpsc::Receiver<IngestMsg>,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    let mut p = Pipeline {
        aligner: Aligner::new(
            shared.head.num_modalities(),
            cfg.align_timeout,
            cfg.max_open_samples,
        ),
        batcher: Batcher::default(),
        expired: Vec::new(),
        shared: Arc::clone(&shared),
    };
    loop {
        let deadline = [p.aligner.next_deadline(), p.batcher.deadline(&shared)]
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
                p.take(first, fill, now);
                // Take what else is queued without going back to the scheduler.
                for _ in 0..1024 {
                    match rx.try_recv() {
                        Ok(m) => p.take(m, fill, now),
                        Err(_) => break,
                    }
                }
            }
            _ = sleep_opt(deadline) => {}
            _ = p.batcher.join_one() => {}
        }
        let now = Instant::now();
        p.expire(now, false);
        p.batcher.flush(&shared, now, false);
        let open = p.open_fill();
        shared.pressure.observe(open.max(ingest_fill(&shared)));
    }
    // Shutdown: what is queued and open is fused with what it has, then in-flight finishes.
    rx.close();
    let now = Instant::now();
    while let Ok(m) = rx.try_recv() {
        p.take(m, 0.0, now);
    }
    p.expire(now, true);
    p.batcher.flush(&shared, now, true);
    shared.m.open_samples.set(0.0);
    let drained = tokio::time::timeout(cfg.shutdown_grace, p.batcher.join_all()).await;
    if drained.is_err() {
        tracing::warn!("shutdown: in-flight batches did not finish within the grace period");
    }
}

/// Fill of the bounded stages after the aligner: the ingest queue (connections to this task;
/// its messages plus the rows of its `samples` frames) and the engine's admitted batches.
fn ingest_fill(shared: &Shared) -> f64 {
    shared.ingest.fill().max(shared.engine.saturation())
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

impl Pipeline {
    /// Open samples against `max_open_samples`.
    fn open_fill(&self) -> f64 {
        self.aligner.len() as f64 / self.shared.cfg.max_open_samples.max(1) as f64
    }

    /// One message from the ingest queue: a modality to align, or whole samples to batch.
    fn take(&mut self, msg: IngestMsg, engine_fill: f64, now: Instant) {
        self.shared.ingest.taken(&msg);
        let fill = self.open_fill().max(engine_fill);
        match msg {
            IngestMsg::One(ing) => {
                self.shared.pressure.producing(fill, &ing.producer);
                self.offer(ing, now)
            }
            IngestMsg::Samples(s) => {
                self.shared.pressure.producing(fill, &s.producer);
                self.whole_samples(s, now);
            }
        }
    }

    /// The samples of a `samples` frame, complete on arrival: queued for the batcher together,
    /// sharing the frame's buffer ([`FrameRows`]).
    fn whole_samples(&mut self, mut s: IngestSamples, now: Instant) {
        let n = s.keys.len();
        let (ack, id) = (s.ack, s.id.take());
        let (stream, producer) = (Arc::clone(&s.stream), Arc::clone(&s.producer));
        if let Some(rows) = FrameRows::of(s, &self.shared.head) {
            self.batcher.enqueue_rows(rows, now);
        }
        if ack {
            let a = About {
                id: id.as_ref(),
                stream: Some(&stream),
                key: None,
                modality: None,
            };
            producer.push_control(notices::ack_samples(&a, n));
        }
        // After the reply is queued: the reader reserved CONTROL room for it.
        producer.end_request();
    }

    fn offer(&mut self, ing: Ingest, now: Instant) {
        let shared = &self.shared;
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
        match self.aligner.offer(ing, now) {
            Offer::Complete(s) => self.batcher.enqueue(s, now),
            Offer::Pending => {}
            Offer::Duplicate(ing) => {
                let a = About {
                    modality: name(ing.modality),
                    ..about(&ing)
                };
                shared.m.error(Code::DuplicateModality);
                let msg = "this modality already arrived for the open sample; ignored";
                ing.producer
                    .push_control(notices::error(Code::DuplicateModality, msg, &a));
            }
            Offer::Full(ing) => {
                let a = About {
                    modality: name(ing.modality),
                    ..about(&ing)
                };
                let why = format!("{} open samples (max_open_samples)", self.aligner.len());
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
            p.push_control(notices::ack("produce", &a));
        }
        // After the reply is queued: the reader reserved CONTROL room for it.
        producer.end_request();
    }

    /// Samples whose align timeout passed (`all`: every open one, at shutdown) are batched
    /// with what they have if `min_modalities` arrived, else refused to their producers.
    fn expire(&mut self, now: Instant, all: bool) {
        let shared = Arc::clone(&self.shared);
        if all {
            self.aligner.drain(&mut self.expired);
        } else {
            self.aligner.expire(now, &mut self.expired);
        }
        let mut incomplete = Vec::new();
        for s in self.expired.drain(..) {
            shared.m.align_timeouts.increment(1);
            if s.present >= shared.cfg.min_modalities.max(1) {
                self.batcher.enqueue(s, now);
                continue;
            }
            incomplete.push(s);
        }
        shared.m.open_samples.set(self.aligner.len() as f64);
        if incomplete.is_empty() {
            return;
        }
        let msg = format!(
            "fewer than min_modalities ({}) modalities arrived within align_timeout",
            shared.cfg.min_modalities
        );
        tell_producers(
            &shared,
            incomplete
                .iter()
                .map(|s| (&s.stream, s.key.as_str(), s.priority, &s.producers[..])),
            Code::IncompleteSample,
            &msg,
        );
    }
}

/// A `samples` frame refused as a whole under saturation: one `shed` notice (BULK) or one
/// retryable `overloaded` error naming every key.
pub(crate) fn refuse_samples(shared: &Shared, s: &IngestSamples, why: &str) {
    let producers = std::slice::from_ref(&s.producer);
    let samples = s.keys.iter().map(|k| (&s.stream, k, s.priority, producers));
    tell_producers(shared, samples, Code::Overloaded, why);
}

/// Saturation: BULK is shed with a notice, other classes get a retryable overload error; the
/// producer has been told `ingest_backpressure` `on` before either.
pub(crate) fn refuse(shared: &Shared, to: &Arc<Outbound>, p: Priority, a: &About<'_>, why: &str) {
    shared.pressure.refusing(to);
    if p == Priority::Bulk {
        to.push_control(notices::shed(a, why));
    } else {
        shared.m.error(Code::Overloaded);
        to.push_control(notices::error(Code::Overloaded, why, a));
    }
}
