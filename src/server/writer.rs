//! The one sender task of a connection: drains its [`Outbound`] queues in strict priority
//! order, each send under `send_timeout`, detects slow consumers (5 sends over 500 ms in a
//! row), sends heartbeats, and closes with a reason naming the last delivered seq.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt};
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::metrics::ServerMetrics;
use super::outbound::{Next, Outbound};

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
pub(crate) async fn run<S>(
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

/// Sends until a close is due; returns the close to send, if any.
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
    let mut unflushed = 0usize;
    let mut next_heartbeat = Instant::now() + cfg.heartbeat;
    let close = |code: u16, why: &str, last: u64| Some((code, format!("{why} last_seq={last}")));
    loop {
        match out.next() {
            Next::Send(item) => {
                let t0 = Instant::now();
                // `feed` writes the frame out (the server's write buffer is 0 bytes), so its
                // time is the time the peer takes to accept it.
                match timeout(cfg.send_timeout, sink.feed(item.msg)).await {
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
                unflushed += 1;
                let dt = t0.elapsed();
                m.send_seconds.record(dt.as_secs_f64());
                m.sent[item.class].increment(1);
                if item.seq > 0 {
                    last_seq = item.seq;
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
                if unflushed >= 64 || out.is_empty() {
                    if let Some(c) = flush(sink, cfg, m, last_seq).await {
                        return c;
                    }
                    unflushed = 0;
                }
            }
            Next::Close(code, why) => return close(code, why, last_seq),
            Next::Stop => return None,
            Next::Idle(due) => {
                if unflushed > 0 {
                    if let Some(c) = flush(sink, cfg, m, last_seq).await {
                        return c;
                    }
                    unflushed = 0;
                }
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

/// Flushes; `Some(close)` when the connection must end.
async fn flush<S>(
    sink: &mut S,
    cfg: &WriterConfig,
    m: &ServerMetrics,
    last_seq: u64,
) -> Option<Option<(u16, String)>>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    match timeout(cfg.send_timeout, sink.flush()).await {
        Err(_) => {
            m.slow_consumer("send_timeout");
            Some(Some((1013, format!("send_timeout last_seq={last_seq}"))))
        }
        Ok(Err(_)) => Some(None),
        Ok(Ok(())) => None,
    }
}
