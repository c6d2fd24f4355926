//! One connection's outbound side (SPEC section 5): a bounded queue per class (CONTROL,
//! CRITICAL, IMPORTANT, BULK), the drop / backpressure rules, per-connection sequence numbers,
//! and drop accounting. Producers of messages (fan-out, the pipeline, the reader) only ever
//! *try-push* here under a short lock, so a slow peer never delays anyone else; the connection's
//! one writer task (`writer.rs`) drains the queues in strict priority order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::config::QueueConfig;
use super::metrics::ServerMetrics;
use crate::engine::Priority;

/// Queue index of CONTROL messages; data classes follow as `1 + Priority as usize`.
pub(crate) const CONTROL: usize = 0;

/// The queue index of a data class.
pub(crate) fn class_of(p: Priority) -> usize {
    1 + p as usize
}

/// Ranges of dropped seqs kept before a notice is forced out.
const MAX_DROP_RANGES: usize = 256;

/// A queued message; `seq` is 0 for CONTROL messages.
#[derive(Debug)]
pub(crate) struct Item {
    pub msg: Message,
    pub seq: u64,
    pub class: usize,
}

/// What the writer should do next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Send this.
    Send(Item),
    /// Close with this code and reason prefix (the writer appends `last_seq=N`), then stop.
    Close(u16, &'static str),
    /// Nothing to send; wake up at the latest at this instant (drop notice due), if any.
    Idle(Option<Instant>),
    /// The reader is gone and the queues are empty (or the peer closed): stop.
    Stop,
}

