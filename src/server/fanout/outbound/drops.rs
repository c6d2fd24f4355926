//! Drop accounting of a connection: every seq that is not delivered (queue full, or replaced
//! by conflation) goes into a `dropped` notice, at most every `drop_notice_interval`.

use std::time::Instant;

use tokio_tungstenite::tungstenite::Message;

use crate::protocol::notices;

use super::{Outbound, QueueState, BULK, CONTROL, MAX_DROP_RANGES};

impl Outbound {
    /// Records a dropped seq: class `c` when its queue had no room, None when conflated.
    pub(super) fn record_drop(&self, st: &mut QueueState, c: Option<usize>, seq: u64) {
        st.total_dropped += 1;
        let log = match c {
            Some(c) => {
                self.m.dropped[c].increment(1);
                &mut st.drops[c]
            }
            None => &mut st.conflated,
        };
        log.count += 1;
        match log.ranges.last_mut() {
            Some(r) if r.1 + 1 == seq => r.1 = seq,
            _ => log.ranges.push((seq, seq)),
        }
        let ranges = log.ranges.len();
        // Too many gaps to keep: report them now rather than grow without bound, while the
        // CONTROL queue has room (conflation of many keys to a slow peer makes a range per
        // replaced result; a stalled peer must not be closed for notices about it), and in any
        // case at the hard cap.
        let room = st.q[CONTROL].len() + 8 < self.cap(CONTROL);
        if ranges >= MAX_DROP_RANGES && (room || ranges >= MAX_DROP_RANGES * 16) {
            for n in self.take_drop_notices(st) {
                self.push_control_locked(st, n);
            }
        }
    }

    pub(super) fn take_drop_notices(&self, st: &mut QueueState) -> Vec<Message> {
        let total = st.total_dropped;
        let mut out = Vec::new();
        for c in 1..5 {
            let (log, class, reason) = match c {
                4 => (std::mem::take(&mut st.conflated), BULK, "conflated"),
                c => (std::mem::take(&mut st.drops[c]), c, "queue_full"),
            };
            if log.count > 0 {
                out.push(notices::dropped(
                    class,
                    reason,
                    log.count,
                    &log.ranges,
                    total,
                ));
            }
        }
        st.last_drop_notice = Some(Instant::now());
        out
    }
}
