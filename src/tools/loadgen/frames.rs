//! The producers' `samples` frames, built without an allocation or a copy of the payload per
//! frame: frame buffers come back to their producer once tungstenite has copied them into its
//! write buffer, and a buffer that held a frame of the same class and sample count is reused
//! with only its keys rewritten (its rows are the same bytes: a frame of n samples sends the
//! first n rows of the producer's fixed payload).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::engine::Priority;
use crate::protocol::encode_samples_keyed;
use crate::tensor::DType;

/// Buffers kept for reuse. A saturated producer cycles through 15 tags (the class mix repeats
/// every 10 samples and a 256-sample frame starts at 5 phases of it: 3 classes x 5 counts); with
/// fewer buffers than tags every frame was encoded afresh (8% of the load generator's CPU).
const KEEP: usize = 24;
/// Kept buffers from which a frame with a new tag takes the oldest instead of a new buffer.
const REPURPOSE_AT: usize = KEEP - 4;

/// What a kept frame holds besides its keys: with one producer's stream and modalities, equal
/// tags mean equal frames but for the keys.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tag {
    priority: Priority,
    dtype: DType,
    /// Samples.
    n: usize,
    /// Bytes of the key list (`{u16 len, key}` per sample, PROTOCOL 4.4).
    keys_len: usize,
    /// Bytes of the blocks after the key list.
    payload: usize,
}

/// A frame buffer and what its frame was, if it is still whole.
#[derive(Debug, Default)]
struct Slot {
    buf: Vec<u8>,
    tag: Option<Tag>,
}

/// One producer's frame buffers. Every frame it builds must be of the producer's stream and
/// modalities, with blocks that depend only on the sample count.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    kept: Arc<Mutex<Vec<Slot>>>,
    /// The key list of the frame being built.
    keys: Vec<u8>,
    /// Frames built by rewriting only the keys of a kept one, for the tests.
    reused: u64,
}

impl Frames {
    /// A `samples` frame of `n` samples (see [`encode_samples_keyed`]; `key` is called `n`
    /// times): the keys of a kept frame with the same tag rewritten in place when there is one,
    /// else a frame encoded into a kept buffer. `None` when the encoder refuses it.
    pub(crate) fn samples<K>(
        &mut self,
        head: (&str, DType, Priority, bool, u32),
        n: usize,
        mut key: K,
        names: &[&str],
        blocks: &[&[u8]],
    ) -> Option<Bytes>
    where
        K: FnMut(&mut Vec<u8>),
    {
        self.keys.clear();
        for _ in 0..n {
            let at = self.keys.len();
            self.keys.extend_from_slice(&[0, 0]);
            key(&mut self.keys);
            let l = u16::try_from(self.keys.len() - at - 2).ok()?;
            self.keys[at..at + 2].copy_from_slice(&l.to_le_bytes());
        }
        let tag = Tag {
            priority: head.2,
            dtype: head.1,
            n,
            keys_len: self.keys.len(),
            payload: blocks.iter().map(|b| b.len()).sum(),
        };
        let mut slot = self.take(tag);
        let keys_at = slot.buf.len().checked_sub(tag.payload + tag.keys_len);
        match keys_at {
            Some(at) if slot.tag == Some(tag) => {
                slot.buf[at..at + tag.keys_len].copy_from_slice(&self.keys);
                self.reused += 1;
            }
            _ => {
                slot.buf.clear();
                let mut rest = &self.keys[..];
                let key = |v: &mut Vec<u8>| {
                    if let [a, b, tail @ ..] = rest {
                        let l = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
                        v.extend_from_slice(&tail[..l]);
                        rest = &tail[l..];
                    }
                };
                let sizes = (n, tag.keys_len);
                encode_samples_keyed(&mut slot.buf, head, sizes, key, names, blocks)?;
            }
        }
        slot.tag = Some(tag);
        Some(Bytes::from_owner(Lent {
            slot,
            home: Arc::clone(&self.kept),
        }))
    }

    /// The kept slot with `tag`; else a new one while fewer than [`REPURPOSE_AT`] are kept (so
    /// that every tag of the cycle gets its own buffer: only the two or three frames in flight
    /// are ever out), else the oldest kept one.
    fn take(&self, tag: Tag) -> Slot {
        let Ok(mut kept) = self.kept.lock() else {
            return Slot::default();
        };
        match kept.iter().position(|s| s.tag == Some(tag)) {
            Some(j) => kept.remove(j),
            None if kept.len() >= REPURPOSE_AT => kept.remove(0),
            None => Slot::default(),
        }
    }
}

/// A frame on its way to the socket; its buffer goes back to its producer when the last
/// reference to the payload is dropped (tungstenite drops it once it has copied it out).
struct Lent {
    slot: Slot,
    home: Arc<Mutex<Vec<Slot>>>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.slot.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Ok(mut kept) = self.home.lock() {
            if kept.len() >= KEEP {
                kept.remove(0);
            }
            kept.push(std::mem::take(&mut self.slot));
        }
    }
}

