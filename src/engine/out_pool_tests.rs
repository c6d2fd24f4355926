//! The output pool's page locking (docs/DESIGN.md section 6.7), with the input pool's fake lock
//! (it records every lock that overlaps a live one and every unlock of a range not locked).

use super::*;
use crate::engine::buffers::lock_tests::FakeLock;
use std::sync::atomic::Ordering::SeqCst;

/// Elements of an f32 buffer that is just lockable.
const BIG: usize = MIN_LOCK_BYTES / 4;

fn setup() -> (OutputPool, Arc<FakeLock>, &'static LockedRanges) {
    let ranges: &'static LockedRanges = Box::leak(Box::new(LockedRanges::new()));
    let pool = OutputPool::with_registry(ranges);
    let fake = Arc::new(FakeLock::default());
    pool.set_page_lock(fake.clone());
    (pool, fake, ranges)
}

fn no_misuse(fake: &FakeLock) {
    assert!(fake.misuse.lock().is_empty(), "{:?}", fake.misuse.lock());
}

#[test]
fn outputs_are_locked_when_they_come_back_and_unlocked_when_the_pool_drops() {
    let (pool, fake, ranges) = setup();
    // Large fused, small weights (under MIN_LOCK_BYTES: stays pageable).
    let o = pool.outputs_for(BIG, 16);
    assert_eq!((o.fused.len(), o.weights.len()), (BIG, 16));
    assert!(o.fused.iter().all(|&x| x == 0.0));
    assert_eq!(fake.locks.load(SeqCst), 0, "not locked before it returns");
    let (fs, fl) = range_of(&o.fused);
    assert_eq!(fl, BIG * 4);
    pool.recycle(o);
    assert_eq!(
        fake.locks.load(SeqCst),
        1,
        "only the fused buffer is large enough"
    );
    assert!(ranges.contains(fs, fl));
    assert_eq!((pool.spare(), pool.locked()), (1, 1));
    // Round trips (shrinking, then growing back within the capacity) keep the same locked
    // memory and lock nothing more.
    for len in [BIG / 2, BIG, 7] {
        let mut o = pool.outputs_for(len, 3);
        assert_eq!(o.fused.len(), len);
        assert_eq!(range_of(&o.fused), (fs, fl), "same allocation, in place");
        assert!(ranges.contains(o.fused.as_ptr() as usize, len * 4));
        o.fused.fill(1.5);
        pool.recycle(o);
    }
    assert_eq!(fake.locks.load(SeqCst), 1);
    assert_eq!(fake.unlocks.load(SeqCst), 0);
    drop(pool);
    assert_eq!(fake.unlocks.load(SeqCst), 1);
    assert!(fake.live.lock().is_empty() && ranges.is_empty());
    no_misuse(&fake);
}

#[test]
fn growing_a_locked_buffer_unlocks_it_before_it_is_reallocated() {
    let (pool, fake, ranges) = setup();
    pool.recycle(Outputs {
        fused: vec![2.0; BIG],
        weights: vec![3.0; BIG],
    });
    assert_eq!((fake.locks.load(SeqCst), ranges.len()), (2, 2));
    let old = pool.outputs_for(BIG, BIG);
    let (old_fused, old_weights) = (range_of(&old.fused), range_of(&old.weights));
    pool.recycle(old);
    // Fused grows past its capacity (reallocated), weights shrinks (kept in place).
    let o = pool.outputs_for(4 * BIG, 10);
    assert_eq!((o.fused.len(), o.weights.len()), (4 * BIG, 10));
    assert!(
        o.fused[BIG..].iter().all(|&x| x == 0.0),
        "grown part is zeroed"
    );
    assert_eq!(range_of(&o.weights), old_weights);
    assert_eq!(fake.unlocks.load(SeqCst), 1, "the old fused allocation");
    assert!(!fake.live.lock().contains_key(&old_fused.0));
    assert!(!ranges.contains(old_fused.0, 1));
    assert!(
        !ranges.contains(o.fused.as_ptr() as usize, 4),
        "the new allocation is not locked before it returns"
    );
    assert_eq!(pool.locked(), 1, "weights stay locked while handed out");
    let new_fused = range_of(&o.fused);
    pool.recycle(o);
    assert_eq!(
        fake.locks.load(SeqCst),
        3,
        "the grown fused buffer, on its return"
    );
    assert!(ranges.contains(new_fused.0, new_fused.1));
    assert!(ranges.contains(old_weights.0, old_weights.1));
    drop(pool);
    assert_eq!(fake.locks.load(SeqCst), fake.unlocks.load(SeqCst));
    assert!(fake.live.lock().is_empty() && ranges.is_empty());
    no_misuse(&fake);
}

