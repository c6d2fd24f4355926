//! Resume with replay (docs/DESIGN.md section 5, docs/PROTOCOL.md section 7.4). Every result of a stream
//! gets a stream seq (1, 2, ... per stream) when it is fanned out; CRITICAL and IMPORTANT results
//! are kept in a bounded buffer per stream (`replay_messages`, `replay_age`, and
//! `replay_max_bytes` over all streams, oldest first), so that a subscriber that comes back with
//! its resume point gets what it missed, or an `unrecoverable` notice naming what the buffer no
//! longer holds. The server's random `epoch` tells a client that the seqs it holds are from a
//! server that is gone.
//!
//! One lock orders stream seqs, subscriptions and fan-out: a subscriber registered under it
//! gets every later result live and every earlier one (after its resume point) as a replay, so
//! replay and live meet without a gap or a duplicate.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Message;

use super::chunks::{ChunkPool, SharedFrame};
use super::outbound::{Body, Encoding, Live, Outbound};
use super::registry::Registry;
use super::stored::Stored;
use crate::engine::Priority;
use crate::protocol::{self, notices, ResultView};
use crate::server::config::ServerConfig;
use crate::server::metrics::ServerMetrics;

/// Bytes a forgotten entry still costs in the age-ordered index until it reaches its front.
const STALE: usize = std::mem::size_of::<(Arc<str>, u64, usize, Instant)>();

/// How often streams with nothing buffered, no subscriber and no result for `replay_age` are
/// forgotten.
const SWEEP: Duration = Duration::from_secs(1);

/// Where a subscriber resumes: the epoch its seqs are from, and the last stream seq it has of
/// each replayed class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resume {
    pub epoch: u64,
    pub critical: u64,
    pub important: u64,
}

/// What a subscribe found, for its `ack`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subscribed {
    pub epoch: u64,
    /// The stream's last stream seq: later results come live.
    pub last: u64,
    /// Results set aside for replay.
    pub replay: usize,
}

/// One result of a batch as its stream's subscribers take it: the version 2 encoding (kept
/// for replay when `keep`), and the version 1 one and JSON tail when a subscriber takes those.
struct Encoded {
    stream_seq: u64,
    stored: Option<Stored>,
    keep: bool,
    v1: Option<SharedFrame>,
    json: Option<String>,
}

/// Index of a replayed class (0 critical, 1 important).
fn rc(p: Priority) -> usize {
    usize::from(p != Priority::Critical)
}

const RC_NAMES: [&str; 2] = ["critical", "important"];

struct Log {
    /// The next stream seq.
    next: u64,
    buf: VecDeque<Stored>,
    /// Per replayed class, the highest stream seq no longer held (evicted, or from before this
    /// log was created).
    lost: [u64; 2],
    active: Instant,
}

impl Log {
    fn evict_front(&mut self) -> Option<Stored> {
        let e = self.buf.pop_front()?;
        let l = &mut self.lost[rc(e.priority)];
        *l = (*l).max(e.stream_seq);
        Some(e)
    }
}

struct Inner {
    logs: HashMap<Arc<str>, Log>,
    /// Every kept entry in the order kept (stream, stream seq, bytes, when): age and the byte
    /// cap evict from its front. Entries already evicted by their stream's count cap stay here
    /// (costing `STALE` bytes) until they reach the front.
    order: VecDeque<(Arc<str>, u64, usize, Instant)>,
    bytes: usize,
    /// The highest stream seq of any forgotten stream: a stream that comes back continues
    /// above it, so a seq never means two results within one epoch.
    floor: u64,
    last_sweep: Instant,
}

impl Inner {
    fn log(&mut self, stream: &Arc<str>, now: Instant) -> &mut Log {
        log_of(&mut self.logs, self.floor, stream, now)
    }
}

/// The log of `stream`, created (its seqs above `floor`) if it has none.
fn log_of<'a>(
    logs: &'a mut HashMap<Arc<str>, Log>,
    floor: u64,
    stream: &Arc<str>,
    now: Instant,
) -> &'a mut Log {
    logs.entry(Arc::clone(stream)).or_insert_with(|| Log {
        next: floor + 1,
        buf: VecDeque::new(),
        lost: [floor; 2],
        active: now,
    })
}

