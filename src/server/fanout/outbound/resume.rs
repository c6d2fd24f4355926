//! The replay side of a connection's queues (docs/PROTOCOL.md 7.4) and BULK conflation (7.5):
//! results set aside by a resume enter their class queues as those have room, in stream seq
//! order, and live CRITICAL/IMPORTANT results of a stream still replaying wait behind them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use super::{class_of, Body, Conflate, Encoding, Item, Outbound, QueueState};
use crate::protocol::{self, ResultView, VERSION, VERSION_2};
use crate::server::fanout::chunks::SharedFrame;
use crate::server::fanout::stored::Stored;

impl Outbound {
    /// How results go out.
    pub fn encoding(&self) -> Encoding {
        match self.encoding.load(Ordering::Relaxed) {
            0 => Encoding::Json,
            v => Encoding::Binary(v),
        }
    }

    /// Chooses the result encoding (`version`: the session's protocol version).
    pub fn set_encoding(&self, binary: bool, version: u8) {
        let v = if !binary {
            0
        } else if version >= VERSION_2 {
            VERSION_2
        } else {
            VERSION
        };
        self.encoding.store(v, Ordering::Relaxed)
    }

    /// Whether binary results may go several to a `results` frame (PROTOCOL 4.5).
    pub fn batch_results(&self) -> bool {
        self.batch.load(Ordering::Relaxed)
    }

    /// Chooses whether binary results may go several to a frame (`hello`'s `batch_results`).
    pub fn set_batch_results(&self, batch: bool) {
        self.batch.store(batch, Ordering::Relaxed)
    }

    /// Sets (or, with `None`, clears) the conflation of `stream`'s BULK results.
    pub fn set_conflate(&self, stream: &Arc<str>, mode: Option<Conflate>) {
        let mut st = self.state.lock();
        match mode {
            Some(m) => st.conflate.insert(Arc::clone(stream), m),
            None => st.conflate.remove(stream),
        };
    }

    /// How many more results a resume may set aside for this connection.
    pub fn replay_room(&self) -> usize {
        self.pending_cap()
            .saturating_sub(self.state.lock().pending.len())
    }

    /// Sets `entries` (in stream seq order) aside for replay: they enter their class queues
    /// as those have room, before any later live result of `stream`.
    pub fn queue_replay(&self, stream: &Arc<str>, entries: Vec<Stored>) {
        if entries.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        if st.fatal.is_some() || st.stop {
            return;
        }
        *st.replaying.entry(Arc::clone(stream)).or_default() += entries.len();
        st.pending.extend(entries.into_iter().map(|e| (e, true)));
        self.refill(&mut st);
        drop(st);
        self.wake.notify_one();
    }

    /// Forgets the replay and conflation of a stream no longer subscribed.
    pub fn forget_stream(&self, stream: &str) {
        let mut st = self.state.lock();
        if st.replaying.remove(stream).is_some() {
            st.pending.retain(|(e, _)| &*e.stream != stream);
        }
        st.conflate.remove(stream);
    }

    /// Moves set-aside results into their class queues while those have room.
    pub(super) fn refill(&self, st: &mut QueueState) {
        while let Some((e, _)) = st.pending.front() {
            let c = class_of(e.priority);
            if st.q[c].len() >= self.cap(c) {
                break;
            }
            let Some((e, replayed)) = st.pending.pop_front() else {
                break;
            };
            if let Some(n) = st.replaying.get_mut(&*e.stream) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.replaying.remove(&*e.stream);
                }
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let Some(msg) = self.replay_body(&e, seq, replayed) else {
                // Not a result this server encoded (cannot happen): its seq is announced as
                // dropped, never lost silently (PROTOCOL 7.1).
                self.record_drop(st, Some(c), seq);
                continue;
            };
            if replayed {
                self.m.replayed.increment(1);
            }
            self.push_item(
                st,
                Item {
                    msg,
                    seq,
                    class: c,
                    tag: None,
                },
            );
            self.check_backpressure(st, c);
        }
    }

    /// A set-aside result in this connection's encoding now: version 2 binary shares the one
    /// encoding (the writer writes the seq and replayed flag in); version 1 and JSON are made
    /// for this connection from it.
    fn replay_body(&self, e: &Stored, seq: u64, replayed: bool) -> Option<Body> {
        Some(match self.encoding() {
            Encoding::Binary(v) if v >= VERSION_2 => Body::Shared {
                frame: e.frame.clone(),
                replayed,
            },
            Encoding::Binary(_) => Body::Shared {
                frame: SharedFrame::alone(protocol::result_v1_of_v2(&e.frame)?),
                replayed: false,
            },
            Encoding::Json => {
                let d = protocol::decode_result(&e.frame)?;
                let view = ResultView {
                    stream: &d.stream,
                    key: &d.key,
                    priority: d.priority,
                    mask: &d.mask,
                    fused: &d.fused,
                    weights: &d.weights,
                    stream_seq: d.stream_seq,
                    replayed,
                };
                let tail = protocol::json_result_tail(&view);
                Body::Message(Message::text(protocol::json_result(&tail, seq)))
            }
        })
    }
}