#[derive(Debug, Default)]
struct DropLog {
    count: u64,
    ranges: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct State {
    q: [VecDeque<Item>; 4],
    next_seq: u64,
    backpressure: bool,
    drops: [DropLog; 4],
    total_dropped: u64,
    last_drop_notice: Option<Instant>,
    /// 1013 (or 1009, 1002, 1011): close at once, whatever is queued.
    fatal: Option<(u16, &'static str)>,
    /// Close after the queues drained (1001 on shutdown, 1000 normally).
    close_after_drain: Option<(u16, &'static str)>,
    /// The peer is gone (or closed): stop without a close frame of ours.
    stop: bool,
}

/// The outbound side of one connection.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Connection id (logs).
    pub id: u64,
    caps: [usize; 4],
    data_cap: usize,
    drop_interval: Duration,
    state: Mutex<State>,
    wake: Notify,
    done: AtomicBool,
    done_notify: Notify,
    /// Produce messages of this connection not yet through the aligner (each may cause one
    /// CONTROL reply), and the wake-up of a reader waiting for CONTROL room.
    inflight: AtomicUsize,
    room: Notify,
    binary: AtomicBool,
    m: Arc<ServerMetrics>,
}

impl Outbound {
    pub fn new(id: u64, q: &QueueConfig, drop_interval: Duration, m: Arc<ServerMetrics>) -> Self {
        Outbound {
            id,
            caps: [q.control, q.critical, q.important, q.bulk],
            data_cap: q.data(),
            drop_interval,
            state: Mutex::new(State {
                q: Default::default(),
                next_seq: 1,
                backpressure: false,
                drops: Default::default(),
                total_dropped: 0,
                last_drop_notice: None,
                fatal: None,
                close_after_drain: None,
                stop: false,
            }),
            wake: Notify::new(),
            done: AtomicBool::new(false),
            done_notify: Notify::new(),
            inflight: AtomicUsize::new(0),
            room: Notify::new(),
            binary: AtomicBool::new(false),
            m,
        }
    }

    /// Whether results go out as binary frames.
    pub fn binary(&self) -> bool {
        self.binary.load(Ordering::Relaxed)
    }

    /// Chooses the result encoding.
    pub fn set_binary(&self, b: bool) {
        self.binary.store(b, Ordering::Relaxed)
    }

    fn data_len(st: &State) -> usize {
        st.q[1].len() + st.q[2].len() + st.q[3].len()
    }

    fn push_item(&self, st: &mut State, item: Item) {
        self.m.queue_depth[item.class].increment(1.0);
        st.q[item.class].push_back(item);
    }

    /// Queues a CONTROL message. A full CONTROL queue closes the connection with 1013.
    pub fn push_control(&self, msg: Message) {
        let mut st = self.state.lock();
        self.push_control_locked(&mut st, msg);
        drop(st);
        self.wake.notify_one();
    }

    fn push_control_locked(&self, st: &mut State, msg: Message) {
        if st.fatal.is_some() || st.stop {
            return;
        }
        if st.q[CONTROL].len() >= self.caps[CONTROL] {
            self.m.slow_consumer("control_queue_full");
            st.fatal = Some((1013, "control_queue_full"));
            return;
        }
        self.push_item(
            st,
            Item {
                msg,
                seq: 0,
                class: CONTROL,
            },
        );
    }

    /// Queues a result of class `p`, built by `build(seq)` once a seq is assigned. Applies the
    /// SPEC section 5 rules: BULK dropped above 90% fill or when its queue is full, IMPORTANT
    /// dropped when its queue is full, CRITICAL that does not fit closes with 1013. Returns
    /// false when the result was dropped or the connection is closing.
    pub fn push_result(&self, p: Priority, build: impl FnOnce(u64) -> Message) -> bool {
        let c = class_of(p);
        let mut st = self.state.lock();
        if st.fatal.is_some() || st.stop {
            return false;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let total = Self::data_len(&st);
        let own_full = st.q[c].len() >= self.caps[c];
        let dropped = match p {
            Priority::Bulk => own_full || total * 10 > self.data_cap * 9,
            Priority::Important => own_full,
            Priority::Critical => {
                if own_full {
                    self.m.slow_consumer("critical_queue_full");
                    st.fatal = Some((1013, "critical_queue_full"));
                    drop(st);
                    self.wake.notify_one();
                    return false;
                }
                false
            }
        };
        if dropped {
            self.record_drop(&mut st, c, seq);
            drop(st);
            self.wake.notify_one();
            return false;
        }
        self.push_item(
            &mut st,
            Item {
                msg: build(seq),
                seq,
                class: c,
            },
        );
        if !st.backpressure && (total + 1) * 10 > self.data_cap * 7 {
            st.backpressure = true;
            self.m.backpressure.increment(1);
            let n = notice_backpressure(true, total + 1, self.data_cap);
            self.push_control_locked(&mut st, n);
        }
        drop(st);
        self.wake.notify_one();
        true
    }

    fn record_drop(&self, st: &mut State, c: usize, seq: u64) {
        self.m.dropped[c].increment(1);
        st.total_dropped += 1;
        let log = &mut st.drops[c];
        log.count += 1;
        match log.ranges.last_mut() {
            Some(r) if r.1 + 1 == seq => r.1 = seq,
            _ => log.ranges.push((seq, seq)),
        }
        if log.ranges.len() >= MAX_DROP_RANGES {
            // Too many gaps to keep: report them now rather than grow without bound.
            for n in self.take_drop_notices(st) {
                self.push_control_locked(st, n);
            }
        }
    }

    fn take_drop_notices(&self, st: &mut State) -> Vec<Message> {
        let total = st.total_dropped;
        let mut out = Vec::new();
        for c in 1..4 {
            let log = std::mem::take(&mut st.drops[c]);
            if log.count > 0 {
                let v = serde_json::json!({
                    "type": "notice", "kind": "dropped",
                    "class": super::metrics::CLASS_NAMES[c],
                    "count": log.count, "ranges": log.ranges, "total": total,
                });
                out.push(Message::text(v.to_string()));
            }
        }
        st.last_drop_notice = Some(Instant::now());
        out
    }

    /// The writer's next step, in strict priority order.
    pub fn next(&self) -> Next {
        let mut st = self.state.lock();
        if let Some((code, why)) = st.fatal {
            return Next::Close(code, why);
        }
        if st.stop {
            return Next::Stop;
        }
        let pending = st.drops.iter().any(|d| d.count > 0);
        let mut due = None;
        if pending {
            let now = Instant::now();
            let at = st
                .last_drop_notice
                .map(|t| t + self.drop_interval)
                .unwrap_or(now);
            if at <= now {
                for n in self.take_drop_notices(&mut st) {
                    // Past the CONTROL cap only by the (at most 3) drop notices: they must not
                    // be lost, and they are bounded by the number of classes.
                    self.push_item(
                        &mut st,
                        Item {
                            msg: n,
                            seq: 0,
                            class: CONTROL,
                        },
                    );
                }
            } else {
                due = Some(at);
            }
        }
        for c in 0..4 {
            if let Some(item) = st.q[c].pop_front() {
                self.m.queue_depth[c].decrement(1.0);
                if c == CONTROL {
                    self.room.notify_one();
                }
                if c != CONTROL && st.backpressure && Self::data_len(&st) * 2 <= self.data_cap {
                    st.backpressure = false;
                    let n = notice_backpressure(false, Self::data_len(&st), self.data_cap);
                    self.push_item(
                        &mut st,
                        Item {
                            msg: n,
                            seq: 0,
                            class: CONTROL,
                        },
                    );
                }
                return Next::Send(item);
            }
        }
        if let Some((code, why)) = st.close_after_drain {
            if !pending {
                return Next::Close(code, why);
            }
        }
        Next::Idle(due)
    }

    /// Closes with `code` once everything queued has been sent.
    pub fn close_after_drain(&self, code: u16, why: &'static str) {
        self.state
            .lock()
            .close_after_drain
            .get_or_insert((code, why));
        self.wake.notify_one();
    }

    /// The peer is gone: the writer stops without sending more.
    pub fn stop(&self) {
        self.state.lock().stop = true;
        self.wake.notify_one();
    }

    /// Waits until something is queued or the state changed.
    pub async fn wait(&self) {
        self.wake.notified().await
    }

    /// Reader-side flow control: waits until the CONTROL queue has room for the replies that
    /// this connection's outstanding requests may still cause (so replies never overflow it),
    /// or the connection is closing. A peer that does not read its replies stops being read.
    pub async fn reserve_room(&self) {
        loop {
            let n = self.room.notified();
            {
                let st = self.state.lock();
                let used = st.q[CONTROL].len() + self.inflight.load(Ordering::Acquire);
                // 4 slots stay free for backpressure and drop notices.
                if used + 4 < self.caps[CONTROL] || st.fatal.is_some() || st.stop {
                    return;
                }
            }
            n.await;
        }
    }

    /// A produce message of this connection entered the pipeline.
    pub fn begin_request(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
    }

    /// The pipeline is done with a produce message of this connection.
    pub fn end_request(&self) {
        let _ = self
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        self.room.notify_one();
    }

    /// Frees the queue depth gauges of what is still queued (the connection is gone).
    pub fn finish(&self) {
        let mut st = self.state.lock();
        for c in 0..4 {
            let n = st.q[c].len();
            self.m.queue_depth[c].decrement(n as f64);
            st.q[c].clear();
        }
        st.stop = true;
        drop(st);
        self.done.store(true, Ordering::Release);
        self.done_notify.notify_waiters();
        self.room.notify_one();
    }

    /// Resolves once the writer finished.
    pub async fn done(&self) {
        loop {
            // Created before the check: `notify_waiters` reaches a `Notified` from its creation.
            let n = self.done_notify.notified();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }

    /// Data messages queued, and the data capacity.
    #[cfg(test)]
    pub fn fill(&self) -> (usize, usize) {
        (Self::data_len(&self.state.lock()), self.data_cap)
    }
}

fn notice_backpressure(on: bool, queued: usize, capacity: usize) -> Message {
    let v = serde_json::json!({
        "type": "notice", "kind": "backpressure",
        "state": if on { "on" } else { "off" }, "queued": queued, "capacity": capacity,
    });
    Message::text(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ob(crit: usize, imp: usize, bulk: usize) -> Outbound {
        let q = QueueConfig {
            critical: crit,
            important: imp,
            bulk,
            control: 10,
        };
        Outbound::new(1, &q, Duration::ZERO, Arc::new(ServerMetrics::new()))
    }

    fn data(n: u64) -> Message {
        Message::binary(n.to_le_bytes().to_vec())
    }

    #[test]
    fn strict_priority_and_drop_rules() {
        let o = ob(2, 3, 5);
        // 10 data slots: BULK dropped once fill > 90% or its own queue (5) is full.
        for _ in 0..6 {
            o.push_result(Priority::Bulk, data);
        }
        assert_eq!(o.fill().0, 5); // the 6th bulk was dropped (own queue full)
        for _ in 0..4 {
            o.push_result(Priority::Important, data);
        }
        assert_eq!(o.fill().0, 8); // the 4th important dropped (own queue full)
        assert!(o.push_result(Priority::Critical, data));
        assert!(o.push_result(Priority::Critical, data));
        assert!(!o.push_result(Priority::Bulk, data)); // fill 100% > 90%
        let mut order = Vec::new();
        let mut notices = Vec::new();
        loop {
            match o.next() {
                Next::Send(it) if it.class == CONTROL => notices.push(it.msg.to_string()),
                Next::Send(it) => order.push((it.class, it.seq)),
                _ => break,
            }
        }
        let classes: Vec<usize> = order.iter().map(|x| x.0).collect();
        assert_eq!(classes, vec![1, 1, 2, 2, 2, 3, 3, 3, 3, 3]);
        assert!(notices
            .iter()
            .any(|n| n.contains("\"backpressure\"") && n.contains("\"on\"")));
        let dropped: Vec<&String> = notices.iter().filter(|n| n.contains("dropped")).collect();
        assert_eq!(dropped.len(), 2, "{notices:?}");
        assert!(notices.iter().any(|n| n.contains("[[6,6],[13,13]]")));
        assert!(notices.iter().any(|n| n.contains("[[10,10]]")));
        // A third CRITICAL does not fit: close 1013.
        let o = ob(2, 3, 5);
        o.push_result(Priority::Critical, data);
        o.push_result(Priority::Critical, data);
        assert!(!o.push_result(Priority::Critical, data));
        assert!(matches!(o.next(), Next::Close(1013, "critical_queue_full")));
    }
}
