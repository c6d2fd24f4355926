//! Where a batch's results leave the engine: the results of each stream, as one unit, get
//! their stream seqs and go to the replay buffer and every subscriber of the stream
//! ([`Replay::deliver_stream`]); a failed batch's error, and any other answer about many
//! samples, goes to their producers grouped ([`tell_producers`]).

use std::sync::Arc;

use super::outbound::Outbound;
use super::registry::Registry;
use super::replay::Replay;
use crate::engine::{BatchResult, Priority};
use crate::error::Result;
use crate::protocol::{notices, Code, ResultView};
use crate::server::ingest::keys::RunKeys;
use crate::server::shared::Shared;

/// What the fan-out needs of a run of a batch's samples once their features are in the batch:
/// one aligned sample, or rows of one `samples` frame, which share its stream, class, mask,
/// producer and keys table (a reference count each per run, nothing per sample).
pub(crate) struct Meta {
    pub stream: Arc<str>,
    pub keys: RunKeys,
    pub priority: Priority,
    pub mask: Arc<[u8]>,
    pub producers: Arc<[Arc<Outbound>]>,
}

impl Meta {
    /// Samples in the run.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// (stream, key, class, producers) of each of its samples.
    pub fn samples(&self) -> impl Iterator<Item = (&Arc<str>, &str, Priority, &[Arc<Outbound>])> {
        self.keys
            .iter()
            .map(move |k| (&self.stream, k, self.priority, &self.producers[..]))
    }
}

/// Sends each result to every subscriber of its stream, or the error to its producers.
pub(crate) fn fan_out(shared: &Shared, metas: Vec<Meta>, r: Result<BatchResult>) {
    let res = match r {
        Ok(res) => res,
        Err(e) => {
            let code = Code::of_engine_error(&e);
            tell_producers(
                shared,
                metas.iter().flat_map(Meta::samples),
                code,
                &e.to_string(),
            );
            return;
        }
    };
    let (d, m) = (shared.head.dim, shared.head.num_modalities());
    let (fused, weights) = (&res.outputs.fused[..], &res.outputs.weights[..]);
    deliver_results(
        &shared.replay,
        &shared.registry,
        &metas,
        fused,
        weights,
        (d, m),
    );
    // Every result was encoded (deliver_results copies what it keeps): the buffers go back to
    // the engine, which page-locks them for a CUDA device to write later results straight into
    // (docs/DESIGN.md section 6.7).
    shared.engine.recycle(res.outputs);
}

/// Fans a batch's results out: `fused` `[B, D]` and `weights` `[B, M]` (`dims` = (D, M)) in
/// the order of `metas`' samples; a row missing from the outputs is skipped. The results of each stream
/// go out as one unit, in batch order ([`Replay::deliver_stream`], docs/DESIGN.md section 5).
pub(crate) fn deliver_results(
    replay: &Replay,
    registry: &Registry,
    metas: &[Meta],
    fused: &[f32],
    weights: &[f32],
    (d, m): (usize, usize),
) {
    let samples = metas.iter().map(Meta::len).sum();
    let mut rows: Vec<(&Arc<str>, ResultView<'_>)> = Vec::with_capacity(samples);
    let keys = metas
        .iter()
        .flat_map(|meta| meta.keys.iter().map(move |k| (meta, k)));
    for (i, (meta, key)) in keys.enumerate() {
        let (Some(fused), Some(weights)) = (
            fused.get(i * d..(i + 1) * d),
            weights.get(i * m..(i + 1) * m),
        ) else {
            continue;
        };
        let view = ResultView {
            stream: &meta.stream,
            key,
            priority: meta.priority,
            mask: &meta.mask,
            fused,
            weights,
            stream_seq: 0,
            replayed: false,
        };
        rows.push((&meta.stream, view));
    }
    // A batch of one stream (the common case, checked per run): its results as they are.
    if let Some(first) = metas.first() {
        if metas.iter().all(|meta| meta.stream == first.stream) {
            let views: Vec<ResultView<'_>> = rows.into_iter().map(|(_, v)| v).collect();
            replay.deliver_stream(registry, &first.stream, &views);
            return;
        }
    }
    // Stable: each stream's results stay in batch order.
    rows.sort_by(|a, b| a.0.cmp(b.0));
    let mut views = Vec::with_capacity(rows.len());
    for group in rows.chunk_by(|a, b| a.0 == b.0) {
        let Some((stream, _)) = group.first() else {
            continue;
        };
        views.clear();
        views.extend(group.iter().map(|(_, v)| v.clone()));
        replay.deliver_stream(registry, stream, &views);
    }
}

/// One message per (producer, stream, shed or not) about many samples, so that a burst of
/// failures costs a producer a few CONTROL slots, not one per sample.
pub(crate) fn tell_producers<'a>(
    shared: &Shared,
    samples: impl Iterator<Item = (&'a Arc<str>, &'a str, Priority, &'a [Arc<Outbound>])>,
    code: Code,
    msg: &str,
) {
    type Group<'g> = (&'g Arc<Outbound>, &'g Arc<str>, bool, Vec<&'g str>);
    let mut groups: Vec<Group<'_>> = Vec::new();
    for (stream, key, prio, producers) in samples {
        let shed = code == Code::Overloaded && prio == Priority::Bulk;
        for p in producers {
            match groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(g.0, p) && g.1 == stream && g.2 == shed)
            {
                Some(g) => g.3.push(key),
                None => groups.push((p, stream, shed, vec![key])),
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
        p.push_control(notices::about_samples(code, msg, stream, &keys, shed));
    }
}
