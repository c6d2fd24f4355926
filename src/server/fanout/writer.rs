//! The one sender task of a connection: drains its [`Outbound`] queues in strict priority
//! order in bursts (one flush per burst), each burst under `send_timeout`, detects slow
//! consumers (5 bursts over 500 ms in a row), sends heartbeats, and closes with a reason naming
//! the last delivered seq.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{Sink, SinkExt};
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::outbound::{Body, Encoding, Item, Next, Outbound, CONTROL};
use crate::protocol::{self, notices};
use crate::server::metrics::ServerMetrics;

/// Writer settings (from the server config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterConfig {
    pub send_timeout: Duration,
    pub slow_send: Duration,
    pub slow_sends: u32,
    pub close_linger: Duration,
    pub heartbeat: Duration,
}

/// A close frame.
pub(crate) fn close_frame(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Runs until the connection closes; marks the outbound done on the way out.
pub(crate) async fn write_loop<S>(
    out: Arc<Outbound>,
    mut sink: S,
    cfg: WriterConfig,
    m: Arc<ServerMetrics>,
) where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let why = drain(&out, &mut sink, &cfg, &m).await;
    if let Some((code, reason)) = why {
        // A stuck peer gets `close_linger` to read its way to our close frame.
        let _ = timeout(cfg.close_linger, sink.send(close_frame(code, reason))).await;
    }
    let _ = timeout(Duration::from_millis(100), sink.close()).await;
    out.finish();
}

/// A burst ends after this many WebSocket messages (a `results` frame counts once, whatever
/// number of results it carries) ...
pub(crate) const BURST_MESSAGES: usize = 64;
/// ... or this many bytes (under the WebSocket write buffer, so a burst's frames are written by
/// its flush, one or a few syscalls, not one per message).
pub(crate) const BURST_BYTES: usize = 96 << 10;

/// Sends until a close is due; returns the close to send, if any.
///
/// Messages go out in bursts: up to [`BURST_MESSAGES`] messages or [`BURST_BYTES`], taken in
/// strict priority order, fed into the WebSocket's write buffer and flushed together. A burst is
/// one *send* of PROTOCOL section 7.3: it runs under `send_timeout`, and `slow_sends` bursts in a
/// row slower than `slow_send` close the connection (slow consumer). `last_seq` advances only
/// when a burst's flush succeeded, so a close reason never names a result still in our buffer.
async fn drain<S>(
    out: &Outbound,
    sink: &mut S,
    cfg: &WriterConfig,
    m: &ServerMetrics,
) -> Option<(u16, String)>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let mut w = Writer {
        out,
        cfg,
        m,
        last_seq: 0,
        slow_run: 0,
        framer: Framer::default(),
        next_heartbeat: Instant::now() + cfg.heartbeat,
    };
    loop {
        match out.next() {
            Next::Send(first) => match w.burst(sink, first).await {
                Ok(None) => {}
                Ok(Some(Next::Close(code, why))) => return w.close(code, why),
                Ok(Some(Next::Stop)) | Err(None) => return None,
                Ok(Some(_)) => {}
                Err(Some(close)) => return Some(close),
            },
            Next::Close(code, why) => return w.close(code, why),
            Next::Stop => return None,
            Next::Idle(due) => w.idle(due).await,
        }
    }
}

/// Turns a burst's queued items into the WebSocket messages to feed: a message per item, or,
/// with `batch_results` (PROTOCOL 4.5), a `results` frame per run of binary results. A shared
/// result ([`Body::Shared`], encoded once for every subscriber) is copied once, into the
/// message or frame that carries it, with this connection's seq written in (docs/DESIGN.md
/// section 5.3); the buffers are reused from burst to burst (tungstenite copies a message into
/// its write buffer when fed and drops it, so the next reservation reclaims the space).
#[derive(Debug, Default)]
pub(crate) struct Framer {
    /// `results` frames of this protocol version (binary sessions with `batch_results`).
    batch: Option<u8>,
    /// The `results` frame being built (empty: none).
    records: BytesMut,
    /// Where results sent alone get their seq.
    alone: BytesMut,
}

impl Framer {
    /// Starts a burst with `out`'s settings now.
    pub fn begin(&mut self, out: &Outbound) {
        self.batch = match (out.batch_results(), out.encoding()) {
            (true, Encoding::Binary(v)) => Some(v),
            _ => None,
        };
        self.records.clear();
    }

    /// What to feed for `it`, in order: the `results` frame it ends, then `it` alone; either
    /// may be absent (a binary result joins the frame being built).
    pub fn push(&mut self, it: Item) -> [Option<Message>; 2] {
        let (record, replayed) = match (&it.msg, it.class) {
            (_, CONTROL) => (None, false),
            (Body::Shared { frame, replayed }, _) => (Some(&frame[..]), *replayed),
            (Body::Message(Message::Binary(b)), _) => (Some(&b[..]), false),
            (Body::Message(_), _) => (None, false),
        };
        if let (Some(v), Some(rec)) = (self.batch, record) {
            if self.records.is_empty() {
                self.records.reserve(BURST_BYTES + 4096);
                protocol::results_frame_begin(&mut self.records, v);
            }
            let at = self.records.len() + 4;
            if protocol::results_frame_push(&mut self.records, rec) {
                if let (Some(r), Body::Shared { .. }) = (self.records.get_mut(at..), &it.msg) {
                    protocol::patch_result(r, it.seq, replayed);
                }
                return [None, None];
            }
            // Not framable (over 4 GiB): alone, after what precedes it.
        }
        let msg = match it.msg {
            Body::Message(m) => m,
            Body::Shared { frame, replayed } => {
                self.alone.reserve(frame.len());
                self.alone.extend_from_slice(&frame);
                protocol::patch_result(&mut self.alone, it.seq, replayed);
                Message::Binary(self.alone.split().freeze())
            }
        };
        [self.finish(), Some(msg)]
    }

