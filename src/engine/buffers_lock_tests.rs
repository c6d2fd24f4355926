//! The buffer pool's page locking (docs/DESIGN.md section 6.7), with a fake lock that checks
//! what the driver would refuse.

use super::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// Counts locks and unlocks; records every misuse (a range locked twice or overlapping a
/// locked one, an unlock of a range not locked as such).
#[derive(Default)]
pub(crate) struct FakeLock {
    pub live: Mutex<BTreeMap<usize, usize>>,
    pub locks: AtomicUsize,
    pub unlocks: AtomicUsize,
    pub misuse: Mutex<Vec<String>>,
}

impl HostPageLock for FakeLock {
    fn lock(&self, start: usize, len: usize) -> bool {
        let mut live = self.live.lock();
        if live.iter().any(|(&s, &l)| s < start + len && start < s + l) {
            self.misuse
                .lock()
                .push(format!("lock of {start:#x}+{len} overlaps"));
            return false;
        }
        live.insert(start, len);
        self.locks.fetch_add(1, SeqCst);
        true
    }
    fn unlock(&self, start: usize, len: usize) {
        if self.live.lock().remove(&start) != Some(len) {
            self.misuse
                .lock()
                .push(format!("unlock of {start:#x}+{len} not locked"));
        }
        self.unlocks.fetch_add(1, SeqCst);
    }
}

fn setup() -> (BufferPool, Arc<FakeLock>, &'static LockedRanges) {
    let ranges: &'static LockedRanges = Box::leak(Box::new(LockedRanges::new()));
    let pool = BufferPool::with_registry(ranges);
    let fake = Arc::new(FakeLock::default());
    pool.set_page_lock(fake.clone());
    (pool, fake, ranges)
}

#[test]
fn recycled_buffers_are_locked_once_and_unlocked_when_the_pool_drops() {
    let (pool, fake, ranges) = setup();
    let bufs: Vec<Vec<u8>> = (0..3).map(|i| pool.take(MIN_LOCK_BYTES + i)).collect();
    assert_eq!(
        fake.locks.load(SeqCst),
        0,
        "new buffers are not locked before they return"
    );
    let small = pool.take(MIN_LOCK_BYTES - 1);
    let at: Vec<(usize, usize)> = bufs.iter().map(range_of).collect();
    for v in bufs {
        pool.give(v);
    }
    pool.give(small);
    assert_eq!(
        fake.locks.load(SeqCst),
        3,
        "the small buffer stays pageable"
    );
    assert_eq!(ranges.len(), 3);
    for &(s, l) in &at {
        assert!(ranges.contains(s, l));
    }
    // Round trips lock nothing more.
    for _ in 0..5 {
        let mut v = pool.take(MIN_LOCK_BYTES + 1);
        assert!(ranges.contains(v.as_ptr() as usize, v.capacity()));
        v.extend_from_slice(&[1, 2, 3]);
        pool.give(v);
    }
    assert_eq!(fake.locks.load(SeqCst), 3);
    assert_eq!(fake.unlocks.load(SeqCst), 0);
    drop(pool);
    assert_eq!(fake.unlocks.load(SeqCst), 3);
    assert!(fake.live.lock().is_empty(), "nothing is left locked");
    assert!(ranges.is_empty());
    assert!(fake.misuse.lock().is_empty(), "{:?}", fake.misuse.lock());
}

#[test]
fn a_dropped_or_replaced_buffer_is_unlocked_first() {
    let (pool, fake, ranges) = setup();
    // Fill the byte bound with four locked quarter buffers.
    for _ in 0..4 {
        pool.give(Vec::with_capacity(SPARE_BYTES / 4));
    }
    assert_eq!((pool.spare(), pool.locked()), (4, 4));
    // Full, and not larger than the smallest: dropped without being locked.
    pool.give(Vec::with_capacity(SPARE_BYTES / 8));
    assert_eq!(fake.locks.load(SeqCst), 4);
    assert_eq!(fake.unlocks.load(SeqCst), 0);
    // A handed-out locked buffer that comes back to a full pool is unlocked, then dropped.
    let v = pool.take(SPARE_BYTES / 4);
    let (s, l) = range_of(&v);
    pool.give(Vec::with_capacity(SPARE_BYTES / 4));
    assert_eq!(fake.locks.load(SeqCst), 5);
    pool.give(v);
    assert_eq!(fake.unlocks.load(SeqCst), 1);
    assert!(!fake.live.lock().contains_key(&s) && !ranges.contains(s, l));
    assert_eq!((pool.spare(), pool.locked()), (4, 4));
    drop(pool);
    assert_eq!(fake.locks.load(SeqCst), fake.unlocks.load(SeqCst));
    assert!(fake.live.lock().is_empty());
    assert!(fake.misuse.lock().is_empty(), "{:?}", fake.misuse.lock());
}

