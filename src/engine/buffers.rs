//! Recycled host buffers for batch inputs (docs/DESIGN.md section 6): whoever assembles a
//! batch (the server's batcher) takes its matrices and mask from here
//! ([`super::Engine::batch_buffer`]), and they come back when the engine has dropped the batch:
//! after its last run on any device, so a buffer is never handed out again while a device may
//! still read it. Steady-state batching then writes into warm memory instead of allocating
//! (and page-faulting in) about 2 MB of fresh memory for each batch of the embedded head.
//!
//! With a device that copies faster from page-locked memory (CUDA), the pool also page-locks
//! the buffers it keeps (docs/DESIGN.md section 6.7): a buffer is locked when it first comes
//! back (so buffers that never return, such as those of a batch handed to NATS, are never
//! locked), stays locked while it circulates, and is unlocked before the pool drops it (full,
//! replaced by a larger one, or the pool itself dropped). Each locked range is recorded in
//! [`host_lock::registry`], where a device's upload looks a batch matrix up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::page_locks::MIN_LOCK_BYTES;
use super::page_locks::{range_of, LockSet};
use crate::backend::host_lock::{self, HostPageLock, LockedRanges};
use crate::batch::Batch;
use crate::tensor::HostBytes;

/// Spare buffers kept at most (a batch of M modalities gives back M + 1).
const SPARE_BUFFERS: usize = 256;
/// Bytes of spare buffers kept at most.
const SPARE_BYTES: usize = 256 << 20;

/// A bounded set of spare byte buffers.
#[derive(Debug)]
pub(crate) struct BufferPool {
    spare: Mutex<Spare>,
    /// Whether a page lock is installed (read per `samples` frame, without the mutex).
    locks_pages: AtomicBool,
    /// Where this pool records the ranges it locks (read per `samples` frame block).
    ranges: &'static LockedRanges,
}

impl Default for BufferPool {
    fn default() -> BufferPool {
        BufferPool::with_registry(host_lock::registry())
    }
}

#[derive(Debug)]
struct Spare {
    /// Sorted by capacity, ascending; among equal capacities the one given back last is last
    /// (taken first: its memory is the most likely still in cache).
    buffers: Vec<Vec<u8>>,
    bytes: usize,
    /// The ranges this pool locked: its spare buffers and the locked buffers it handed out.
    locks: LockSet,
}

impl Spare {
    /// Keeps `v` in `buffers` (sorted by capacity, after those of its capacity).
    fn insert(&mut self, v: Vec<u8>) {
        let cap = v.capacity();
        let at = self.buffers.partition_point(|b| b.capacity() <= cap);
        self.buffers.insert(at, v);
    }

    /// Locks `v` if the pool has a lock, `v` is large enough and not locked already.
    fn adopt(&mut self, v: &Vec<u8>) {
        let (start, len) = range_of(v);
        self.locks.adopt(start, len);
    }

    /// Drops a buffer, unlocking it first when it is locked.
    fn release(&mut self, v: Vec<u8>) {
        let (start, len) = range_of(&v);
        self.locks.unlock(start, len);
        drop(v);
    }
}

impl BufferPool {
    /// An empty pool recording its locked ranges in `ranges`.
    pub fn with_registry(ranges: &'static LockedRanges) -> BufferPool {
        BufferPool {
            spare: Mutex::new(Spare {
                buffers: Vec::new(),
                bytes: 0,
                locks: LockSet::new(ranges),
            }),
            locks_pages: AtomicBool::new(false),
            ranges,
        }
    }

    /// Page-locks the buffers this pool keeps with `lock` from now on (and those it holds
    /// now). The first lock installed stays: a portable lock is valid for every device.
    pub fn set_page_lock(&self, lock: Arc<dyn HostPageLock>) {
        let mut spare = self.spare.lock();
        if !spare.locks.set_lock(lock) {
            return;
        }
        self.locks_pages.store(true, Ordering::Relaxed);
        let held = std::mem::take(&mut spare.buffers);
        for v in &held {
            spare.adopt(v);
        }
        spare.buffers = held;
    }

    /// Whether the buffers this pool keeps are page-locked (a device copies faster from them:
    /// the server then copies `samples` blocks into them, docs/DESIGN.md section 4.2).
    pub fn locks_pages(&self) -> bool {
        self.locks_pages.load(Ordering::Relaxed)
    }

    /// Whether `bytes` (non-empty) lie inside one page-locked range of the registry this pool
    /// records in: a block of a `samples` frame that was read into one of the pool's locked
    /// buffers, which a device then copies straight from (docs/DESIGN.md sections 4.1, 6.7).
    /// False while no lock is installed.
    pub fn is_page_locked(&self, bytes: &[u8]) -> bool {
        self.locks_pages() && self.ranges.contains(bytes.as_ptr() as usize, bytes.len())
    }

