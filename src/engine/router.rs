//! The router: which pending batches go to which device now.
//!
//! Batches are bound to a device late, when the device has room (fewer than `max_in_flight`
//! batches dispatched and not completed), so a device that fails or turns slow strands at most
//! that many. The choice is still least expected completion time over *all* candidates, full
//! or not: walking the pending queue in priority order, each batch is virtually placed on the
//! device minimising `(virtual load + batch rows) x per-sample latency average`, where the
//! virtual load starts at the device's outstanding samples and grows with every batch placed
//! on it. A batch whose best device has room is dispatched; one whose best device is full
//! waits (it would finish sooner there than anywhere else), but still counts toward that
//! device's virtual load, so under a deep backlog a slower device gets exactly the batches it
//! finishes sooner than the fast one would.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::job::Job;

/// One routable device, as the router sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    /// Device index in the engine.
    pub dev: usize,
    /// Batches it can still take now.
    pub free: usize,
    /// Samples dispatched to it and not completed.
    pub load: usize,
    /// Seconds per sample (moving average, or an optimistic initial estimate).
    pub per_sample: f64,
}

/// Upper bound on the pending entries looked at per routing pass (keeps a pass O(devices x
/// this) however deep the queue).
pub(crate) const SCAN_LIMIT: usize = 512;

/// Plans dispatches for `pending` (each entry: rows, devices to avoid), in queue order.
/// Returns `(pending position, candidate position)` pairs; `cands[..].free` and `.load` are
/// updated as if the dispatches happened.
pub(crate) fn plan(pending: &[(usize, &[usize])], cands: &mut [Candidate]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut virt: Vec<f64> = cands.iter().map(|c| c.load as f64).collect();
    for (pos, (rows, avoid)) in pending.iter().enumerate().take(SCAN_LIMIT) {
        if cands.iter().all(|c| c.free == 0) {
            break;
        }
        let allowed = |c: &Candidate| !avoid.contains(&c.dev);
        let any_allowed = cands.iter().any(allowed);
        let mut best: Option<(usize, f64)> = None;
        for (i, c) in cands.iter().enumerate() {
            if any_allowed && !allowed(c) {
                continue;
            }
            let ect = (virt[i] + *rows as f64) * c.per_sample;
            // Ties go to the device with room, then to the lower index.
            let better = match best {
                None => true,
                Some((b, bect)) => ect < bect || (ect == bect && c.free > 0 && cands[b].free == 0),
            };
            if better {
                best = Some((i, ect));
            }
        }
        let Some((i, _)) = best else { continue };
        virt[i] += *rows as f64;
        if cands[i].free > 0 {
            cands[i].free -= 1;
            cands[i].load += rows;
            out.push((pos, i));
        }
    }
    out
}

/// Anti-starvation share: at least one dispatch in `AGED_SHARE` goes to the oldest IMPORTANT or
/// BULK batch that has waited `priority_aging`, when there is one; the others follow strict
/// priority. Under sustained overload CRITICAL keeps at least 3/4 of the devices' dispatches
/// (pure aging would turn every queue into one FIFO once all batches are older than the
/// threshold, and CRITICAL would wait as long as BULK), and no batch waits forever.
pub(crate) const AGED_SHARE: u32 = 4;

/// The order the router looks at pending batches in (`(class, position)` pairs, at most
/// `SCAN_LIMIT`). Normally strict priority order (each class in submission order). With
/// `aged_first` (its turn in the [`AGED_SHARE`]), the IMPORTANT and BULK batches that have
/// waited at least `aging` come first, oldest first, then the rest in strict priority order.
/// Each class queue is in submission order (a retried batch goes back to the front), so its aged
/// batches are a prefix.
pub(crate) fn scan_order(
    pending: &[VecDeque<Job>; 3],
    now: Instant,
    aging: Duration,
    aged_first: bool,
) -> Vec<(usize, usize)> {
    let prefix: Vec<usize> = pending
        .iter()
        .enumerate()
        .map(|(c, q)| {
            if aged_first && c > 0 {
                q.iter().take_while(|j| j.aged(now, aging)).count()
            } else {
                0
            }
        })
        .collect();
    let mut old: Vec<(usize, usize)> = (1..3)
        .flat_map(|c| (0..prefix[c]).map(move |k| (c, k)))
        .collect();
    old.sort_by_key(|&(c, k)| pending[c][k].inner.submitted);
    old.truncate(SCAN_LIMIT);
    let rest = (0..3).flat_map(|c| (prefix[c]..pending[c].len()).map(move |k| (c, k)));
    let room = SCAN_LIMIT - old.len();
    old.extend(rest.take(room));
    old
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(dev: usize, free: usize, load: usize, per_sample: f64) -> Candidate {
        Candidate {
            dev,
            free,
            load,
            per_sample,
        }
    }

    #[test]
    fn least_expected_completion_time() {
        // Equal speed: alternate by load.
        let mut c = vec![cand(0, 4, 0, 1.0), cand(1, 4, 0, 1.0)];
        let p: Vec<(usize, &[usize])> = vec![(10, &[]); 4];
        let got = plan(&p, &mut c);
        assert_eq!(got, vec![(0, 0), (1, 1), (2, 0), (3, 1)]);
    }

    #[test]
    fn slow_device_waits_for_backlog_and_full_fast_device_holds_batches() {
        let none: &[usize] = &[];
        // Device 1 is 10x slower; the fast one is full with 4 batches.
        let mut c = vec![cand(0, 0, 40, 1.0), cand(1, 4, 0, 10.0)];
        let short: Vec<(usize, &[usize])> = vec![(10, none); 3];
        assert!(
            plan(&short, &mut c).is_empty(),
            "short backlog waits for the fast device"
        );
        let deep: Vec<(usize, &[usize])> = vec![(10, none); 30];
        let got = plan(&deep, &mut c);
        assert!(!got.is_empty() && got.len() < 4, "{got:?}");
        assert!(got.iter().all(|&(_, i)| i == 1));
    }

    #[test]
    fn avoid_list_is_respected_unless_nothing_else() {
        let avoid0: &[usize] = &[0];
        let mut c = vec![cand(0, 4, 0, 1.0), cand(1, 4, 100, 1.0)];
        assert_eq!(plan(&[(10, avoid0)], &mut c), vec![(0, 1)]);
        let mut c = vec![cand(0, 4, 0, 1.0)];
        assert_eq!(plan(&[(10, avoid0)], &mut c), vec![(0, 0)]);
    }
}