    /// Frees the buffers (the writer is idle).
    pub fn release(&mut self) {
        self.records = BytesMut::new();
        self.alone = BytesMut::new();
    }

    /// The `results` frame being built, if any: the end of a burst.
    pub fn finish(&mut self) -> Option<Message> {
        if self.records.is_empty() {
            return None;
        }
        Some(Message::Binary(self.records.split().freeze()))
    }
}

/// One connection's writer between bursts.
struct Writer<'a> {
    out: &'a Outbound,
    cfg: &'a WriterConfig,
    m: &'a ServerMetrics,
    /// The highest seq whose burst was flushed.
    last_seq: u64,
    /// Bursts in a row slower than `slow_send`.
    slow_run: u32,
    framer: Framer,
    next_heartbeat: Instant,
}

/// What one burst fed and its clock.
struct Burst {
    t0: Instant,
    /// Highest seq in the burst (0: no result).
    seq: u64,
    /// Messages per class.
    sent: [u64; 4],
    bytes: usize,
    n: usize,
}

impl Writer<'_> {
    fn close(&self, code: u16, why: &str) -> Option<(u16, String)> {
        Some((code, format!("{why} last_seq={}", self.last_seq)))
    }

    /// Sends one burst starting with `first`. `Ok(then)`: what `Outbound::next` said after the
    /// burst when it was not another message to send (`None`: the burst was full); `Err`: the
    /// connection ends (with the close to send, if any).
    async fn burst<S>(
        &mut self,
        sink: &mut S,
        first: Item,
    ) -> Result<Option<Next>, Option<(u16, String)>>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let mut b = Burst {
            t0: Instant::now(),
            seq: 0,
            sent: [0; 4],
            bytes: 0,
            n: 0,
        };
        let mut then = None;
        let fed = timeout(
            self.cfg.send_timeout,
            self.feed(sink, first, &mut b, &mut then),
        )
        .await;
        match fed {
            Err(_) => {
                self.m.slow_consumer("send_timeout");
                tracing::warn!(conn = self.out.id, "send timed out: closing with 1013");
                return Err(self.close(1013, "send_timeout"));
            }
            Ok(Err(e)) => {
                tracing::debug!(conn = self.out.id, "send failed: {e}");
                return Err(None);
            }
            Ok(Ok(())) => {}
        }
        let dt = b.t0.elapsed();
        self.m.send_seconds.record(dt.as_secs_f64());
        for (c, k) in b.sent.iter().enumerate() {
            if *k > 0 {
                self.m.sent[c].increment(*k);
            }
        }
        if b.seq > 0 {
            self.last_seq = b.seq;
        }
        if dt > self.cfg.slow_send {
            self.slow_run += 1;
            if self.slow_run >= self.cfg.slow_sends {
                self.m.slow_consumer("slow_consumer");
                tracing::warn!(conn = self.out.id, "slow consumer: closing with 1013");
                return Err(self.close(1013, "slow_consumer"));
            }
        } else {
            self.slow_run = 0;
        }
        Ok(then)
    }

    /// Feeds the burst into the sink and flushes it. With `batch_results`, the burst's binary
    /// results go out as `results` frames (PROTOCOL 4.5): the same records in the same order, a
    /// frame per run of them between other messages ([`Framer`]).
    async fn feed<S>(
        &mut self,
        sink: &mut S,
        first: Item,
        b: &mut Burst,
        then: &mut Option<Next>,
    ) -> Result<(), WsError>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let out = self.out;
        self.framer.begin(out);
        let mut item = Some(first);
        while let Some(it) = item.take() {
            b.bytes += it.msg.len();
            b.sent[it.class] += 1;
            b.seq = b.seq.max(it.seq);
            // Messages fed: a result that joins the `results` frame being built is not one.
            for m in self.framer.push(it).into_iter().flatten() {
                b.n += 1;
                sink.feed(m).await?;
            }
            if b.n >= BURST_MESSAGES || b.bytes >= BURST_BYTES {
                break;
            }
            match out.next() {
                Next::Send(it) => item = Some(it),
                other => *then = Some(other),
            }
        }
        if let Some(frame) = self.framer.finish() {
            sink.feed(frame).await?;
        }
        sink.flush().await
    }

    /// Nothing to send: a heartbeat when one is due, else wait for a message or a deadline.
    async fn idle(&mut self, due: Option<Instant>) {
        // An idle connection holds no frame buffer (up to 100 KiB each); a busy one reuses it.
        self.framer.release();
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.cfg.heartbeat;
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            self.out.push_control(notices::heartbeat(ts));
            return;
        }
        let until = due.map_or(self.next_heartbeat, |d| d.min(self.next_heartbeat));
        tokio::select! {
            _ = self.out.wait() => {}
            _ = sleep_until(until.into()) => {}
        }
    }
}