    /// An empty buffer of at least `capacity` bytes: the smallest spare one that fits, else
    /// a new one. Write at most its capacity: growing it reallocates it, and a locked buffer
    /// freed that way stays locked (unused) until the pool sees its memory allocated again.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let mut spare = self.spare.lock();
        // The smallest capacity that fits, and the last buffer of that capacity (binary
        // searches: a scan of up to SPARE_BUFFERS spares per take was 2.4% of `serve`'s CPU).
        let fits = spare.buffers.partition_point(|v| v.capacity() < capacity);
        let best = spare.buffers.get(fits).map(|v| {
            let c = v.capacity();
            spare.buffers.partition_point(|v| v.capacity() <= c) - 1
        });
        match best {
            Some(i) => {
                let v = spare.buffers.remove(i);
                spare.bytes -= v.capacity();
                v
            }
            None => {
                let stale = spare.locks.may_be_stale();
                drop(spare);
                let v = Vec::with_capacity(capacity);
                if stale {
                    // A new allocation: even a locked range that is exactly this one was freed.
                    let (start, len) = range_of(&v);
                    self.spare.lock().locks.drop_stale(start, len, false);
                }
                v
            }
        }
    }

    /// [`BufferPool::take`], page-locked now if the pool has a lock and the buffer is at least
    /// [`MIN_LOCK_BYTES`] (for callers that will not wait for a buffer to come back: the
    /// bench's pinned inputs).
    #[cfg_attr(not(feature = "tools"), allow(dead_code))]
    pub fn take_locked(&self, capacity: usize) -> Vec<u8> {
        let v = self.take(capacity.max(MIN_LOCK_BYTES));
        self.spare.lock().adopt(&v);
        v
    }

    /// Keeps `v` for a later [`BufferPool::take`] (emptied, and page-locked if the pool has a
    /// lock); dropped (after unlocking it) when the pool is full, or replacing a smaller spare
    /// one.
    pub fn give(&self, mut v: Vec<u8>) {
        if v.capacity() == 0 {
            return;
        }
        v.clear();
        let cap = v.capacity();
        let mut spare = self.spare.lock();
        if spare.buffers.len() < SPARE_BUFFERS && spare.bytes + cap <= SPARE_BYTES {
            spare.adopt(&v);
            spare.bytes += cap;
            spare.insert(v);
            return;
        }
        // Full: `v` replaces the smallest spare one (the first) when that is smaller.
        match spare.buffers.first().map(Vec::capacity) {
            Some(small) if small < cap && spare.bytes - small + cap <= SPARE_BYTES => {
                spare.adopt(&v);
                let small = spare.buffers.remove(0);
                spare.bytes = spare.bytes - small.capacity() + cap;
                spare.release(small);
                spare.insert(v);
            }
            _ => spare.release(v),
        }
    }

    /// Gives back every buffer of a batch the engine is done with.
    pub fn give_batch(&self, batch: &mut Batch) {
        // Slices of received frames are freed with their last reference, not kept.
        for v in batch.inputs.drain(..).filter_map(|m| m.bytes.into_vec()) {
            self.give(v);
        }
        self.give(std::mem::take(&mut batch.mask));
    }

    /// Spare buffers held now.
    #[cfg(test)]
    pub fn spare(&self) -> usize {
        self.spare.lock().buffers.len()
    }

    /// Ranges this pool holds locked now.
    #[cfg(test)]
    pub fn locked(&self) -> usize {
        self.spare.lock().locks.len()
    }
}

impl Drop for BufferPool {
    /// Unlocks every range the pool locked (its spare buffers, freed next, and buffers it handed
    /// out, which stay usable as pageable memory).
    fn drop(&mut self) {
        self.spare.get_mut().locks.unlock_all();
    }
}

/// The blocks of one `samples` frame, shared by the runs of rows a batcher splits it into
/// (docs/DESIGN.md section 4): buffers copied from the frame, which go back to their pool when
/// dropped, or slices of the frame itself (section 4.2), freed with their last reference.
#[derive(Debug)]
pub(crate) struct PooledBlocks {
    blocks: Vec<HostBytes>,
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

    /// Adds a block: a buffer from [`PooledBlocks::buffer`], or a slice of the frame.
    pub fn push(&mut self, v: impl Into<HostBytes>) {
        self.blocks.push(v.into());
    }

    pub fn get(&self, j: usize) -> Option<&[u8]> {
        self.blocks.get(j).map(|v| &v[..])
    }

    /// The blocks themselves, moved out (they no longer go back to the pool on drop; a batch
    /// built from them gives them back when the engine drops it).
    pub fn take_all(&mut self) -> Vec<HostBytes> {
        std::mem::take(&mut self.blocks)
    }

    /// The pool they come from.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }
}

impl Drop for PooledBlocks {
    fn drop(&mut self) {
        for v in self.blocks.drain(..).filter_map(HostBytes::into_vec) {
            self.pool.give(v);
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
    fn spares_stay_sorted_and_the_last_given_of_a_size_is_taken_first() {
        let ptr_of = |v: Vec<u8>| v.as_ptr() as usize;
        let ptrs_of = |p: *const u8| p as usize;
        let pool = BufferPool::default();
        let caps = [300, 100, 200, 100, 400, 200];
        let mut ptrs = Vec::new();
        for c in caps {
            let v = Vec::<u8>::with_capacity(c);
            ptrs.push(ptrs_of(v.as_ptr()));
            pool.give(v);
        }
        let sorted: Vec<usize> = pool
            .spare
            .lock()
            .buffers
            .iter()
            .map(Vec::capacity)
            .collect();
        assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "{sorted:?}");
        // Two 100s: the one given back second (index 3) first, then the other (index 1).
        assert_eq!(ptr_of(pool.take(50)), ptrs[3]);
        assert_eq!(ptr_of(pool.take(100)), ptrs[1]);
        assert_eq!(ptr_of(pool.take(150)), ptrs[5]);
        assert_eq!(ptr_of(pool.take(350)), ptrs[4]);
        assert_eq!(pool.spare(), 2);
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

/// The pool's page locking, with a fake lock.
#[cfg(test)]
#[path = "buffers_lock_tests.rs"]
pub(crate) mod lock_tests;