/// `r` with stream seq `stream_seq`, live.
fn at<'a>(r: &ResultView<'a>, stream_seq: u64) -> ResultView<'a> {
    ResultView {
        stream_seq,
        replayed: false,
        ..r.clone()
    }
}

/// A JSON result with its tail made once for every subscriber.
fn json_message(tail: &str, seq: u64) -> Body {
    Body::Message(Message::text(protocol::json_result(tail, seq)))
}

/// The replay buffers of every stream.
pub(crate) struct Replay {
    /// This server's epoch: random, below 2^53 (exact in any JSON parser), never 0.
    pub epoch: u64,
    messages: usize,
    age: Duration,
    max_bytes: usize,
    inner: Mutex<Inner>,
    chunks: ChunkPool, // what results are encoded into (DESIGN 5.7)
    m: Arc<ServerMetrics>,
}

impl Replay {
    pub fn new(cfg: &ServerConfig, m: Arc<ServerMetrics>) -> Replay {
        let epoch = (rand::random::<u64>() & ((1u64 << 53) - 1)).max(1);
        Replay {
            epoch,
            messages: cfg.replay_messages,
            age: cfg.replay_age,
            max_bytes: cfg.replay_max_bytes,
            inner: Mutex::new(Inner {
                logs: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                floor: 0,
                last_sweep: Instant::now(),
            }),
            chunks: ChunkPool::default(),
            m,
        }
    }

