//! What waits in the batcher (docs/DESIGN.md section 4): a sample the aligner completed, or the
//! rows of one `samples` frame kept together (PROTOCOL 4.4), so that a batch takes a run of them
//! with one copy per modality, not one copy and three allocations per sample.

use std::sync::Arc;

use super::aligner::Sample;
use super::keys::{FrameKeys, RunKeys};
use super::queue::IngestSamples;
use crate::engine::{PooledBlocks, Priority};
use crate::model::FusionHead;
use crate::server::fanout::deliver::Meta;
use crate::server::fanout::outbound::Outbound;
use crate::tensor::{bytes_to_f32, DType, HostBytes, HostMat};

/// Rows `start..end` of one `samples` frame, all of its modalities in the frame's dtype.
#[derive(Debug)]
pub(crate) struct FrameRows {
    stream: Arc<str>,
    priority: Priority,
    dtype: DType,
    /// For each head modality, the index of its block in `blocks` (None: not in the frame).
    slot: Vec<Option<usize>>,
    /// One `[N, width]` block per modality of the frame (validated and copied at ingest),
    /// shared by the runs the frame is split into.
    blocks: Arc<PooledBlocks>,
    /// The keys of the frame's rows (this run's are `start..end`).
    keys: Arc<FrameKeys>,
    start: usize,
    end: usize,
    producer: Arc<Outbound>,
}

impl FrameRows {
    /// Every row of a validated frame; None when it has no rows.
    pub fn of(s: IngestSamples, head: &FusionHead) -> Option<FrameRows> {
        let n = s.keys.len();
        if n == 0 {
            return None;
        }
        let mut slot = vec![None; head.num_modalities()];
        for (j, &mi) in s.modalities.iter().enumerate() {
            if let Some(x) = slot.get_mut(mi) {
                *x = Some(j);
            }
        }
        Some(FrameRows {
            stream: s.stream,
            priority: s.priority,
            dtype: s.dtype,
            slot,
            blocks: Arc::new(s.blocks),
            keys: s.keys,
            start: 0,
            end: n,
            producer: s.producer,
        })
    }

    /// Splits off the first `k` rows (0 < k < len) as a run of their own.
    fn split_front(&mut self, k: usize) -> FrameRows {
        let front = FrameRows {
            stream: Arc::clone(&self.stream),
            priority: self.priority,
            dtype: self.dtype,
            slot: self.slot.clone(),
            blocks: Arc::clone(&self.blocks),
            keys: Arc::clone(&self.keys),
            start: self.start,
            end: self.start + k,
            producer: Arc::clone(&self.producer),
        };
        self.start += k;
        front
    }
}

/// One entry of a class's waiting queue.
#[derive(Debug)]
pub(crate) enum Waiting {
    /// A sample the aligner completed (or timed out with enough modalities).
    One(Sample),
    /// Whole samples of one frame.
    Rows(FrameRows),
}

impl Waiting {
    /// Samples it holds.
    pub fn len(&self) -> usize {
        match self {
            Waiting::One(_) => 1,
            Waiting::Rows(r) => r.end - r.start,
        }
    }

    pub fn priority(&self) -> Priority {
        match self {
            Waiting::One(s) => s.priority,
            Waiting::Rows(r) => r.priority,
        }
    }

    /// Takes the first `k` samples off (0 < k < len); a single sample is never split.
    pub fn split_front(&mut self, k: usize) -> Option<Waiting> {
        match self {
            Waiting::Rows(r) if k > 0 && k < r.end - r.start => {
                Some(Waiting::Rows(r.split_front(k)))
            }
            _ => None,
        }
    }

    /// Whether this is every row of one frame with blocks nobody else holds: a batch of it
    /// alone takes its blocks as its matrices ([`Waiting::whole_inputs`]).
    pub fn is_whole_frame(&self) -> bool {
        match self {
            Waiting::One(_) => false,
            Waiting::Rows(r) => {
                r.start == 0 && r.end == r.keys.len() && Arc::strong_count(&r.blocks) == 1
            }
        }
    }

    /// The wire dtype of head modality `i` here, None when absent.
    pub fn dtype_of(&self, i: usize) -> Option<DType> {
        match self {
            Waiting::One(s) => s.parts.get(i)?.as_ref().map(|p| p.dtype),
            Waiting::Rows(r) => r.slot.get(i)?.map(|_| r.dtype),
        }
    }