/// Appends the decimal digits of `x`.
fn push_decimal(v: &mut Vec<u8>, mut x: u64) {
    let mut d = [0u8; 20];
    let mut at = d.len();
    loop {
        at -= 1;
        d[at] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    v.extend_from_slice(&d[at..]);
}

/// Appends the bytes of [`super::stats::make_key`]`(class, i, t_us)` without allocating.
pub(crate) fn push_key(v: &mut Vec<u8>, class: usize, i: u64, t_us: u64) {
    v.push([b'c', b'i', b'b'][class.min(2)]);
    push_decimal(v, i);
    v.push(b'.');
    push_decimal(v, t_us);
}

#[cfg(test)]
mod tests {
    use super::super::stats::make_key;
    use super::*;

    #[test]
    fn keys_match_make_key() {
        let mut v = Vec::new();
        for (c, i, t) in [(0, 0, 0), (1, 9, 10), (2, 12345, u64::MAX), (7, 100, 99)] {
            v.clear();
            push_key(&mut v, c, i, t);
            assert_eq!(std::str::from_utf8(&v).unwrap(), make_key(c, i, t));
        }
    }

    #[test]
    fn frames_equal_fresh_encodings_and_reuse_their_buffers() {
        use crate::protocol::{encode_samples, parse_samples};
        let rows: Vec<u8> = (0..80u8).collect(); // up to 10 samples x 2 f32
        let (names, t) = (["x"], 123_456);
        let mut frames = Frames::default();
        let mut held = Vec::new();
        // (class, first sample, count): repeats, a count seen before, a key list of another
        // length (sample 995 vs 30), another class of the same count.
        let plan = [
            (2, 0, 4),
            (2, 10, 4),
            (2, 20, 7),
            (2, 30, 4),
            (2, 995, 4),
            (1, 40, 4),
        ];
        for (round, (class, first, n)) in plan.into_iter().enumerate() {
            let prio = [Priority::Critical, Priority::Important, Priority::Bulk][class];
            let keys: Vec<String> = (first..first + n).map(|k| make_key(class, k, t)).collect();
            let refs: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
            let block = &rows[..n as usize * 8];
            let want = encode_samples("s", &refs, &names, &[block], DType::F32, prio, false, 0);
            let mut k = first;
            let key = |v: &mut Vec<u8>| {
                push_key(v, class, k, t);
                k += 1;
            };
            let head = ("s", DType::F32, prio, false, 0);
            let got = frames
                .samples(head, n as usize, key, &names, &[block])
                .unwrap();
            assert_eq!(Some(&got[..]), want.as_deref(), "round {round}");
            assert_eq!(parse_samples(&got).unwrap().keys, refs);
            if round == 1 {
                // The first frame is still held: the second cannot reuse its buffer.
                assert_eq!(frames.reused, 0);
                held.clear();
            }
            held.push(got);
            if round >= 2 {
                held.clear();
            }
        }
        // Round 3 (the tag of round 1) reused a buffer; 4 (longer keys) and 5 (another
        // class) did not.
        assert_eq!(frames.reused, 1);
        // A refused frame (a key too long) is refused, and the frames after it are whole.
        let long = "k".repeat(70_000);
        let key = |v: &mut Vec<u8>| v.extend_from_slice(long.as_bytes());
        let head = ("s", DType::F32, Priority::Bulk, false, 0);
        assert!(frames
            .samples(head, 1, key, &names, &[&rows[..8]])
            .is_none());
    }

    #[test]
    fn at_most_keep_buffers_are_kept() {
        let mut frames = Frames::default();
        let rows = [0u8; 8];
        let head = ("s", DType::F32, Priority::Bulk, false, 0);
        let all: Vec<Bytes> = (0..KEEP + 5)
            .map(|j| {
                let key = |v: &mut Vec<u8>| push_key(v, 2, j as u64, 0);
                frames.samples(head, 1, key, &["x"], &[&rows[..4]]).unwrap()
            })
            .collect();
        drop(all);
        assert_eq!(frames.kept.lock().unwrap().len(), KEEP);
    }

    #[test]
    fn a_cycle_of_fifteen_tags_reuses_after_its_first_round() {
        // A saturated producer: 3 classes x 5 counts, one frame in flight while the next is
        // built (the one before it is back).
        let mut frames = Frames::default();
        let rows = [0u8; 4 * 30];
        let mut in_flight: Option<Bytes> = None;
        let mut built = 0u64;
        for round in 0..4 {
            for class in 0..3 {
                for n in 26..31 {
                    let prio = [Priority::Critical, Priority::Important, Priority::Bulk][class];
                    let head = ("s", DType::F32, prio, false, 0);
                    let key = |v: &mut Vec<u8>| push_key(v, class, 1000, 5);
                    let f = frames.samples(head, n, key, &["x"], &[&rows[..4 * n]]);
                    in_flight = f; // drops the previous frame: its buffer goes back
                    built += 1;
                }
            }
            if round == 0 {
                assert_eq!(frames.reused, 0);
            }
        }
        assert!(in_flight.is_some());
        // Every frame after the first round rewrote only its keys.
        assert_eq!(frames.reused, built - 15);
    }
}
