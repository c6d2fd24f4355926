//! Queuing a result into a connection's class queue (docs/DESIGN.md sections 5.2, 5.3;
//! docs/PROTOCOL.md 7.1, 7.2, 7.5): the seq, the drop and backpressure rules, BULK
//! conflation. The fan-out queues a batch's results of one stream under one lock acquisition
//! per connection ([`Pusher`]); what a queued item holds is a [`Body`] (body.rs).

use std::sync::Arc;

use parking_lot::MutexGuard;
#[cfg(test)]
use tokio_tungstenite::tungstenite::Message;

use super::body::Body;
use super::{class_of, Conflate, Item, Live, Outbound, QueueState, Tag, BULK};
use crate::engine::Priority;
use crate::protocol::notices;

/// A connection's queues held for a run of pushes (the results of one batch and stream, in
/// order); the writer is woken once, when it is dropped.
pub(crate) struct Pusher<'a> {
    out: &'a Outbound,
    st: Option<MutexGuard<'a, QueueState>>,
}

impl Pusher<'_> {
    /// As [`Outbound::push_result`], under the lock already held.
    pub fn push(&mut self, r: &Live<'_>, build: impl FnOnce(u64) -> Body) -> bool {
        match self.st.as_mut() {
            Some(st) => self.out.push_locked(st, r, build),
            None => false,
        }
    }
}

impl Drop for Pusher<'_> {
    fn drop(&mut self) {
        drop(self.st.take());
        self.out.wake.notify_one();
    }
}

impl Outbound {
    /// Holds this connection's queues for a run of [`Pusher::push`]es.
    pub fn pusher(&self) -> Pusher<'_> {
        Pusher {
            out: self,
            st: Some(self.state.lock()),
        }
    }

    /// Queues a result, built by `build(seq)` once a seq is assigned. Applies the docs/DESIGN.md
    /// section 5 rules (docs/PROTOCOL.md 7.2): fill = the larger of the data queues' fill and
    /// the fill of the result's class queue; BULK dropped above 90% fill, IMPORTANT dropped when
    /// its queue is full, CRITICAL that does not fit closes with 1013. A BULK result of a
    /// conflated stream first replaces a queued one of the same key (or stream); a CRITICAL or
    /// IMPORTANT one of a stream still replaying waits behind the replay. Returns false when
    /// the result was dropped or the connection is closing. (The fan-out pushes through a
    /// [`Pusher`], the same rules.)
    #[cfg(test)]
    pub fn push_result(&self, r: &Live<'_>, build: impl FnOnce(u64) -> Message) -> bool {
        self.pusher().push(r, |seq| Body::Message(build(seq)))
    }

    fn push_locked(
        &self,
        st: &mut QueueState,
        r: &Live<'_>,
        build: impl FnOnce(u64) -> Body,
    ) -> bool {
        let p = r.priority;
        let c = class_of(p);
        if st.fatal.is_some() || st.stop {
            return false;
        }
        let mut no_room = false;
        let behind = st.replaying.contains_key(&**r.stream);
        if let (Some(e), true) = (r.entry, behind) {
            if st.pending.len() < self.pending_cap() {
                if let Some(n) = st.replaying.get_mut(&**r.stream) {
                    *n += 1;
                }
                st.pending.push_back((e.clone(), false));
                self.refill(st);
                return true;
            }
            // Behind a replay that does not fit: as if its queue were full.
            no_room = true;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let tag = match p {
            Priority::Bulk => self.conflate_bulk(st, r),
            _ => None,
        };
        let total = Self::data_len(st);
        let own = st.q[c].len();
        let own_full = no_room || own >= self.cap(c);
        let dropped = match p {
            Priority::Bulk => {
                own_full || total * 10 > self.data_cap() * 9 || own * 10 > self.cap(c) * 9
            }
            Priority::Important => own_full,
            Priority::Critical => {
                if own_full {
                    self.m.slow_consumer("critical_queue_full");
                    st.fatal = Some((1013, "critical_queue_full"));
                    return false;
                }
                false
            }
        };
        if dropped {
            self.record_drop(st, Some(c), seq);
            return false;
        }
        self.push_item(
            st,
            Item {
                msg: build(seq),
                seq,
                class: c,
                tag,
            },
        );
        self.check_backpressure(st, c);
        true
    }

    /// A BULK result of a conflated stream (PROTOCOL 7.5) replaces the queued one of the same
    /// key (or stream), which is recorded as dropped; returns the tag the new one carries.
    fn conflate_bulk(&self, st: &mut QueueState, r: &Live<'_>) -> Option<Tag> {
        let mode = st.conflate.get(&**r.stream).copied()?;
        let t = Tag {
            stream: Arc::clone(r.stream),
            key: (mode == Conflate::Key).then(|| r.key.into()),
        };
        if let Some(i) = st.q[BULK]
            .iter()
            .rposition(|it| it.tag.as_ref() == Some(&t))
        {
            if let Some(old) = st.q[BULK].remove(i) {
                self.depth_changed(st, BULK, -1);
                self.m.conflated.increment(1);
                self.record_drop(st, None, old.seq);
            }
        }
        Some(t)
    }

    /// BACKPRESSURE on when the fill (the larger of the data queues' fill and class `c`'s
    /// queue fill) went above 70%.
    pub(super) fn check_backpressure(&self, st: &mut QueueState, c: usize) {
        if st.backpressure {
            return;
        }
        let total = Self::data_len(st);
        let own = st.q[c].len();
        if total * 10 > self.data_cap() * 7 || own * 10 > self.cap(c) * 7 {
            st.backpressure = true;
            self.m.backpressure.increment(1);
            let n = notices::backpressure(true, total, self.data_cap(), c, own, self.cap(c));
            self.push_control_locked(st, n);
        }
    }
}
