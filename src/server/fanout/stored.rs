//! A fused result as the server keeps it after its batch: encoded once, as a version 2 binary
//! result (docs/PROTOCOL.md 4.2) with seq 0, into shared memory (`Bytes`). The replay buffer
//! (CRITICAL and IMPORTANT), every subscriber's queue that holds it, and a resuming
//! subscriber's replay all hold references to that one encoding, never copies; each
//! connection's writer writes its own seq into the copy it sends (docs/DESIGN.md section 5.3).

use std::sync::Arc;

use super::chunks::{Chunk, ChunkPool, SharedFrame, CHUNK_BYTES};
use crate::engine::Priority;
use crate::protocol::{self, ResultView, VERSION_2};

/// What a shared chunk costs beyond its bytes, counted per result: its reference counts and
/// vector header (pointer, capacity, length).
const SHARED_HEADER: usize = 5 * std::mem::size_of::<usize>();

/// One encoded result (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub stream: Arc<str>,
    pub stream_seq: u64,
    pub priority: Priority,
    /// The version 2 binary result, seq 0 and flags 0.
    pub frame: SharedFrame,
}

impl Stored {
    /// Encodes `r` (its `stream_seq` set) once, alone (tests; the fan-out encodes a batch's
    /// results of a stream together, [`Stored::encode_runs`]).
    #[cfg(test)]
    pub fn new(stream: &Arc<str>, r: &ResultView<'_>) -> Stored {
        Stored {
            stream: Arc::clone(stream),
            stream_seq: r.stream_seq,
            priority: r.priority,
            frame: SharedFrame::alone(protocol::encode_result(r, VERSION_2)),
        }
    }

