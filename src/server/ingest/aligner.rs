//! The aligner (docs/DESIGN.md section 4.2): joins the modalities of each `(stream, key)`. A sample is
//! complete when every modality arrived (or one came flagged `last`); `align_timeout` after its
//! first modality it is fused with what arrived if at least `min_modalities` are present, else
//! rejected. Open samples are bounded; beyond the bound the producer is refused (overload).
//!
//! Deadlines are `first arrival + align_timeout` with one constant timeout, so they are in
//! arrival order: a FIFO queue of deadlines is enough (no timer wheel).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::queue::Ingest;
use crate::engine::Priority;
use crate::server::fanout::outbound::Outbound;
use crate::tensor::DType;

/// One modality of a sample.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub dtype: DType,
    pub payload: Bytes,
}

/// A sample (complete or timed out).
#[derive(Debug)]
pub(crate) struct Sample {
    pub stream: Arc<str>,
    pub key: String,
    pub priority: Priority,
    /// One slot per modality, head order.
    pub parts: Vec<Option<Part>>,
    pub present: usize,
    /// Connections that produced into it (errors about it go there), without repeats.
    pub producers: Vec<Arc<Outbound>>,
}

/// What happened to an offered modality.
#[derive(Debug)]
pub(crate) enum Offer {
    /// The sample is complete: batch it.
    Complete(Sample),
    /// Accepted; the sample waits for more.
    Pending,
    /// The modality was already there; the message is ignored.
    Duplicate(Ingest),
    /// Too many open samples; the message is refused.
    Full(Ingest),
}

struct Open {
    sample: Sample,
    generation: u64,
}

/// The aligner's state.
pub(crate) struct Aligner {
    modalities: usize,
    timeout: Duration,
    max_open: usize,
    open: HashMap<(Arc<str>, String), Open>,
    deadlines: VecDeque<(Instant, Arc<str>, String, u64)>,
    generation: u64,
}

impl Aligner {
    pub fn new(modalities: usize, timeout: Duration, max_open: usize) -> Aligner {
        Aligner {
            modalities,
            timeout,
            max_open,
            open: HashMap::new(),
            deadlines: VecDeque::new(),
            generation: 0,
        }
    }

    /// Open samples.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Adds one modality of a sample.
    pub fn offer(&mut self, ing: Ingest, now: Instant) -> Offer {
        let m = self.modalities;
        let full = self.open.len() >= self.max_open;
        let k = (Arc::clone(&ing.stream), ing.key.clone());
        match self.open.entry(k) {
            Entry::Occupied(mut e) => {
                let s = &mut e.get_mut().sample;
                if ing.modality >= m || s.parts[ing.modality].is_some() {
                    return Offer::Duplicate(ing);
                }
                let last = ing.last;
                add(s, ing);
                if s.present == m || last {
                    return Offer::Complete(e.remove().sample);
                }
                Offer::Pending
            }
            Entry::Vacant(e) => {
                if full {
                    return Offer::Full(ing);
                }
                if ing.modality >= m {
                    return Offer::Duplicate(ing);
                }
                let mut s = Sample {
                    stream: Arc::clone(&ing.stream),
                    key: ing.key.clone(),
                    priority: ing.priority,
                    parts: vec![None; m],
                    present: 0,
                    producers: Vec::with_capacity(1),
                };
                let last = ing.last;
                add(&mut s, ing);
                if s.present == m || last {
                    return Offer::Complete(s);
                }
                self.generation += 1;
                let g = self.generation;
                let key = e.key().clone();
                e.insert(Open {
                    sample: s,
                    generation: g,
                });
                self.deadlines
                    .push_back((now + self.timeout, key.0, key.1, g));
                Offer::Pending
            }
        }
    }

    /// The next deadline, if any sample is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|d| d.0)
    }

    /// Samples whose align_timeout passed by `now`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Sample>) {
        while let Some((at, _, _, _)) = self.deadlines.front() {
            if *at > now {
                break;
            }
            let Some((_, stream, key, g)) = self.deadlines.pop_front() else {
                break;
            };
            let k = (stream, key);
            if self.open.get(&k).is_some_and(|o| o.generation == g) {
                if let Some(o) = self.open.remove(&k) {
                    out.push(o.sample);
                }
            }
        }
    }

    /// Every open sample (shutdown).
    pub fn drain(&mut self, out: &mut Vec<Sample>) {
        self.deadlines.clear();
        out.extend(self.open.drain().map(|(_, o)| o.sample));
    }
}

fn add(s: &mut Sample, ing: Ingest) {
    if ing.priority < s.priority {
        s.priority = ing.priority;
    }
    if !s.producers.iter().any(|p| Arc::ptr_eq(p, &ing.producer)) {
        s.producers.push(ing.producer);
    }
    s.parts[ing.modality] = Some(Part {
        dtype: ing.dtype,
        payload: ing.payload,
    });
    s.present += 1;
}
