//! One connection's outbound side (docs/DESIGN.md section 5): a bounded queue per class (CONTROL,
//! CRITICAL, IMPORTANT, BULK), the drop / backpressure rules, per-connection sequence numbers,
//! drop accounting, BULK conflation, and the results waiting to be replayed after a resume
//! (they enter the class queues as those have room, live results of the stream behind them).
//! Producers of messages (fan-out, the pipeline, the reader) only ever *try-push* here under a
//! short lock (`push.rs`; the fan-out pushes a batch's results of a stream under one), so a
//! slow peer never delays anyone else; the connection's one writer task (`writer.rs`) drains
//! the queues in strict priority order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::stored::Stored;
use crate::engine::Priority;
use crate::protocol::notices;
use crate::server::config::QueueConfig;
use crate::server::metrics::ServerMetrics;

mod body;
mod drops;
mod push;
mod resume;

pub(crate) use body::Body;

/// Queue index of CONTROL messages; data classes follow as `1 + Priority as usize`.
pub(crate) const CONTROL: usize = 0;

/// The queue index of a data class.
pub(crate) fn class_of(p: Priority) -> usize {
    1 + p as usize
}

/// Ranges of dropped seqs (per log) kept before a notice is forced out while the CONTROL queue
/// has room; 16 times that forces it out anyway (drops.rs).
const MAX_DROP_RANGES: usize = 256;
/// A connection's unpublished change of a queue's length at most ([`Outbound::depth_changed`]).
const DEPTH_STEP: u64 = 64;

/// Queue index of BULK results.
const BULK: usize = 3;

/// A queued message; `seq` is 0 for CONTROL messages.
#[derive(Debug)]
pub(crate) struct Item {
    pub msg: Body,
    pub seq: u64,
    pub class: usize,
    /// What a newer BULK result replaces this one by (conflated streams only).
    tag: Option<Tag>,
}

impl Item {
    fn control(msg: Message) -> Item {
        Item {
            msg: Body::Message(msg),
            seq: 0,
            class: CONTROL,
            tag: None,
        }
    }
}

/// Conflation of a stream's BULK results in one connection's queue (docs/PROTOCOL.md 7.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Conflate {
    /// A newer result replaces a queued one of the same key.
    Key,
    /// A newer result replaces any queued one of the stream.
    Stream,
}

#[derive(Debug, PartialEq, Eq)]
struct Tag {
    stream: Arc<str>,
    /// None when the whole stream is conflated.
    key: Option<Box<str>>,
}

/// A live result to queue: its class, stream and key, and (CRITICAL, IMPORTANT) its entry in
/// the replay buffer.
pub(crate) struct Live<'a> {
    pub priority: Priority,
    pub stream: &'a Arc<str>,
    pub key: &'a str,
    pub entry: Option<&'a Stored>,
}

/// How results are encoded for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Json,
    /// Binary frames of this protocol version.
    Binary(u8),
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

