//! The one sender task of a connection: drains its [`Outbound`] queues in strict priority
//! order in bursts (one flush per burst), each burst under `send_timeout`, detects slow
//! consumers (5 bursts over 500 ms in a row), sends heartbeats, and closes with a reason naming
//! the last delivered seq.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt};
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::outbound::{Encoding, Next, Outbound, CONTROL};
use crate::protocol;
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

/// A burst ends after this many messages ...
const BURST_MESSAGES: usize = 64;
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
    let mut last_seq: u64 = 0;
    let mut slow_run: u32 = 0;
    let mut next_heartbeat = Instant::now() + cfg.heartbeat;
    let close = |code: u16, why: &str, last: u64| Some((code, format!("{why} last_seq={last}")));
    loop {
        match out.next() {
            Next::Send(first) => {
                let t0 = Instant::now();
                let mut burst_seq = 0u64;
                let mut sent = [0u64; 4];
                let mut bytes = 0usize;
                let mut n = 0usize;
                let mut item = Some(first);
                let mut then = None;
                // With `batch_results`, the burst's binary results go out as `results` frames
                // (PROTOCOL 4.5): the same records in the same order, a frame per run of them
                // between other messages.
                let batch = match (out.batch_results(), out.encoding()) {
                    (true, Encoding::Binary(v)) => Some(v),
                    _ => None,
                };
                let mut records: Option<Vec<u8>> = None;
                let fed = timeout(cfg.send_timeout, async {
                    while let Some(it) = item.take() {
                        bytes += it.msg.len();
                        n += 1;
                        sent[it.class] += 1;
                        burst_seq = burst_seq.max(it.seq);
                        match (batch, &it.msg) {
                            (Some(v), Message::Binary(b)) if it.class != CONTROL => {
                                let frame = records.get_or_insert_with(|| {
                                    protocol::results_frame_start(v, BURST_BYTES + 4096)
                                });
                                if !protocol::results_frame_push(frame, b) {
                                    // Not framable (over 4 GiB): alone, after what precedes it.
                                    if let Some(frame) = records.take() {
                                        sink.feed(Message::binary(frame)).await?;
                                    }
                                    sink.feed(it.msg).await?;
                                }
                            }
                            _ => {
                                if let Some(frame) = records.take() {
                                    sink.feed(Message::binary(frame)).await?;
                                }
                                sink.feed(it.msg).await?;
                            }
                        }
                        if n >= BURST_MESSAGES || bytes >= BURST_BYTES {
                            break;
                        }
                        match out.next() {
                            Next::Send(it) => item = Some(it),
                            other => then = Some(other),
                        }
                    }
                    if let Some(frame) = records.take() {
                        sink.feed(Message::binary(frame)).await?;
                    }
                    sink.flush().await
                })
                .await;
                match fed {
                    Err(_) => {
                        m.slow_consumer("send_timeout");
                        tracing::warn!(conn = out.id, "send timed out: closing with 1013");
                        return close(1013, "send_timeout", last_seq);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(conn = out.id, "send failed: {e}");
                        return None;
                    }
                    Ok(Ok(())) => {}
                }
                let dt = t0.elapsed();
                m.send_seconds.record(dt.as_secs_f64());
                for (c, k) in sent.iter().enumerate() {
                    if *k > 0 {
                        m.sent[c].increment(*k);
                    }
                }
                if burst_seq > 0 {
                    last_seq = burst_seq;
                }
                if dt > cfg.slow_send {
                    slow_run += 1;
                    if slow_run >= cfg.slow_sends {
                        m.slow_consumer("slow_consumer");
                        tracing::warn!(conn = out.id, "slow consumer: closing with 1013");
                        return close(1013, "slow_consumer", last_seq);
                    }
                } else {
                    slow_run = 0;
                }
                match then {
                    Some(Next::Close(code, why)) => return close(code, why, last_seq),
                    Some(Next::Stop) => return None,
                    // Idle, or the burst was full: look at the queues again.
                    _ => {}
                }
            }
            Next::Close(code, why) => return close(code, why, last_seq),
            Next::Stop => return None,
            Next::Idle(due) => {
                let now = Instant::now();
                if now >= next_heartbeat {
                    next_heartbeat = now + cfg.heartbeat;
                    let ts = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    out.push_control(Message::text(format!(
                        "{{\"type\":\"heartbeat\",\"ts_ms\":{ts}}}"
                    )));
                    continue;
                }
                let until = due.map_or(next_heartbeat, |d| d.min(next_heartbeat));
                tokio::select! {
                    _ = out.wait() => {}
                    _ = sleep_until(until.into()) => {}
                }
            }
        }
    }
}
