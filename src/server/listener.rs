//! The listener (docs/DESIGN.md section 7): accepts connections under the connection
//! semaphore, does the TLS handshake when configured (`tls.rs`), the WebSocket handshake (a full server answers 503, a missing or wrong
//! bearer token 401), bounds frames at `max_frame_bytes`, and hands each connection to its
//! reader ([`conn::handle`]) with a fresh set of send queues ([`Outbound`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

use super::conn::{self, frames::FrameReader};
use super::fanout::outbound::Outbound;
use super::fanout::writer;
use super::shared::Shared;
use super::split::{self, HandshakeTap, ReadSide, WriteSide};
use super::tls::{self, Refusal, Stream};

/// How long a connection may take from accept to an open WebSocket (the TLS handshake
/// included, docs/DESIGN.md section 7).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the stop signal; with `tls`, every connection is `wss://`.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    permits: Arc<Semaphore>,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let sh = Arc::clone(&shared);
                    let permit = Arc::clone(&permits).try_acquire_owned().ok();
                    let tls = tls.clone();
                    tokio::spawn(connection(sh, tcp, peer, permit, tls, stop.clone()));
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Bounds the kernel's receive buffer of an accepted connection at `bytes` (`recv_buffer`;
/// 0: leave the kernel's autotuning, which grows it to `net.ipv4.tcp_rmem`'s maximum, 32 MiB on
/// Debian). What waits there waits ahead of every priority class, in arrival order, where no
/// ingest fill sees it: bounded, a producer sending faster than the server reads is slowed by
/// TCP instead (docs/DESIGN.md section 5.6).
fn bound_recv_buffer(tcp: &TcpStream, bytes: usize) -> std::io::Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    socket2::SockRef::from(tcp).set_recv_buffer_size(bytes)
}

/// Handshakes (TLS, then the WebSocket upgrade: limit, auth, frame size), then the
/// connection handler.
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    tls: Option<TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    if let Err(e) = bound_recv_buffer(&tcp, shared.cfg.recv_buffer) {
        tracing::debug!(%peer, "cannot set the receive buffer: {e}");
    }
    let hs = upgrade(&shared, tcp, permit.is_none(), tls);
    let (reader, sink) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hs).await {
        Ok(Ok(halves)) => halves,
        Ok(Err((reason, why))) => {
            shared.m.refused(reason);
            tracing::debug!(%peer, "handshake refused ({reason}): {why}");
            return;
        }
        Err(_) => {
            shared.m.refused("handshake");
            return;
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let q = &shared.cfg.send_queue;
    let out = Arc::new(Outbound::new(
        id,
        q,
        shared.cfg.drop_notice_interval,
        shared.cfg.replay_messages,
        Arc::clone(&shared.m),
    ));
    shared.conns.lock().insert(id, Arc::clone(&out));
    shared.m.connections.increment(1.0);
    shared.m.connections_total.increment(1);
    tracing::debug!(%peer, conn = id, "connected");
    conn::handle(Arc::clone(&shared), reader, sink, out, stop).await;
    shared.conns.lock().remove(&id);
    shared.m.connections.decrement(1.0);
    tracing::debug!(%peer, conn = id, "closed");
    drop(permit);
}

/// The TLS handshake (with `tls`) and the WebSocket upgrade; a refusal is its
/// `refused_total` reason and a line for the log. The open connection is its frame reader
/// and, for the writer, tungstenite over the sending half (`split.rs`).
// The handshake callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
async fn upgrade(
    shared: &Shared,
    tcp: TcpStream,
    full: bool,
    tls: Option<TlsAcceptor>,
) -> Result<(FrameReader<ReadSide>, WebSocketStream<WriteSide>), Refusal> {
    let stream = match tls {
        Some(acceptor) => tls::accept(&acceptor, tcp).await?,
        None => Stream::Plain(tcp),
    };
    let token = shared.cfg.token.clone();
    let refused: Arc<Mutex<Option<&'static str>>> = Arc::default();
    let why = Arc::clone(&refused);
    let check =
        move |req: &Request, resp: Response| -> std::result::Result<Response, ErrorResponse> {
            let deny = |status: u16, reason: &'static str, text: &str| {
                *why.lock() = Some(reason);
                let mut r = ErrorResponse::new(Some(text.to_string()));
                *r.status_mut() = http_status(status);
                Err(r)
            };
            if full {
                return deny(503, "full", "the server is at max_connections; retry later");
            }
            if let Some(t) = &token {
                if !authorized(req, t) {
                    return deny(401, "auth", "missing or wrong bearer token");
                }
            }
            Ok(resp)
        };
    let max = shared.cfg.max_frame_bytes;
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        // Bursts of the writer (writer.rs) fit the buffer: one flush writes them out.
        .write_buffer_size(writer::BURST_BYTES + (32 << 10))
        // Bounded (tungstenite's default is unbounded): the writer flushes every burst, so the
        // buffer holds at most one burst and one message, and no message is over a frame.
        .max_write_buffer_size(writer::BURST_BYTES + (32 << 10) + max);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        HandshakeTap::new(stream),
        check,
        Some(ws_cfg),
    )
    .await
    .map_err(|e| (refused.lock().unwrap_or("handshake"), e.to_string()))?;
    let (stream, read) = ws.into_inner().into_parts();
    let (read_side, write_side) = split::split(stream);
    let sink = WebSocketStream::from_raw_socket(write_side, Role::Server, Some(ws_cfg)).await;
    let pool = Arc::clone(shared.engine.buffer_pool());
    Ok((FrameReader::new(read_side, read, max, Some(pool)), sink))
}

fn http_status(code: u16) -> tokio_tungstenite::tungstenite::http::StatusCode {
    tokio_tungstenite::tungstenite::http::StatusCode::from_u16(code)
        .unwrap_or(tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN)
}

/// `Authorization: Bearer T` or `?token=T`, compared in constant time.
fn authorized(req: &Request, token: &str) -> bool {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    [header, query]
        .into_iter()
        .flatten()
        .any(|given| ct_eq(given.trim().as_bytes(), token.as_bytes()))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accepted connection and the client's end of it.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
        (s.unwrap().0, c.unwrap())
    }

    #[tokio::test]
    async fn the_receive_buffer_is_bounded_or_left_to_the_kernel() {
        let (s, _c) = pair().await;
        let before = socket2::SockRef::from(&s).recv_buffer_size().unwrap();
        bound_recv_buffer(&s, 0).unwrap();
        assert_eq!(
            socket2::SockRef::from(&s).recv_buffer_size().unwrap(),
            before
        );
        // Linux doubles what is asked (the kernel's bookkeeping share), others take it as is;
        // either way it is no longer the default and at most twice the bound.
        let (s, _c) = pair().await;
        bound_recv_buffer(&s, 48 << 10).unwrap();
        let got = socket2::SockRef::from(&s).recv_buffer_size().unwrap();
        assert!((48 << 10..=96 << 10).contains(&got), "{got}");
        assert_ne!(got, before);
    }
}