/// A connection's queues and their accounting, all under the one lock of [`Outbound`].
#[derive(Debug)]
struct QueueState {
    q: [VecDeque<Item>; 4],
    next_seq: u64,
    backpressure: bool,
    drops: [DropLog; 4],
    /// BULK results replaced by a newer one (conflation), reported like drops.
    conflated: DropLog,
    total_dropped: u64,
    /// Results waiting for room in their class queue after a resume (`true`: a replay; `false`:
    /// a live result of a stream still replaying), and how many each stream has there.
    pending: VecDeque<(Stored, bool)>,
    replaying: HashMap<Arc<str>, usize>,
    conflate: HashMap<Arc<str>, Conflate>,
    last_drop_notice: Option<Instant>,
    /// 1013 (or 1009, 1002, 1011): close at once, whatever is queued.
    fatal: Option<(u16, &'static str)>,
    /// Close after the queues drained (1001 on shutdown, 1000 normally).
    close_after_drain: Option<(u16, &'static str)>,
    /// The peer is gone (or closed): stop without a close frame of ours.
    stop: bool,
    /// Per class, the change of the queue's length not yet added to the `queue_depth` gauge
    /// ([`Outbound::depth_changed`]).
    depth_unpublished: [i64; 4],
}

/// The outbound side of one connection.
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Connection id (logs).
    pub id: u64,
    /// Capacity per class (CONTROL, CRITICAL, IMPORTANT, BULK); the data classes can be set
    /// by the connection's `hello` ([`Outbound::set_send_queue`]).
    caps: [AtomicUsize; 4],
    /// Results the replay of a resume may hold back, besides the queues.
    replay_messages: usize,
    drop_interval: Duration,
    state: Mutex<QueueState>,
    wake: Notify,
    done: AtomicBool,
    done_notify: Notify,
    /// Produce messages of this connection not yet through the aligner (each may cause one
    /// CONTROL reply), and the wake-up of a reader waiting for CONTROL room.
    inflight: AtomicUsize,
    room: Notify,
    /// 0 JSON, else the binary protocol version.
    encoding: AtomicU8,
    /// Binary results may go several to a frame (PROTOCOL 4.5).
    batch: AtomicBool,
    m: Arc<ServerMetrics>,
}

impl Outbound {
    /// `replay_messages`: results a resume may set aside for this connection (plus the live
    /// results of the CRITICAL and IMPORTANT queues' size that may wait behind them).
    pub fn new(
        id: u64,
        q: &QueueConfig,
        drop_interval: Duration,
        replay_messages: usize,
        m: Arc<ServerMetrics>,
    ) -> Self {
        Outbound {
            id,
            caps: [q.control, q.critical, q.important, q.bulk].map(AtomicUsize::new),
            replay_messages,
            drop_interval,
            state: Mutex::new(QueueState {
                q: Default::default(),
                next_seq: 1,
                backpressure: false,
                drops: Default::default(),
                conflated: DropLog::default(),
                total_dropped: 0,
                pending: VecDeque::new(),
                replaying: HashMap::new(),
                conflate: HashMap::new(),
                last_drop_notice: None,
                fatal: None,
                close_after_drain: None,
                stop: false,
                depth_unpublished: [0; 4],
            }),
            wake: Notify::new(),
            done: AtomicBool::new(false),
            done_notify: Notify::new(),
            inflight: AtomicUsize::new(0),
            room: Notify::new(),
            encoding: AtomicU8::new(0),
            batch: AtomicBool::new(false),
            m,
        }
    }