#[test]
fn a_full_pool_unlocks_what_it_drops() {
    let (pool, fake, ranges) = setup();
    // Hand out SPARE_OUTPUTS + 1 locked pairs: fill the pool, take them all out again.
    for _ in 0..=SPARE_OUTPUTS {
        pool.recycle(Outputs {
            fused: vec![0.0; BIG],
            weights: Vec::new(),
        });
    }
    assert_eq!(pool.spare(), SPARE_OUTPUTS);
    assert_eq!(
        fake.locks.load(SeqCst),
        SPARE_OUTPUTS,
        "the one that did not fit was dropped unlocked"
    );
    assert_eq!(fake.unlocks.load(SeqCst), 0);
    let out: Vec<Outputs> = (0..SPARE_OUTPUTS)
        .map(|_| pool.outputs_for(BIG, 0))
        .collect();
    assert_eq!((pool.spare(), pool.locked()), (0, SPARE_OUTPUTS));
    // A fresh pair comes back first (locked), then the handed-out ones fill the pool...
    let extra = Outputs {
        fused: vec![0.0; BIG],
        weights: Vec::new(),
    };
    let mut all = vec![extra];
    all.extend(out);
    let ranges_out: Vec<(usize, usize)> = all.iter().map(|o| range_of(&o.fused)).collect();
    for o in all {
        pool.recycle(o);
    }
    // ...so the last one given back (locked while handed out) is unlocked, then dropped.
    assert_eq!(pool.spare(), SPARE_OUTPUTS);
    assert_eq!(fake.locks.load(SeqCst), SPARE_OUTPUTS + 1, "the fresh one");
    assert_eq!(fake.unlocks.load(SeqCst), 1);
    let last = ranges_out[SPARE_OUTPUTS];
    assert!(!ranges.contains(last.0, last.1));
    assert_eq!(ranges.len(), SPARE_OUTPUTS);
    drop(pool);
    assert_eq!(fake.locks.load(SeqCst), fake.unlocks.load(SeqCst));
    assert!(fake.live.lock().is_empty() && ranges.is_empty());
    no_misuse(&fake);
}

#[test]
fn a_locked_pair_dropped_by_its_caller_is_unlocked_when_its_memory_is_seen_again() {
    let (pool, fake, ranges) = setup();
    pool.recycle(Outputs {
        fused: vec![0.0; BIG],
        weights: vec![0.0; BIG],
    });
    let o = pool.outputs_for(BIG, BIG);
    let (f, w) = (range_of(&o.fused), range_of(&o.weights));
    // The caller drops it instead of recycling (allowed): both ranges stay recorded...
    drop(o);
    assert_eq!((ranges.len(), pool.locked()), (2, 2));
    // ...until a fresh allocation of the pool overlaps them: the allocator hands out freed
    // memory again, here most likely exactly the same blocks.
    let fresh = pool.outputs_for(BIG, BIG);
    let overlaps = |(s, l): (usize, usize), o: &Outputs| {
        [range_of(&o.fused), range_of(&o.weights)]
            .iter()
            .any(|&(a, n)| a < s + l && s < a + n)
    };
    let reused = [f, w].iter().filter(|&&r| overlaps(r, &fresh)).count();
    assert_eq!(pool.locked(), 2 - reused);
    assert_eq!(fake.unlocks.load(SeqCst), reused);
    for r in [range_of(&fresh.fused), range_of(&fresh.weights)] {
        assert!(ranges.overlapping(r.0, r.1).is_empty(), "stale range left");
    }
    drop(fresh);
    drop(pool);
    assert_eq!(fake.locks.load(SeqCst), fake.unlocks.load(SeqCst));
    assert!(fake.live.lock().is_empty() && ranges.is_empty());
    no_misuse(&fake);
}

#[test]
fn a_lock_installed_later_locks_the_spares_and_take_locked_locks_at_once() {
    let ranges: &'static LockedRanges = Box::leak(Box::new(LockedRanges::new()));
    let pool = OutputPool::with_registry(ranges);
    pool.recycle(Outputs {
        fused: vec![0.0; BIG],
        weights: vec![0.0; 4],
    });
    assert_eq!(pool.locked(), 0, "no lock, nothing locked");
    let first = Arc::new(FakeLock::default());
    let second = Arc::new(FakeLock::default());
    pool.set_page_lock(first.clone());
    pool.set_page_lock(second.clone());
    assert_eq!(first.locks.load(SeqCst), 1);
    assert_eq!(second.locks.load(SeqCst), 0, "the first lock stays");
    let t = pool.take_locked(8, 2);
    assert_eq!((t.fused.len(), t.weights.len()), (8, 2));
    assert!(t.fused.capacity() >= BIG && t.weights.capacity() >= BIG);
    assert!(ranges.contains(t.fused.as_ptr() as usize, 8 * 4));
    assert!(ranges.contains(t.weights.as_ptr() as usize, 2 * 4));
    assert_eq!(first.locks.load(SeqCst), 3);
    pool.recycle(t);
    assert_eq!(first.locks.load(SeqCst), 3, "already locked: kept as is");
    drop(pool);
    assert_eq!(first.unlocks.load(SeqCst), 3);
    assert!(first.live.lock().is_empty() && ranges.is_empty());
    no_misuse(&first);
}
