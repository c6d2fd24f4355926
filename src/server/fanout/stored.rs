//! A fused result as the server keeps it after its batch: encoded once, as a version 2 binary
//! result (docs/PROTOCOL.md 4.2) with seq 0, into shared memory (`Bytes`). The replay buffer
//! (CRITICAL and IMPORTANT), every subscriber's queue that holds it, and a resuming
//! subscriber's replay all hold references to that one encoding, never copies; each
//! connection's writer writes its own seq into the copy it sends (docs/DESIGN.md section 5.3).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::engine::Priority;
use crate::protocol::{self, ResultView, VERSION_2};

/// What a shared `Bytes` allocation costs beyond its bytes: the `bytes` crate's shared header
/// (buffer pointer, capacity, reference count).
const SHARED_HEADER: usize = 3 * std::mem::size_of::<usize>();

/// The most bytes of encoded results that share one buffer. Sharing saves two allocations per
/// result, but a buffer lives as long as any of its results: a queue that keeps one result
/// of each buffer (a conflating subscriber, say) holds up to this much per queued result.
pub(crate) const SHARED_BUFFER: usize = 16 << 10;

/// One encoded result (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub stream: Arc<str>,
    pub stream_seq: u64,
    pub priority: Priority,
    /// The version 2 binary result, seq 0 and flags 0.
    pub frame: Bytes,
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
            frame: Bytes::from(protocol::encode_result(r, VERSION_2)),
        }
    }

    /// Encodes the results of `views` that `want` names (one stream's results of one batch, in
    /// batch order, their stream seqs set; the rest are None): consecutive results of one class
    /// are written into one buffer of at most [`SHARED_BUFFER`] bytes that they share
    /// (docs/DESIGN.md section 5.7), two allocations per buffer instead of two per result.
    pub fn encode_runs(
        stream: &Arc<str>,
        views: &[ResultView<'_>],
        want: impl Fn(&ResultView<'_>) -> bool,
    ) -> Vec<Option<Stored>> {
        let mut out = Vec::with_capacity(views.len());
        let mut buf = BytesMut::new();
        let mut class = None;
        for (i, v) in views.iter().enumerate() {
            if !want(v) {
                out.push(None);
                continue;
            }
            let len = protocol::encoded_result_len(v, VERSION_2);
            if class != Some(v.priority) || buf.capacity() < len {
                // A new buffer: for this result and the ones after it of its class, up to
                // SHARED_BUFFER bytes (a larger result alone).
                let mut size = 0;
                for w in views[i..]
                    .iter()
                    .take_while(|w| w.priority == v.priority)
                    .filter(|w| want(w))
                {
                    let l = protocol::encoded_result_len(w, VERSION_2);
                    if size > 0 && size + l > SHARED_BUFFER {
                        break;
                    }
                    size += l;
                }
                buf = BytesMut::with_capacity(size);
                class = Some(v.priority);
            }
            protocol::encode_result_into(v, VERSION_2, &mut buf);
            out.push(Some(Stored {
                stream: Arc::clone(stream),
                stream_seq: v.stream_seq,
                priority: v.priority,
                frame: buf.split().freeze(),
            }));
        }
        out
    }

    /// What it costs in memory, for `replay_max_bytes` (docs/PROTOCOL.md 7.4): its slot, its
    /// encoding and that encoding's shared header. Queues holding it add nothing: they hold the
    /// same bytes.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Stored>() + self.frame.len() + SHARED_HEADER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results of one class share buffers of at most SHARED_BUFFER bytes, classes never share
    /// one, unwanted results are not encoded, and each frame is exactly `encode_result`'s.
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
        let got = Stored::encode_runs(&stream, &views, |v| v.priority != Priority::Bulk);
        assert_eq!(got.len(), 40);
        assert!(got[35..].iter().all(Option::is_none));
        let frames: Vec<&Bytes> = got[..35]
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
        let per = SHARED_BUFFER / len;
        // CRITICAL 0..5 in one; IMPORTANT 5..35 in buffers of `per`.
        let mut want = vec![(0..5).collect::<Vec<_>>()];
        let mut i = 5;
        while i < 35 {
            want.push((i..(i + per).min(35)).collect());
            i += per;
        }
        assert_eq!(buffers, want);
    }
}
