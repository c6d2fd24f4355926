//! Raw WebSocket connections for the load generator (no client-side buffering beyond the
//! kernel's, so a slow or stalled reader is seen by the server as exactly that).

use futures_util::{Sink, SinkExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::options::LoadgenError;

/// A load generator connection.
pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Connects to `url` (`ws://host:port/...`); `recv_buffer` sets the socket's receive buffer
/// (bytes) before connecting, so that a reader that stops is noticed by the server soon.
pub(crate) async fn connect(url: &str, recv_buffer: Option<u32>) -> Result<Ws, LoadgenError> {
    connect_with(url, recv_buffer, None, None).await
}

/// [`connect`], with the socket's send buffer set to `send_buffer` bytes before connecting and
/// tungstenite writing its buffered frames to the socket only past `write_buffer` bytes (besides
/// on flush) when given, instead of past 128 KiB.
pub(crate) async fn connect_with(
    url: &str,
    recv_buffer: Option<u32>,
    send_buffer: Option<u32>,
    write_buffer: Option<usize>,
) -> Result<Ws, LoadgenError> {
    let cerr = |e: &dyn std::fmt::Display| LoadgenError::Connect(format!("{url}: {e}"));
    let req = url.into_client_request().map_err(|e| cerr(&e))?;
    let host = req
        .uri()
        .host()
        .ok_or_else(|| cerr(&"no host in the URL"))?
        .trim_matches(['[', ']'])
        .to_string();
    let port = req.uri().port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| cerr(&e))?
        .next()
        .ok_or_else(|| cerr(&"the host name did not resolve"))?;
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| cerr(&e))?;
    if let Some(n) = recv_buffer {
        sock.set_recv_buffer_size(n).map_err(|e| cerr(&e))?;
    }
    if let Some(n) = send_buffer {
        sock.set_send_buffer_size(n).map_err(|e| cerr(&e))?;
    }
    let tcp = sock.connect(addr).await.map_err(|e| cerr(&e))?;
    let _ = tcp.set_nodelay(true);
    let mut cfg = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    if let Some(n) = write_buffer {
        cfg = cfg.write_buffer_size(n);
    }
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(cfg))
        .await
        .map_err(|e| cerr(&e))?;
    Ok(ws)
}

/// What a `hello` asks for besides binary results.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hello {
    /// Several results per frame (PROTOCOL 4.5).
    pub batch: bool,
    /// Send queues of this many results per class (PROTOCOL 2: `send_queue`).
    pub send_queue: Option<usize>,
}

/// Says hello in protocol `version` (1, or 2 for stream seqs and resume) asking for binary
/// results and what `asks` says.
pub(crate) async fn hello<S>(tx: &mut S, version: u8, asks: Hello) -> Result<(), LoadgenError>
where
    S: Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let mut m = serde_json::json!({
        "type": "hello", "version": version, "results": "binary",
        "client": "fusion-engine-loadgen", "batch_results": asks.batch,
    });
    if let Some(n) = asks.send_queue {
        m["send_queue"] = serde_json::json!({"critical": n, "important": n, "bulk": n});
    }
    tx.send(Message::text(m.to_string())).await?;
    Ok(())
}

/// The header fields of a binary result (PROTOCOL 4.2, version 1 or 2), vectors not decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Peek<'a> {
    pub seq: u64,
    pub class: usize,
    pub stream: &'a str,
    pub key: &'a str,
    /// Version 2 only.
    pub stream_seq: Option<u64>,
    /// Version 2: flag bit 0.
    pub replayed: bool,
}

/// Reads the header of a binary result frame.
pub(crate) fn peek_result(b: &[u8]) -> Option<Peek<'_>> {
    if b.len() < 24 || b[0..2] != *b"FE" || b[3] != 2 {
        return None;
    }
    let v2 = b[2] == 2;
    let h = if v2 { 32 } else { 24 };
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let sl = usize::from(u16::from_le_bytes([b[6], b[7]]));
    let kl = usize::from(u16::from_le_bytes([b[8], b[9]]));
    Some(Peek {
        seq: u64_at(16)?,
        class: usize::from(b[4]).min(2),
        stream: std::str::from_utf8(b.get(h..h + sl)?).ok()?,
        key: std::str::from_utf8(b.get(h + sl..h + sl + kl)?).ok()?,
        stream_seq: if v2 { u64_at(24) } else { None },
        replayed: v2 && b[5] & 1 == 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_result, with_seq, ResultView};

    #[test]
    fn peeks_result_header() {
        let v = ResultView {
            stream: "s1",
            key: "c3.99",
            priority: crate::engine::Priority::Critical,
            mask: &[1, 0],
            fused: &[0.5; 4],
            weights: &[1.0, 0.0],
            stream_seq: 12,
            replayed: true,
        };
        let b = with_seq(&encode_result(&v, 1), 77);
        let p = peek_result(&b).unwrap();
        assert_eq!((p.seq, p.class, p.stream, p.key), (77, 0, "s1", "c3.99"));
        assert_eq!((p.stream_seq, p.replayed), (None, false));
        assert_eq!(peek_result(&b[..10]), None);
        let b = with_seq(&encode_result(&v, 2), 78);
        let p = peek_result(&b).unwrap();
        assert_eq!((p.seq, p.stream, p.key), (78, "s1", "c3.99"));
        assert_eq!((p.stream_seq, p.replayed), (Some(12), true));
    }
}