    /// Every stream with a log: (name, last stream seq given, results held), by name
    /// (`GET /status.json`).
    pub fn streams(&self) -> Vec<(Arc<str>, u64, usize)> {
        let g = self.inner.lock();
        let mut v: Vec<(Arc<str>, u64, usize)> = g
            .logs
            .iter()
            .map(|(k, l)| (Arc::clone(k), l.next.saturating_sub(1), l.buf.len()))
            .collect();
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether `stream` has a log (results buffered, a subscriber, or a result within
    /// `replay_age`): a gateway keeps following it on NATS while it has.
    pub fn knows(&self, stream: &str) -> bool {
        self.inner.lock().logs.contains_key(stream)
    }

    /// Fans one result out (tests; the server fans out whole batches, [`Self::deliver_stream`]).
    #[cfg(test)]
    pub fn deliver(&self, registry: &Registry, stream: &Arc<str>, r: &ResultView<'_>) {
        self.deliver_stream(registry, stream, std::slice::from_ref(r));
    }

    /// Fans out `results`, one batch's results of `stream` in batch order, as one unit
    /// (docs/DESIGN.md section 5.7): under one acquisition of the lock, they get the stream's next
    /// stream seqs (a range), each is encoded once per encoding its subscribers take (version 2
    /// binary also for the replay buffer, which keeps CRITICAL and IMPORTANT ones), and each
    /// subscriber's queues take them under one acquisition of its lock, holding references to
    /// the binary encodings, not copies; only JSON results are made per connection.
    pub fn deliver_stream(
        &self,
        registry: &Registry,
        stream: &Arc<str>,
        results: &[ResultView<'_>],
    ) {
        if results.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let log = log_of(&mut inner.logs, inner.floor, stream, now);
        let first = log.next;
        log.next += results.len() as u64;
        log.active = now;
        let subs = registry.subscribers(stream);
        let (mut v2, mut v1, mut json) = (false, false, false);
        for o in subs.iter().flat_map(|s| s.iter()) {
            match o.encoding() {
                Encoding::Binary(v) if v >= protocol::VERSION_2 => v2 = true,
                Encoding::Binary(_) => v1 = true,
                Encoding::Json => json = true,
            }
        }
        let keeps = |p: Priority| p != Priority::Bulk && self.messages > 0;
        let views: Vec<ResultView<'_>> =
            results.iter().zip(first..).map(|(r, s)| at(r, s)).collect();
        let mut stored =
            Stored::encode_runs(&self.chunks, stream, &views, |v| keeps(v.priority) || v2);
        let mut enc: Vec<Encoded> = Vec::with_capacity(results.len());
        for ((view, sseq), stored) in views.iter().zip(first..).zip(stored.drain(..)) {
            let keep = keeps(view.priority);
            if let (true, Some(e)) = (keep, &stored) {
                let size = e.bytes();
                log.buf.push_back(e.clone());
                inner.order.push_back((Arc::clone(stream), sseq, size, now));
                inner.bytes += size;
                if log.buf.len() > self.messages {
                    if let Some(old) = log.evict_front() {
                        // Its bytes are free now; its index slot costs STALE until it is popped.
                        inner.bytes = inner
                            .bytes
                            .saturating_sub(old.bytes().saturating_sub(STALE));
                        self.m.replay_evicted.increment(1);
                    }
                }
            }
            enc.push(Encoded {
                v1: v1
                    .then(|| SharedFrame::alone(protocol::encode_result(view, protocol::VERSION))),
                json: json.then(|| protocol::json_result_tail(view)),
                keep,
                stored,
                stream_seq: sseq,
            });
        }
        for o in subs.iter().flat_map(|s| s.iter()) {
            let encoding = o.encoding();
            let mut queues = o.pusher();
            for (r, e) in results.iter().zip(&enc) {
                let live = Live {
                    priority: r.priority,
                    stream,
                    key: r.key,
                    entry: e.stored.as_ref().filter(|_| e.keep),
                };
                let shared = match (encoding, &e.stored, &e.v1) {
                    (Encoding::Binary(v), Some(s), _) if v >= protocol::VERSION_2 => {
                        s.frame.clone()
                    }
                    (Encoding::Binary(v), _, Some(b)) if v < protocol::VERSION_2 => b.clone(),
                    // The encoding changed since it was read above (a second `hello`): made
                    // for this connection alone.
                    (Encoding::Binary(v), _, _) => {
                        SharedFrame::alone(protocol::encode_result(&at(r, e.stream_seq), v))
                    }
                    (Encoding::Json, _, _) => {
                        match &e.json {
                            Some(t) => queues.push(&live, |seq| json_message(t, seq)),
                            None => {
                                let t = protocol::json_result_tail(&at(r, e.stream_seq));
                                queues.push(&live, |seq| json_message(&t, seq))
                            }
                        };
                        continue;
                    }
                };
                let body = Body::Shared {
                    frame: shared,
                    replayed: false,
                };
                queues.push(&live, |_| body);
            }
        }
        self.evict(&mut g, now);
        if now.duration_since(g.last_sweep) >= SWEEP {
            self.sweep(&mut g, registry, now);
        }
        self.m.replay_bytes.set(g.bytes as f64);
    }

    /// Evicts by age and by the byte cap, oldest first.
    fn evict(&self, g: &mut Inner, now: Instant) {
        while let Some((_, _, _, at)) = g.order.front() {
            if now.duration_since(*at) <= self.age && g.bytes <= self.max_bytes {
                break;
            }
            let Some((stream, sseq, size, _)) = g.order.pop_front() else {
                break;
            };
            let log = g.logs.get_mut(&stream);
            let live = log.and_then(|l| {
                let front = l.buf.front().is_some_and(|e| e.stream_seq == sseq);
                if front {
                    l.evict_front()
                } else {
                    None
                }
            });
            let freed = if live.is_some() {
                self.m.replay_evicted.increment(1);
                size
            } else {
                STALE
            };
            g.bytes = g.bytes.saturating_sub(freed);
        }
    }

    /// Forgets streams with nothing buffered, no subscriber and no result for `replay_age`.
    fn sweep(&self, g: &mut Inner, registry: &Registry, now: Instant) {
        g.last_sweep = now;
        let age = self.age;
        let mut floor = g.floor;
        g.logs.retain(|s, l| {
            let keep = !l.buf.is_empty()
                || now.duration_since(l.active) < age
                || registry.subscribers(s).is_some();
            if !keep {
                floor = floor.max(l.next - 1);
            }
            keep
        });
        g.floor = floor;
    }

    /// Subscribes `out` to `stream`; with a resume point (and when not already subscribed),
    /// sets aside what it missed for replay. Queues, in this order, the `ack` made by `ack`,
    /// the `unrecoverable` notices, then the replayed results.
    pub fn subscribe(
        &self,
        registry: &Registry,
        stream: &Arc<str>,
        out: &Arc<Outbound>,
        resume: Option<Resume>,
        ack: impl FnOnce(Subscribed) -> Message,
    ) {
        let now = Instant::now();
        let mut g = self.inner.lock();
        let already = registry.is_subscribed(stream, out);
        registry.subscribe(stream, out);
        let log = g.log(stream, now);
        log.active = now;
        let last = log.next - 1;
        let mut notices = Vec::new();
        let mut replay = Vec::new();
        if let (Some(r), false) = (resume, already) {
            let mut after = [r.critical, r.important];
            if r.epoch != self.epoch {
                for (c, a) in after.iter().enumerate() {
                    notices.push(unrecoverable(stream, c, a + 1, None, "epoch"));
                }
                after = [0, 0];
            }
            for (c, (a, &lost)) in after.iter_mut().zip(&log.lost).enumerate() {
                if *a < lost {
                    notices.push(unrecoverable(stream, c, *a + 1, Some(lost), "evicted"));
                    *a = lost;
                }
            }
            replay = log
                .buf
                .iter()
                .filter(|e| e.stream_seq > after[rc(e.priority)])
                .cloned()
                .collect();
            let room = out.replay_room();
            if replay.len() > room {
                // More than this connection may hold aside: the oldest are announced instead.
                let cut: Vec<Stored> = replay.drain(..replay.len() - room).collect();
                for (c, a) in after.iter().enumerate() {
                    if let Some(e) = cut.iter().rev().find(|e| rc(e.priority) == c) {
                        let lost = Some(e.stream_seq);
                        notices.push(unrecoverable(stream, c, a + 1, lost, "no_room"));
                    }
                }
            }
        }
        out.push_control(ack(Subscribed {
            epoch: self.epoch,
            last,
            replay: replay.len(),
        }));
        self.m.unrecoverable.increment(notices.len() as u64);
        for n in notices {
            out.push_control(n);
        }
        out.queue_replay(stream, replay);
    }
}

/// An `unrecoverable` notice about replayed class `class` (0 critical, 1 important).
fn unrecoverable(
    stream: &str,
    class: usize,
    first: u64,
    last: Option<u64>,
    reason: &str,
) -> Message {
    notices::unrecoverable(stream, RC_NAMES[class], first, last, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(messages: usize) -> ServerConfig {
        ServerConfig {
            replay_messages: messages,
            ..ServerConfig::default()
        }
    }

    fn result<'a>(p: Priority, key: &'a str, v: &'a [f32]) -> ResultView<'a> {
        ResultView {
            stream: "s",
            key,
            priority: p,
            mask: &[1],
            fused: v,
            weights: &[1.0],
            stream_seq: 0,
            replayed: false,
        }
    }

    #[test]
    fn stream_seqs_and_the_count_cap() {
        let m = Arc::new(ServerMetrics::new());
        let r = Replay::new(&cfg(2), m);
        let reg = Registry::default();
        let s: Arc<str> = Arc::from("s");
        let v = [0.5f32];
        for (i, p) in [Priority::Critical, Priority::Bulk, Priority::Important]
            .into_iter()
            .cycle()
            .take(6)
            .enumerate()
        {
            r.deliver(&reg, &s, &result(p, &format!("k{i}"), &v));
        }
        let g = r.inner.lock();
        let log = &g.logs[&s];
        assert_eq!(log.next, 7);
        let kept: Vec<u64> = log.buf.iter().map(|e| e.stream_seq).collect();
        assert_eq!(kept, vec![4, 6]);
        assert_eq!(log.lost, [1, 3]);
    }

    #[test]
    fn age_eviction_forgets_idle_streams_and_seqs_never_repeat() {
        let m = Arc::new(ServerMetrics::new());
        let r = Replay::new(&cfg(100), m);
        let reg = Registry::default();
        let s: Arc<str> = Arc::from("s");
        let v = [0.5f32];
        for i in 0..3 {
            r.deliver(&reg, &s, &result(Priority::Critical, &format!("k{i}"), &v));
        }
        let later = Instant::now() + Duration::from_secs(60);
        {
            let mut g = r.inner.lock();
            r.evict(&mut g, later);
            assert!(g.logs[&s].buf.is_empty());
            assert_eq!(g.logs[&s].lost, [3, 0]);
            assert_eq!(g.bytes, 0);
            r.sweep(&mut g, &reg, later);
            assert!(g.logs.is_empty());
            assert_eq!(g.floor, 3);
        }
        // The stream comes back: its seqs continue above the watermark.
        r.deliver(&reg, &s, &result(Priority::Important, "k3", &v));
        let g = r.inner.lock();
        let log = &g.logs[&s];
        assert_eq!((log.next, log.lost), (5, [3, 3]));
        assert_eq!(log.buf.front().map(|e| e.stream_seq), Some(4));
    }
}
