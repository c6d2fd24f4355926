//! Page-locked batch memory (docs/DESIGN.md section 6.7): a backend that can page-lock host
//! memory in place offers a [`HostPageLock`] (`Backend::page_lock`); the engine's
//! buffer pool locks the batch buffers it recycles with it, its output pool the output buffers
//! it recycles, and both record each locked range in [`registry`]; a backend's upload reads a
//! batch matrix straight from its memory when the matrix lies inside a recorded range (CUDA:
//! `cuda/pinned.rs`), and its download writes a chunk's results straight into the caller's
//! outputs when they lie inside one (`cuda/pinned_out.rs`); everything else is staged.
//!
//! Every range in the registry was locked by a [`HostPageLock`] and is removed from the
//! registry before it is unlocked. Only the owner of the memory (a pool) locks and unlocks; a
//! pool that sees a live allocation overlapping another owner's range (that memory was freed)
//! only removes the range from the registry.

use std::collections::BTreeMap;
use std::sync::RwLock;

/// Page-locks host memory in place (CUDA: `cuMemHostRegister`, portable to every context).
pub trait HostPageLock: Send + Sync {
    /// Page-locks the `len` bytes at address `start`, a live allocation the caller owns and
    /// keeps alive until [`HostPageLock::unlock`]. False when that failed (the memory stays
    /// pageable, which is always correct, only slower to copy).
    fn lock(&self, start: usize, len: usize) -> bool;

    /// Undoes a successful [`HostPageLock::lock`] of exactly this range (before the memory is
    /// freed).
    fn unlock(&self, start: usize, len: usize);
}

/// Non-overlapping locked ranges, by start address.
#[derive(Debug, Default)]
pub struct LockedRanges {
    map: RwLock<BTreeMap<usize, usize>>,
}

impl LockedRanges {
    /// An empty registry.
    pub const fn new() -> LockedRanges {
        LockedRanges {
            map: RwLock::new(BTreeMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<usize, usize>> {
        // A panic while holding the lock cannot leave the map half-updated (one insert or
        // remove per write), so a poisoned lock is still a consistent map.
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<usize, usize>> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `[start, start + len)`; false (and nothing recorded) when it is empty or
    /// overlaps a recorded range.
    pub fn insert(&self, start: usize, len: usize) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let mut map = self.write();
        if len == 0 || overlaps(&map, start, end) {
            return false;
        }
        map.insert(start, len);
        true
    }

    /// Forgets the range that starts at `start`, returning its length.
    pub fn remove(&self, start: usize) -> Option<usize> {
        self.write().remove(&start)
    }

    /// Whether `[start, start + len)` (non-empty) lies inside one recorded range.
    pub fn contains(&self, start: usize, len: usize) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        len > 0
            && self
                .read()
                .range(..=start)
                .next_back()
                .is_some_and(|(&s, &l)| s + l >= end)
    }

    /// The recorded ranges that overlap `[start, start + len)`, as (start, len).
    pub fn overlapping(&self, start: usize, len: usize) -> Vec<(usize, usize)> {
        let end = start.saturating_add(len);
        let map = self.read();
        overlapping_in(&map, start, end)
    }

    /// Ranges recorded now.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether none is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn overlapping_in(map: &BTreeMap<usize, usize>, start: usize, end: usize) -> Vec<(usize, usize)> {
    // Ranges do not overlap each other, so those that reach past `start` are consecutive and
    // end with the last one that starts before `end`.
    let mut v: Vec<(usize, usize)> = map
        .range(..end)
        .rev()
        .take_while(|(&s, &l)| s + l > start)
        .map(|(&s, &l)| (s, l))
        .collect();
    v.reverse();
    v
}

fn overlaps(map: &BTreeMap<usize, usize>, start: usize, end: usize) -> bool {
    !overlapping_in(map, start, end).is_empty()
}

static REGISTRY: LockedRanges = LockedRanges::new();

/// The process's locked batch memory (page locking is process-wide: a portable
/// registration is pinned memory to every context).
pub fn registry() -> &'static LockedRanges {
    &REGISTRY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_is_inside_one_range() {
        let r = LockedRanges::new();
        assert!(r.insert(1000, 100));
        assert!(r.insert(1100, 50), "adjacent ranges are separate ranges");
        assert!(r.contains(1000, 100));
        assert!(r.contains(1010, 1));
        assert!(r.contains(1099, 1));
        assert!(!r.contains(1099, 2), "spans two ranges: not inside one");
        assert!(!r.contains(999, 2));
        assert!(!r.contains(1150, 1));
        assert!(!r.contains(1000, 0), "empty slices are never direct");
        assert!(!r.contains(usize::MAX, 2));
        assert!(!r.contains(0, 10));
    }

    #[test]
    fn insert_refuses_overlaps_and_remove_forgets() {
        let r = LockedRanges::new();
        assert!(r.insert(4096, 4096));
        assert!(!r.insert(4000, 100), "overlaps the start");
        assert!(!r.insert(8191, 10), "overlaps the end");
        assert!(!r.insert(5000, 10), "inside");
        assert!(!r.insert(0, 0));
        assert!(!r.insert(usize::MAX - 1, 4));
        assert!(r.insert(8192, 1));
        assert_eq!(r.len(), 2);
        assert_eq!(r.overlapping(4000, 5000), vec![(4096, 4096), (8192, 1)]);
        assert_eq!(r.overlapping(8000, 100), vec![(4096, 4096)]);
        assert_eq!(r.overlapping(0, 4096), vec![]);
        assert_eq!(r.remove(4096), Some(4096));
        assert_eq!(r.remove(4096), None);
        assert!(!r.contains(5000, 1));
        assert!(r.insert(4000, 100));
        assert_eq!(r.len(), 2);
        assert!(!r.is_empty());
    }
}
