//! Recycled host buffers for batch inputs (docs/DESIGN.md section 6): whoever assembles a
//! batch (the server's batcher) takes its matrices and mask from here
//! ([`super::Engine::batch_buffer`]), and they come back when the engine has dropped the batch:
//! after its last run on any device, so a buffer is never handed out again while a device may
//! still read it. Steady-state batching then writes into warm memory instead of allocating
//! (and page-faulting in) about 2 MB of fresh memory for each batch of the embedded head.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::batch::Batch;

/// Spare buffers kept at most (a batch of M modalities gives back M + 1).
const SPARE_BUFFERS: usize = 256;
/// Bytes of spare buffers kept at most.
const SPARE_BYTES: usize = 256 << 20;

/// A bounded set of spare byte buffers.
#[derive(Debug, Default)]
pub(crate) struct BufferPool {
    spare: Mutex<Spare>,
}

#[derive(Debug, Default)]
struct Spare {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// An empty buffer of at least `capacity` bytes: the smallest spare one that fits, else
    /// a new one.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let mut spare = self.spare.lock();
        let best = spare
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= capacity)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let v = spare.buffers.swap_remove(i);
                spare.bytes -= v.capacity();
                v
            }
            None => {
                drop(spare);
                Vec::with_capacity(capacity)
            }
        }
    }

    /// Keeps `v` for a later [`BufferPool::take`] (emptied; dropped when the pool is full, or
    /// replacing a smaller spare one).
    pub fn give(&self, mut v: Vec<u8>) {
        if v.capacity() == 0 {
            return;
        }
        v.clear();
        let cap = v.capacity();
        let mut spare = self.spare.lock();
        if spare.buffers.len() < SPARE_BUFFERS && spare.bytes + cap <= SPARE_BYTES {
            spare.bytes += cap;
            spare.buffers.push(v);
        } else if let Some(i) =
            (0..spare.buffers.len()).min_by_key(|&i| spare.buffers[i].capacity())
        {
            let small = spare.buffers[i].capacity();
            if small < cap && spare.bytes - small + cap <= SPARE_BYTES {
                spare.bytes = spare.bytes - small + cap;
                spare.buffers[i] = v;
            }
        }
    }

    /// Gives back every buffer of a batch the engine is done with.
    pub fn give_batch(&self, batch: &mut Batch) {
        for m in batch.inputs.drain(..) {
            self.give(m.bytes);
        }
        self.give(std::mem::take(&mut batch.mask));
    }

    /// Spare buffers held now.
    #[cfg(test)]
    pub fn spare(&self) -> usize {
        self.spare.lock().buffers.len()
    }
}

/// Buffers that go back to their pool when dropped: the copied blocks of one `samples` frame,
/// shared by the runs of rows a batcher splits it into (docs/DESIGN.md section 4).
#[derive(Debug)]
pub(crate) struct PooledBlocks {
    blocks: Vec<Vec<u8>>,
    pool: Arc<BufferPool>,
}

impl PooledBlocks {
    /// No blocks yet.
    pub fn new(pool: Arc<BufferPool>) -> PooledBlocks {
        PooledBlocks {
            blocks: Vec::new(),
            pool,
        }
    }

    /// An empty buffer of at least `capacity` bytes from the pool, to fill and [`push`].
    ///
    /// [`push`]: PooledBlocks::push
    pub fn buffer(&self, capacity: usize) -> Vec<u8> {
        self.pool.take(capacity)
    }

    /// Hands a buffer that will not be pushed back to the pool.
    pub fn give_back(&self, v: Vec<u8>) {
        self.pool.give(v);
    }

    pub fn push(&mut self, v: Vec<u8>) {
        self.blocks.push(v);
    }

    pub fn get(&self, j: usize) -> Option<&[u8]> {
        self.blocks.get(j).map(|v| &v[..])
    }

    /// The blocks themselves, moved out (they no longer go back to the pool on drop; a batch
    /// built from them gives them back when the engine drops it).
    pub fn take_all(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.blocks)
    }

    /// The pool they come from.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }
}

impl Drop for PooledBlocks {
    fn drop(&mut self) {
        for b in self.blocks.drain(..) {
            self.pool.give(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_reuses_the_smallest_buffer_that_fits_and_new_ones_otherwise() {
        let pool = BufferPool::default();
        let big = Vec::<u8>::with_capacity(4096);
        let small = Vec::<u8>::with_capacity(1024);
        let (pb, ps) = (big.as_ptr(), small.as_ptr());
        pool.give(big);
        pool.give(small);
        assert_eq!(pool.spare(), 2);
        let a = pool.take(1000);
        assert_eq!(a.as_ptr(), ps, "the 1 KiB buffer fits 1000 bytes best");
        assert!(a.is_empty() && a.capacity() >= 1000);
        let b = pool.take(2000);
        assert_eq!(b.as_ptr(), pb);
        let c = pool.take(10);
        assert!(c.capacity() >= 10);
        assert_ne!(c.as_ptr(), pb);
        assert_eq!(pool.spare(), 0);
    }

    #[test]
    fn give_empties_the_buffer_and_the_pool_stays_bounded() {
        let pool = BufferPool::default();
        pool.give(vec![7u8; 100]);
        let v = pool.take(50);
        assert!(v.is_empty(), "a reused buffer starts empty");
        for _ in 0..SPARE_BUFFERS + 10 {
            pool.give(Vec::with_capacity(16));
        }
        assert_eq!(pool.spare(), SPARE_BUFFERS);
        // A larger buffer replaces the smallest spare one once full.
        pool.give(Vec::with_capacity(1 << 20));
        assert_eq!(pool.spare(), SPARE_BUFFERS);
        assert!(pool.take(1 << 20).capacity() >= 1 << 20);
        // Zero-capacity buffers are not kept.
        let n = pool.spare();
        pool.give(Vec::new());
        assert_eq!(pool.spare(), n);
    }

    #[test]
    fn the_pool_keeps_at_most_its_byte_bound() {
        let pool = BufferPool::default();
        for _ in 0..8 {
            pool.give(Vec::with_capacity(SPARE_BYTES / 4));
        }
        assert_eq!(pool.spare(), 4);
        assert!(pool.spare.lock().bytes <= SPARE_BYTES);
    }

    #[test]
    fn pooled_blocks_go_back_on_drop_unless_taken() {
        let pool = Arc::new(BufferPool::default());
        let mut b = PooledBlocks::new(Arc::clone(&pool));
        let mut v = b.buffer(100);
        v.extend_from_slice(&[1, 2, 3]);
        b.push(v);
        b.push(b.buffer(50));
        assert_eq!(b.get(0), Some(&[1u8, 2, 3][..]));
        drop(b);
        assert_eq!(pool.spare(), 2);
        let mut b = PooledBlocks::new(Arc::clone(&pool));
        b.push(b.buffer(100));
        assert_eq!(pool.spare(), 1);
        let taken = b.take_all();
        drop(b);
        assert_eq!(taken.len(), 1);
        assert_eq!(pool.spare(), 1, "taken blocks are the caller's now");
    }
}
