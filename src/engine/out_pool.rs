//! Recycled output buffers (docs/DESIGN.md sections 6 and 6.7): a worker takes a batch's
//! `fused` and `weights` from here ([`OutputPool::outputs_for`]), and callers that are done with
//! a result's outputs hand them back ([`super::Engine::recycle`]; the server's fan-out does
//! once every subscriber's frame is encoded), so that a batch neither allocates nor zeroes
//! fresh outputs.
//!
//! With a device that copies faster into page-locked memory (CUDA), the pool also page-locks
//! the output buffers it keeps, with the same [`HostPageLock`] and bookkeeping
//! ([`LockSet`]) as the batch input pool: a buffer is locked when it first comes back (outputs
//! that never return are never locked), stays locked while it circulates, and is unlocked
//! before its memory is freed or reallocated (dropped by a full pool, grown by
//! [`OutputPool::outputs_for`] past its capacity, or the pool dropped). The device's download
//! then writes a chunk's results straight into them (`backend/cuda/pinned_out.rs`), and the
//! fan-out encodes from that memory.

use std::sync::Arc;

use parking_lot::Mutex;

use super::page_locks::{range_of, LockSet, MIN_LOCK_BYTES};
use crate::backend::host_lock::{self, HostPageLock, LockedRanges};
use crate::batch::Outputs;

/// Spare output pairs kept for reuse (per engine).
pub(crate) const SPARE_OUTPUTS: usize = 16;

/// A bounded set of spare output pairs.
#[derive(Debug)]
pub(crate) struct OutputPool {
    spare: Mutex<OutSpare>,
}

#[derive(Debug)]
struct OutSpare {
    /// Taken last in, first out (the warmest memory).
    outputs: Vec<Outputs>,
    /// The ranges this pool locked: its spare buffers and the locked ones it handed out.
    locks: LockSet,
}

impl Default for OutputPool {
    fn default() -> OutputPool {
        OutputPool::with_registry(host_lock::registry())
    }
}

impl OutSpare {
    /// Locks both buffers of `o` (each if large enough and not locked already).
    fn adopt(&mut self, o: &Outputs) {
        for (s, l) in [range_of(&o.fused), range_of(&o.weights)] {
            self.locks.adopt(s, l);
        }
    }
}

/// `v` resized to `len` elements; a growth past its capacity reallocates it, so `locks` unlocks
/// its old allocation first (and forgets stale ranges the new one overlaps).
fn resize_locked(pool: &Mutex<OutSpare>, v: &mut Vec<f32>, len: usize) {
    if len <= v.capacity() {
        v.resize(len, 0.0);
        return;
    }
    let (s, l) = range_of(v);
    let mut spare = pool.lock();
    spare.locks.unlock(s, l);
    let stale = spare.locks.may_be_stale();
    drop(spare);
    v.resize(len, 0.0);
    if stale {
        let (s, l) = range_of(v);
        pool.lock().locks.drop_stale(s, l, false);
    }
}

impl OutputPool {
    /// An empty pool recording its locked ranges in `ranges`.
    pub fn with_registry(ranges: &'static LockedRanges) -> OutputPool {
        OutputPool {
            spare: Mutex::new(OutSpare {
                outputs: Vec::new(),
                locks: LockSet::new(ranges),
            }),
        }
    }

    /// Page-locks the output buffers this pool keeps with `lock` from now on (and those it
    /// holds now). The first lock installed stays.
    pub fn set_page_lock(&self, lock: Arc<dyn HostPageLock>) {
        let mut spare = self.spare.lock();
        if !spare.locks.set_lock(lock) {
            return;
        }
        let held = std::mem::take(&mut spare.outputs);
        for o in &held {
            spare.adopt(o);
        }
        spare.outputs = held;
    }

    /// Outputs of `fused_len` and `weights_len` elements: a recycled pair when one is spare
    /// (resized; a locked buffer stays locked unless it has to grow), fresh zeroed ones
    /// otherwise. Callers overwrite every element (the backend's `run` writes the whole
    /// `[rows, D]` and `[rows, M]`).
    pub fn outputs_for(&self, fused_len: usize, weights_len: usize) -> Outputs {
        let mut spare = self.spare.lock();
        let Some(mut o) = spare.outputs.pop() else {
            let stale = spare.locks.may_be_stale();
            drop(spare);
            let o = Outputs {
                fused: vec![0.0; fused_len],
                weights: vec![0.0; weights_len],
            };
            if stale {
                // New allocations: even a locked range that is exactly one of them was freed.
                let mut spare = self.spare.lock();
                for (s, l) in [range_of(&o.fused), range_of(&o.weights)] {
                    spare.locks.drop_stale(s, l, false);
                }
            }
            return o;
        };
        drop(spare);
        resize_locked(&self.spare, &mut o.fused, fused_len);
        resize_locked(&self.spare, &mut o.weights, weights_len);
        o
    }

    /// Zeroed outputs of `fused_len` and `weights_len` elements, page-locked now if the pool
    /// has a lock (each with room for at least [`MIN_LOCK_BYTES`]: for callers that will not
    /// wait for outputs to come back, the bench's pinned outputs). They stay locked until they
    /// come back and the pool drops them, or the pool drops.
    #[cfg_attr(not(feature = "tools"), allow(dead_code))]
    pub fn take_locked(&self, fused_len: usize, weights_len: usize) -> Outputs {
        let min = MIN_LOCK_BYTES / std::mem::size_of::<f32>();
        let zeroed = |len: usize| {
            let mut v = Vec::with_capacity(len.max(min));
            v.resize(len, 0.0);
            v
        };
        let o = Outputs {
            fused: zeroed(fused_len),
            weights: zeroed(weights_len),
        };
        let mut spare = self.spare.lock();
        for (s, l) in [range_of(&o.fused), range_of(&o.weights)] {
            spare.locks.drop_stale(s, l, false);
        }
        spare.adopt(&o);
        o
    }

    /// Keeps `o` for a later batch (page-locked if the pool has a lock); dropped, after
    /// unlocking it, when enough are spare already.
    pub fn recycle(&self, o: Outputs) {
        let mut spare = self.spare.lock();
        if spare.outputs.len() < SPARE_OUTPUTS {
            spare.adopt(&o);
            spare.outputs.push(o);
            return;
        }
        for (s, l) in [range_of(&o.fused), range_of(&o.weights)] {
            spare.locks.unlock(s, l);
        }
        drop(spare);
        drop(o);
    }

    /// Spare pairs held now.
    #[cfg(test)]
    pub fn spare(&self) -> usize {
        self.spare.lock().outputs.len()
    }

    /// Ranges this pool holds locked now.
    #[cfg(test)]
    pub fn locked(&self) -> usize {
        self.spare.lock().locks.len()
    }
}

impl Drop for OutputPool {
    /// Unlocks every range the pool locked (its spare buffers, freed next, and buffers it
    /// handed out, which stay usable as pageable memory).
    fn drop(&mut self) {
        self.spare.get_mut().locks.unlock_all();
    }
}

#[cfg(test)]
#[path = "out_pool_tests.rs"]
mod tests;