    /// Capacity of class `c`'s queue.
    pub(crate) fn cap(&self, c: usize) -> usize {
        self.caps.get(c).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// The data classes' capacities together.
    pub(crate) fn data_cap(&self) -> usize {
        (1..4).map(|c| self.cap(c)).sum()
    }

    /// Results a resume's replay may hold back while live ones queue.
    pub(crate) fn pending_cap(&self) -> usize {
        self.replay_messages + self.cap(1) + self.cap(2)
    }

    /// Sets the CRITICAL, IMPORTANT and BULK queue capacities (the connection's `hello`,
    /// PROTOCOL 2); a queue holding more than its new capacity keeps what it holds and takes
    /// nothing more until it is below it.
    pub fn set_send_queue(&self, caps: [usize; 3]) {
        for (a, n) in self.caps[1..].iter().zip(caps) {
            a.store(n.max(1), Ordering::Relaxed);
        }
    }

    /// The CRITICAL, IMPORTANT and BULK queue capacities in force.
    pub fn send_queue(&self) -> [usize; 3] {
        [self.cap(1), self.cap(2), self.cap(3)]
    }

    fn data_len(st: &QueueState) -> usize {
        st.q[1].len() + st.q[2].len() + st.q[3].len()
    }

    fn push_item(&self, st: &mut QueueState, item: Item) {
        let c = item.class;
        st.q[c].push_back(item);
        self.depth_changed(st, c, 1);
    }

    /// Class `c`'s queue grew (or shrank) by `d`. The `queue_depth` gauge, shared by every
    /// connection, moves in steps of up to [`DEPTH_STEP`] per connection and class, and
    /// whenever the queue is empty, so it is exact whenever the queues are idle: two atomic
    /// read-modify-writes per queued message on one cache line for all connections were ~2%
    /// of the server's CPU with 4 subscribers.
    fn depth_changed(&self, st: &mut QueueState, c: usize, d: i64) {
        let u = &mut st.depth_unpublished[c];
        *u += d;
        if u.unsigned_abs() >= DEPTH_STEP || st.q[c].is_empty() {
            let g = &self.m.queue_depth[c];
            match (*u).cmp(&0) {
                std::cmp::Ordering::Greater => g.increment(*u as f64),
                std::cmp::Ordering::Less => g.decrement(u.unsigned_abs() as f64),
                std::cmp::Ordering::Equal => {}
            }
            *u = 0;
        }
    }

    /// Queues a CONTROL message. A full CONTROL queue closes the connection with 1013.
    pub fn push_control(&self, msg: Message) {
        let mut st = self.state.lock();
        self.push_control_locked(&mut st, msg);
        drop(st);
        self.wake.notify_one();
    }

    fn push_control_locked(&self, st: &mut QueueState, msg: Message) {
        if st.fatal.is_some() || st.stop {
            return;
        }
        if st.q[CONTROL].len() >= self.cap(CONTROL) {
            self.m.slow_consumer("control_queue_full");
            st.fatal = Some((1013, "control_queue_full"));
            return;
        }
        self.push_item(st, Item::control(msg));
    }

    /// BACKPRESSURE off once the data queues and every class queue are at most half full.
    fn backpressure_off(&self, st: &QueueState) -> bool {
        st.backpressure
            && Self::data_len(st) * 2 <= self.data_cap()
            && (1..4).all(|c| st.q[c].len() * 2 <= self.cap(c))
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
        self.refill(&mut st);
        let pending = st.drops.iter().any(|d| d.count > 0) || st.conflated.count > 0;
        let mut due = None;
        if pending {
            let now = Instant::now();
            let at = st
                .last_drop_notice
                .map(|t| t + self.drop_interval)
                .unwrap_or(now);
            if at <= now {
                for n in self.take_drop_notices(&mut st) {
                    // Past the CONTROL cap only by the (at most 4) drop notices: they must not
                    // be lost, and they are bounded by the number of classes.
                    self.push_item(&mut st, Item::control(n));
                }
            } else {
                due = Some(at);
            }
        }
        for c in 0..4 {
            if let Some(item) = st.q[c].pop_front() {
                self.depth_changed(&mut st, c, -1);
                if c == CONTROL {
                    self.room.notify_one();
                }
                if c != CONTROL && self.backpressure_off(&st) {
                    st.backpressure = false;
                    let n = notices::backpressure(
                        false,
                        Self::data_len(&st),
                        self.data_cap(),
                        c,
                        st.q[c].len(),
                        self.cap(c),
                    );
                    self.push_item(&mut st, Item::control(n));
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

    /// The writer sends nothing more but a close with `code` (the peer's close answered, RFC
    /// 6455 5.5.1, or the peer broke the protocol).
    pub fn close_now(&self, code: u16, why: &'static str) {
        self.state.lock().fatal.get_or_insert((code, why));
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
                if used + 4 < self.cap(CONTROL) || st.fatal.is_some() || st.stop {
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
            let n = st.q[c].len() as i64;
            st.q[c].clear();
            self.depth_changed(&mut st, c, -n);
        }
        st.pending.clear();
        st.replaying.clear();
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
        (Self::data_len(&self.state.lock()), self.data_cap())
    }
}

#[cfg(test)]
mod tests;