    /// Encodes the results of `views` that `want` names (one stream's results of one batch, in
    /// batch order, their stream seqs set; the rest are None): consecutive results of one class
    /// are written into one chunk of at most [`CHUNK_BYTES`] from `pool` that they share
    /// (docs/DESIGN.md section 5.7): no allocation per result, none for chunks once the pool
    /// holds enough (the two lists here are per call).
    pub fn encode_runs(
        pool: &ChunkPool,
        stream: &Arc<str>,
        views: &[ResultView<'_>],
        want: impl Fn(&ResultView<'_>) -> bool,
    ) -> Vec<Option<Stored>> {
        let mut out = Vec::with_capacity(views.len());
        // The open chunk's results, (index in `out`, start, end, stream seq, class): their
        // frames are taken when the chunk is full (a chunk takes no writes once shared).
        let mut marks: Vec<(usize, usize, usize, u64, Priority)> = Vec::with_capacity(views.len());
        let mut chunk: Option<Chunk<'_>> = None;
        let close = |out: &mut Vec<Option<Stored>>, marks: &mut Vec<_>, c: Option<Chunk<'_>>| {
            let Some(c) = c else { return };
            for (i, start, end, stream_seq, priority) in marks.drain(..) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(Stored {
                        stream: Arc::clone(stream),
                        stream_seq,
                        priority,
                        frame: c.frame(start, end),
                    });
                }
            }
        };
        let mut class = None;
        for (i, v) in views.iter().enumerate() {
            if !want(v) {
                out.push(None);
                continue;
            }
            let len = protocol::encoded_result_len(v, VERSION_2);
            let fits = chunk.as_ref().is_some_and(|c| c.room() >= len);
            if class != Some(v.priority) || !fits {
                // A new chunk: for this result and the ones after it of its class, up to
                // CHUNK_BYTES (a larger result alone).
                let mut size = 0;
                for w in views[i..]
                    .iter()
                    .take_while(|w| w.priority == v.priority)
                    .filter(|w| want(w))
                {
                    let l = protocol::encoded_result_len(w, VERSION_2);
                    if size > 0 && size + l > CHUNK_BYTES {
                        break;
                    }
                    size += l;
                }
                close(&mut out, &mut marks, chunk.replace(pool.take(size)));
                class = Some(v.priority);
            }
            // Never shared before `close`: writable.
            if let Some(b) = chunk.as_mut().and_then(Chunk::bytes) {
                let start = b.len();
                protocol::encode_result_into(v, VERSION_2, b);
                marks.push((out.len(), start, b.len(), v.stream_seq, v.priority));
            }
            out.push(None);
        }
        close(&mut out, &mut marks, chunk);
        out
    }

    /// What it costs in memory, for `replay_max_bytes` (docs/PROTOCOL.md 7.4): its slot, its
    /// encoding and a share of its chunk's header. Queues holding it add nothing: they hold the
    /// same bytes.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Stored>() + self.frame.len() + SHARED_HEADER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results of one class share chunks of at most CHUNK_BYTES bytes, classes never share
    /// one, unwanted results are not encoded, each frame is exactly `encode_result`'s, and once
    /// a batch's results are gone the next batch's go into the same chunks (no new one).
    #[test]
    fn encode_runs_shares_buffers_within_a_class_and_up_to_the_cap() {
        let stream: Arc<str> = Arc::from("s");
        let fused = vec![0.5f32; 300]; // ~1.3 KB a result: 12 fit in 16 KiB
        let weights = [0.25f32, 0.75];
        let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let class = |i: usize| match i {
            0..=4 => Priority::Critical,
            5..=34 => Priority::Important,
            _ => Priority::Bulk,
        };
        let views: Vec<ResultView<'_>> = (0..40)
            .map(|i| ResultView {
                stream: "s",
                key: &keys[i],
                priority: class(i),
                mask: &[1, 0],
                fused: &fused,
                weights: &weights,
                stream_seq: 100 + i as u64,
                replayed: false,
            })
            .collect();
        let pool = ChunkPool::default();
        let got = Stored::encode_runs(&pool, &stream, &views, |v| v.priority != Priority::Bulk);
        assert_eq!(got.len(), 40);
        assert!(got[35..].iter().all(Option::is_none));
        let frames: Vec<&SharedFrame> = got[..35]
            .iter()
            .map(|s| &s.as_ref().expect("encoded").frame)
            .collect();
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(&f[..], &protocol::encode_result(&views[i], VERSION_2)[..]);
        }
        // Buffers: frame i+1 follows frame i in memory exactly when they share one.
        let mut buffers = vec![vec![0usize]];
        for i in 1..35 {
            let adjacent =
                frames[i].as_ptr() == frames[i - 1].as_ptr().wrapping_add(frames[i - 1].len());
            match buffers.last_mut() {
                Some(b) if adjacent => b.push(i),
                _ => buffers.push(vec![i]),
            }
        }
        let len = frames[0].len();
        let per = CHUNK_BYTES / len;
        // CRITICAL 0..5 in one; IMPORTANT 5..35 in buffers of `per`.
        let mut want = vec![(0..5).collect::<Vec<_>>()];
        let mut i = 5;
        while i < 35 {
            want.push((i..(i + per).min(35)).collect());
            i += per;
        }
        assert_eq!(buffers, want);
        // The next batch, after this one's results are dropped: the same chunks, reused.
        let chunks = pool.len();
        assert_eq!(chunks, want.len());
        let firsts: Vec<*const u8> = buffers.iter().map(|b| frames[b[0]].as_ptr()).collect();
        drop(frames);
        drop(got);
        let again = Stored::encode_runs(&pool, &stream, &views, |v| v.priority != Priority::Bulk);
        assert_eq!(pool.len(), chunks);
        for (i, s) in again[..35].iter().enumerate() {
            let f = &s.as_ref().expect("encoded").frame;
            assert_eq!(&f[..], &protocol::encode_result(&views[i], VERSION_2)[..]);
        }
        let reused = buffers
            .iter()
            .filter(|b| {
                firsts.contains(
                    &again[b[0]]
                        .as_ref()
                        .map_or(std::ptr::null(), |s| s.frame.as_ptr()),
                )
            })
            .count();
        assert_eq!(reused, buffers.len());
    }
}
