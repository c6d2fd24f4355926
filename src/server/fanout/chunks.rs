//! The memory a stream's encoded results share (docs/DESIGN.md section 5.7): chunks of up to
//! [`CHUNK_BYTES`] into which a run of results is encoded, each result a [`SharedFrame`] range
//! of its chunk, and a pool that hands a chunk out again once every result in it is gone, so
//! that steady state allocates nothing per result (before: the chunk and the `bytes` crate's
//! shared header, two allocations per 16 KiB of results, 0.28 per result of D = 512;
//! docs/PERF.md session 13).

use std::collections::VecDeque;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use parking_lot::Mutex;

/// The most bytes of encoded results that share one chunk. Sharing saves allocations, but a
/// chunk lives as long as any of its results: a queue that keeps one result of each chunk (a
/// conflating subscriber, say) holds up to this much per queued result.
pub(crate) const CHUNK_BYTES: usize = 16 << 10;

/// Idle chunks the pool keeps at most (32 MiB); beyond, a returning chunk is freed. The pool
/// needs as many as the results held at once (replay buffers and send queues) fill.
const POOL_CHUNKS: usize = 2048;

/// Chunks the pool looks at for a free one before making a new one. Results leave the replay
/// buffer oldest first and chunks are handed out oldest first, so when the oldest is still held
/// the younger ones behind it almost always are too: a long scan only costs (with 32, ~65
/// instructions a D = 512 result in `benches/fanout.rs` under callgrind, docs/PERF.md session
/// 13); a few misses make the pool a few chunks larger instead.
const SCAN: usize = 4;

/// One encoded result: a range of a chunk that it shares (or a buffer of its own); a clone is
/// a reference count, never a copy.
#[derive(Clone)]
pub(crate) struct SharedFrame {
    chunk: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl SharedFrame {
    /// A frame in a buffer of its own (one allocation beside `v`'s): version 1 encodings and
    /// encodings made for one connection.
    pub fn alone(v: Vec<u8>) -> SharedFrame {
        let end = v.len();
        SharedFrame {
            chunk: Arc::new(v),
            start: 0,
            end,
        }
    }
}

impl Deref for SharedFrame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // Always in range (set by `alone` and `Chunks::frame` from the chunk's own length);
        // empty rather than a panic if that were ever broken.
        self.chunk.get(self.start..self.end).unwrap_or_default()
    }
}

impl fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedFrame<length={}>", self.end - self.start)
    }
}

/// The pool: every chunk handed out that fits [`CHUNK_BYTES`], oldest first; one is free again
/// when the pool's is its only reference left.
#[derive(Default)]
pub(crate) struct ChunkPool {
    ring: Mutex<VecDeque<Arc<Vec<u8>>>>,
}

impl ChunkPool {
    /// An empty chunk of at least `size` bytes of room that nobody else holds: a free one of
    /// the pool's, else a new one (`size` over [`CHUNK_BYTES`]: a new one of that size, never
    /// pooled).
    pub fn take(&self, size: usize) -> Chunk<'_> {
        if size <= CHUNK_BYTES {
            let mut ring = self.ring.lock();
            for _ in 0..SCAN.min(ring.len()) {
                let Some(mut c) = ring.pop_front() else {
                    break;
                };
                // Only the ring holds it (no `Weak` is ever made): nobody can clone it now.
                if let Some(v) = Arc::get_mut(&mut c) {
                    v.clear();
                    return Chunk { pool: self, buf: c };
                }
                ring.push_back(c);
            }
        }
        Chunk {
            pool: self,
            buf: Arc::new(Vec::with_capacity(size.max(CHUNK_BYTES))),
        }
    }

    /// Chunks held now (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ring.lock().len()
    }
}

/// A chunk being written: encodings are appended to it, then taken out as frames.
pub(crate) struct Chunk<'a> {
    pool: &'a ChunkPool,
    buf: Arc<Vec<u8>>,
}

impl Chunk<'_> {
    /// The chunk's bytes to append to; None once a frame of it has been taken.
    pub fn bytes(&mut self) -> Option<&mut Vec<u8>> {
        Arc::get_mut(&mut self.buf)
    }

    /// Bytes written so far (tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Room left before the chunk's capacity.
    pub fn room(&self) -> usize {
        self.buf.capacity() - self.buf.len()
    }

    /// A frame of bytes `start..end` of what was written.
    pub fn frame(&self, start: usize, end: usize) -> SharedFrame {
        let end = end.min(self.buf.len());
        SharedFrame {
            chunk: Arc::clone(&self.buf),
            start: start.min(end),
            end,
        }
    }
}

impl Drop for Chunk<'_> {
    /// Back to the pool (which keeps a reference and finds it free once its frames are gone),
    /// unless it is larger than a pooled chunk or the pool is full.
    fn drop(&mut self) {
        if self.buf.capacity() > CHUNK_BYTES {
            return;
        }
        let mut ring = self.pool.ring.lock();
        if ring.len() < POOL_CHUNKS {
            ring.push_back(Arc::clone(&self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk's frames share its memory; the chunk comes back from the pool only once every
    /// frame of it is dropped, empty, at the same address; a large one is never pooled.
    #[test]
    fn chunks_are_reused_only_after_their_last_frame_is_gone() {
        let pool = ChunkPool::default();
        let mut c = pool.take(100);
        let v = c.bytes().expect("fresh chunk");
        v.extend_from_slice(b"hello world");
        let (a, b) = (c.frame(0, 5), c.frame(6, 11));
        assert!(c.bytes().is_none(), "shared: no more writes");
        let addr = a.as_ptr();
        drop(c);
        assert_eq!((&a[..], &b[..]), (&b"hello"[..], &b"world"[..]));
        assert_eq!(b.as_ptr(), addr.wrapping_add(6));
        assert_eq!(pool.len(), 1);
        // `b` still holds it: a new chunk.
        drop(a);
        let mut d = pool.take(10);
        assert_eq!(d.len(), 0);
        assert_ne!(d.bytes().expect("fresh").as_ptr(), addr);
        drop(d);
        assert_eq!(pool.len(), 2);
        // Both gone: the first chunk again, empty, same memory.
        drop(b);
        let mut e = pool.take(10);
        assert_eq!((e.len(), e.room() >= CHUNK_BYTES, pool.len()), (0, true, 1));
        assert_eq!(e.bytes().expect("free").as_ptr(), addr);
        drop(e);
        // Larger than a chunk: made for it, never pooled.
        let before = pool.len();
        let mut big = pool.take(CHUNK_BYTES + 1);
        assert!(big.room() > CHUNK_BYTES);
        big.bytes().expect("fresh").push(1);
        drop(big);
        assert_eq!(pool.len(), before);
        // Out-of-range frames are clamped, never a panic.
        let mut f = pool.take(4);
        f.bytes().expect("free").extend_from_slice(b"abc");
        assert_eq!(&f.frame(2, 99)[..], b"c");
        assert_eq!(&f.frame(5, 9)[..], b"");
        assert_eq!(&SharedFrame::alone(b"xyz".to_vec())[..], b"xyz");
    }
}
