//! The page-lock bookkeeping the engine's recycled buffers share (docs/DESIGN.md section 6.7):
//! the batch input pool ([`super::buffers::BufferPool`]) and the output spares
//! ([`super::out_pool::OutputPool`]) each own one [`LockSet`].
//!
//! A set locks a buffer's whole allocation (`[ptr, ptr + capacity)`) with the device's
//! [`HostPageLock`], records it in a [`LockedRanges`] registry (where a device's copies look
//! memory up) and remembers it until it unlocks it. A range leaves the registry before it is
//! unlocked, and is unlocked before its memory is freed by its owner; a locked buffer freed
//! elsewhere (dropped by a caller, or reallocated by growing) is found stale, and unlocked,
//! when its memory shows up in a live allocation the set sees.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::host_lock::{HostPageLock, LockedRanges};

/// Smaller buffers are not page-locked: staging them costs less than a lock, and masks and
/// small batches gain nothing from a direct copy.
pub(crate) const MIN_LOCK_BYTES: usize = 64 << 10;

/// The ranges one owner locked, and the lock it locks them with.
pub(crate) struct LockSet {
    lock: Option<Arc<dyn HostPageLock>>,
    /// Every range this set locked and has not unlocked yet (start -> len).
    pub(super) locked: BTreeMap<usize, usize>,
    /// Where locked ranges are recorded (`host_lock::registry`; tests use their own).
    ranges: &'static LockedRanges,
}

impl std::fmt::Debug for LockSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockSet")
            .field("page_lock", &self.lock.is_some())
            .field("locked", &self.locked.len())
            .finish()
    }
}

/// The allocation of `v`, in bytes: `(start, len)`.
pub(crate) fn range_of<T>(v: &Vec<T>) -> (usize, usize) {
    (v.as_ptr() as usize, v.capacity() * std::mem::size_of::<T>())
}

impl LockSet {
    /// No lock yet, nothing locked.
    pub fn new(ranges: &'static LockedRanges) -> LockSet {
        LockSet {
            lock: None,
            locked: BTreeMap::new(),
            ranges,
        }
    }

    /// Installs `lock` unless one is installed already (the first stays: a portable lock is
    /// valid for every device). True when installed now.
    pub fn set_lock(&mut self, lock: Arc<dyn HostPageLock>) -> bool {
        if self.lock.is_some() {
            return false;
        }
        self.lock = Some(lock);
        true
    }

    /// Whether exactly `[start, start + len)` is locked by this set.
    pub fn is_locked(&self, start: usize, len: usize) -> bool {
        self.locked.get(&start) == Some(&len)
    }

    /// Ranges locked now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.locked.len()
    }

    /// Whether none is locked.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.locked.is_empty()
    }

    /// Locks the live allocation `[start, start + len)` of a buffer the owner keeps, if the set
    /// has a lock, it is at least [`MIN_LOCK_BYTES`] and not locked already (a buffer handed
    /// out locked, back now). Ranges it overlaps are stale and unlocked first.
    pub fn adopt(&mut self, start: usize, len: usize) {
        if self.is_locked(start, len) {
            return;
        }
        self.drop_stale(start, len, true);
        let Some(lock) = self.lock.clone() else {
            return;
        };
        if len < MIN_LOCK_BYTES || !self.ranges.insert(start, len) {
            return;
        }
        let t = std::time::Instant::now();
        let locked = lock.lock(start, len);
        metrics::histogram!("fusion_engine_page_lock_seconds").record(t.elapsed().as_secs_f64());
        if locked {
            self.locked.insert(start, len);
        } else {
            self.ranges.remove(start);
        }
    }

    /// Whether [`LockSet::drop_stale`] may find anything (some range is recorded).
    pub fn may_be_stale(&self) -> bool {
        !self.locked.is_empty() || !self.ranges.is_empty()
    }

    /// `[start, start + len)` is a live allocation: a locked range that overlaps it belonged to
    /// a buffer freed outside its owner (dropped by a caller, or grown and so reallocated),
    /// unless it is exactly this range, this set's, and `keep_exact` (a buffer handed out
    /// locked, back now). Unlocks those of this set; those another owner recorded (the other
    /// pool's) leave the registry, so that no copy treats this memory as locked, and are
    /// unlocked by their owner when it sees them stale too or drops.
    pub fn drop_stale(&mut self, start: usize, len: usize, keep_exact: bool) {
        if len == 0 || !self.may_be_stale() {
            return;
        }
        for (s, _) in self.ranges.overlapping(start, len) {
            if !self.locked.contains_key(&s) {
                self.ranges.remove(s);
            }
        }
        let end = start.saturating_add(len);
        let stale: Vec<(usize, usize)> = self
            .locked
            .range(..end)
            .rev()
            .take_while(|(&s, &l)| s + l > start)
            .filter(|&(&s, &l)| !keep_exact || (s, l) != (start, len))
            .map(|(&s, &l)| (s, l))
            .collect();
        for (s, l) in stale {
            self.unlock(s, l);
        }
    }

    /// Unlocks `[start, start + len)` if this set locked it (before its memory is freed or
    /// reallocated).
    pub fn unlock(&mut self, start: usize, len: usize) {
        if self.locked.get(&start) != Some(&len) {
            return;
        }
        self.locked.remove(&start);
        // Out of the registry first, so that no copy looks it up as locked any more.
        self.ranges.remove(start);
        if let Some(lock) = &self.lock {
            let t = std::time::Instant::now();
            lock.unlock(start, len);
            metrics::histogram!("fusion_engine_page_unlock_seconds")
                .record(t.elapsed().as_secs_f64());
        }
    }

    /// Unlocks everything (the owner is dropped: its buffers are freed next, buffers it handed
    /// out stay usable as pageable memory).
    pub fn unlock_all(&mut self) {
        let locked: Vec<(usize, usize)> = self.locked.iter().map(|(&s, &l)| (s, l)).collect();
        for (s, l) in locked {
            self.unlock(s, l);
        }
    }
}