#[test]
fn a_lock_installed_later_locks_the_spare_buffers_and_the_first_lock_stays() {
    let ranges: &'static LockedRanges = Box::leak(Box::new(LockedRanges::new()));
    let pool = BufferPool::with_registry(ranges);
    pool.give(Vec::with_capacity(MIN_LOCK_BYTES));
    pool.give(Vec::with_capacity(16));
    assert_eq!(pool.locked(), 0);
    let first = Arc::new(FakeLock::default());
    let second = Arc::new(FakeLock::default());
    pool.set_page_lock(first.clone());
    pool.set_page_lock(second.clone());
    assert_eq!(first.locks.load(SeqCst), 1);
    assert_eq!(second.locks.load(SeqCst), 0);
    let v = pool.take_locked(10);
    assert!(
        v.capacity() >= MIN_LOCK_BYTES,
        "take_locked takes a lockable size"
    );
    assert!(ranges.contains(v.as_ptr() as usize, v.capacity()));
    pool.give(v);
    drop(pool);
    assert_eq!(first.unlocks.load(SeqCst), first.locks.load(SeqCst));
    assert!(first.misuse.lock().is_empty(), "{:?}", first.misuse.lock());
}

#[test]
fn a_failed_lock_leaves_the_buffer_pageable_and_unrecorded() {
    let (pool, fake, ranges) = setup();
    let v: Vec<u8> = Vec::with_capacity(MIN_LOCK_BYTES);
    let (s, l) = range_of(&v);
    // Someone else holds this memory locked: the fake refuses, like the driver would.
    fake.live.lock().insert(s, l);
    pool.give(v);
    assert_eq!((pool.spare(), pool.locked()), (1, 0));
    assert!(!ranges.contains(s, l));
    assert_eq!(fake.misuse.lock().len(), 1);
    fake.live.lock().remove(&s);
    drop(pool);
    assert_eq!(
        fake.unlocks.load(SeqCst),
        0,
        "nothing of the pool's to unlock"
    );
}

#[test]
fn stale_ranges_overlapping_a_live_allocation_are_unlocked() {
    // Synthetic addresses: the fake never touches memory.
    let ranges: &'static LockedRanges = Box::leak(Box::new(LockedRanges::new()));
    let fake = Arc::new(FakeLock::default());
    let mut set = super::super::page_locks::LockSet::new(ranges);
    assert!(set.set_lock(fake.clone()));
    for (s, l) in [(0x10000, 0x1000), (0x11000, 0x1000), (0x20000, 0x1000)] {
        assert!(ranges.insert(s, l) && fake.lock(s, l));
        set.locked.insert(s, l);
    }
    // A buffer handed out locked, back as it was: kept.
    set.drop_stale(0x10000, 0x1000, true);
    assert_eq!(set.len(), 3);
    // A live allocation across both first ranges: both were freed.
    set.drop_stale(0x10800, 0x1000, true);
    assert_eq!(
        set.locked.keys().copied().collect::<Vec<_>>(),
        vec![0x20000]
    );
    assert!(!ranges.contains(0x10000, 1) && !ranges.contains(0x11000, 1));
    // A new allocation exactly where a locked range was: that range was freed too.
    set.drop_stale(0x20000, 0x1000, false);
    assert!(set.is_empty() && ranges.is_empty());
    assert!(fake.live.lock().is_empty());
    assert!(fake.misuse.lock().is_empty(), "{:?}", fake.misuse.lock());
}

#[test]
fn another_owners_stale_range_leaves_the_registry_but_stays_its_owners_to_unlock() {
    // Two sets on one registry, as the input and output pools share the process's.
    let ranges: &'static LockedRanges = Box::leak(Box::new(LockedRanges::new()));
    let fake = Arc::new(FakeLock::default());
    let (mut inputs, mut outputs) = (
        super::super::page_locks::LockSet::new(ranges),
        super::super::page_locks::LockSet::new(ranges),
    );
    assert!(inputs.set_lock(fake.clone()) && outputs.set_lock(fake.clone()));
    // The input set locked 0x40000 (synthetic: the fake never touches memory); the buffer was
    // freed outside it, and the output set now sees a live allocation across it.
    assert!(ranges.insert(0x40000, 0x10000) && fake.lock(0x40000, 0x10000));
    inputs.locked.insert(0x40000, 0x10000);
    assert!(outputs.may_be_stale());
    outputs.drop_stale(0x48000, 0x10000, false);
    assert!(
        !ranges.contains(0x48000, 1),
        "no copy may treat the live allocation as locked"
    );
    assert_eq!(inputs.len(), 1, "still the input set's to unlock");
    assert_eq!(fake.unlocks.load(SeqCst), 0);
    // Its owner unlocks it when it drops (or sees it stale itself): exactly once.
    inputs.unlock_all();
    assert_eq!(fake.unlocks.load(SeqCst), 1);
    assert!(fake.live.lock().is_empty() && ranges.is_empty());
    assert!(!outputs.may_be_stale());
    assert!(fake.misuse.lock().is_empty(), "{:?}", fake.misuse.lock());
}