    /// Appends this entry's rows of head modality `i` (`width` values each) to `out` in
    /// `dtype`: copied as they are when the dtypes agree, widened to f32 otherwise, zeros when
    /// absent. Always appends exactly `len() * width * dtype.size()` bytes (lengths were checked
    /// at ingest; a block of any other length gives zeros, never a shifted matrix).
    pub fn append_modality(
        &self,
        i: usize,
        width: usize,
        dtype: DType,
        out: &mut Vec<u8>,
        tmp: &mut Vec<f32>,
    ) {
        let end = out.len() + self.len() * width * dtype.size();
        match self {
            Waiting::One(s) => {
                if let Some(Some(p)) = s.parts.get(i) {
                    append_rows(&p.payload, p.dtype, 1, width, dtype, out, tmp);
                }
            }
            Waiting::Rows(r) => {
                let rb = width * r.dtype.size();
                let block = r
                    .slot
                    .get(i)
                    .copied()
                    .flatten()
                    .and_then(|j| r.blocks.get(j)?.get(r.start * rb..r.end * rb));
                if let Some(b) = block {
                    append_rows(b, r.dtype, r.end - r.start, width, dtype, out, tmp);
                }
            }
        }
        out.resize(end, 0);
    }

    /// The batch's matrices without a copy, when this entry is every row of one frame and
    /// nothing else shares its blocks: each block becomes its modality's matrix, an absent
    /// modality a zero matrix (f32). None otherwise (the caller copies).
    pub fn whole_inputs(&mut self, head: &FusionHead) -> Option<Vec<HostMat>> {
        let Waiting::Rows(r) = self else {
            return None;
        };
        let rows = r.end - r.start;
        let whole = r.start == 0
            && head.modalities.iter().zip(&r.slot).all(|(md, j)| {
                j.is_none_or(|j| {
                    r.blocks.get(j).map(<[u8]>::len) == Some(rows * md.width * r.dtype.size())
                })
            });
        if !whole {
            return None;
        }
        let pool = Arc::clone(r.blocks.pool());
        let shared = std::mem::replace(
            &mut r.blocks,
            Arc::new(PooledBlocks::new(Arc::clone(&pool))),
        );
        let mut blocks = match Arc::try_unwrap(shared) {
            Ok(mut b) => b.take_all(),
            Err(shared) => {
                r.blocks = shared;
                return None;
            }
        };
        let inputs = head
            .modalities
            .iter()
            .zip(&r.slot)
            .map(|(md, j)| match j.and_then(|j| blocks.get_mut(j)) {
                Some(b) => HostMat {
                    dtype: r.dtype,
                    rows,
                    cols: md.width,
                    bytes: std::mem::take(b),
                },
                None => {
                    let mut bytes = pool.take(rows * md.width * 4);
                    bytes.resize(rows * md.width * 4, 0);
                    HostMat {
                        dtype: DType::F32,
                        rows,
                        cols: md.width,
                        bytes: bytes.into(),
                    }
                }
            })
            .collect();
        // Blocks of modalities the head does not list cannot exist (checked at ingest); any
        // left here go back to the pool.
        for v in blocks.into_iter().filter_map(HostBytes::into_vec) {
            pool.give(v);
        }
        Some(inputs)
    }

    /// Appends the presence mask of each sample (head order, `m` per sample).
    pub fn append_mask(&self, m: usize, out: &mut Vec<u8>) {
        match self {
            Waiting::One(s) => {
                out.extend((0..m).map(|i| u8::from(matches!(s.parts.get(i), Some(Some(_))))));
            }
            Waiting::Rows(r) => {
                for _ in r.start..r.end {
                    out.extend((0..m).map(|i| u8::from(matches!(r.slot.get(i), Some(Some(_))))));
                }
            }
        }
    }

    /// What the fan-out needs of its samples: one run ([`Meta`]).
    pub fn into_metas(self, m: usize, out: &mut Vec<Meta>) {
        match self {
            Waiting::One(s) => out.push(Meta {
                mask: s.parts.iter().map(|p| u8::from(p.is_some())).collect(),
                stream: s.stream,
                keys: RunKeys::Own(s.key),
                priority: s.priority,
                producers: s.producers.into(),
            }),
            Waiting::Rows(r) => out.push(Meta {
                mask: (0..m)
                    .map(|i| u8::from(matches!(r.slot.get(i), Some(Some(_)))))
                    .collect(),
                keys: RunKeys::rows(&r.keys, r.start, r.end),
                stream: r.stream,
                priority: r.priority,
                producers: Arc::new([r.producer]),
            }),
        }
    }
}

/// Appends `rows` rows of `width` values from `src` (in `from`) to `out` in `to`; nothing when
/// `src` is not exactly that long (the caller pads with zeros).
fn append_rows(
    src: &[u8],
    from: DType,
    rows: usize,
    width: usize,
    to: DType,
    out: &mut Vec<u8>,
    tmp: &mut Vec<f32>,
) {
    // Only widening to f32 converts (a batch that mixes dtypes is f32, docs/DESIGN.md section 4).
    if src.len() != rows * width * from.size() || (from != to && to != DType::F32) {
        return;
    }
    if from == to {
        out.extend_from_slice(src);
    } else {
        tmp.clear();
        tmp.resize(rows * width, 0f32);
        bytes_to_f32(from, src, tmp);
        out.extend_from_slice(bytemuck::cast_slice(tmp));
    }
}
