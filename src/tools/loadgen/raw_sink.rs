//! The producers' write side: WebSocket frames written to the socket straight from the
//! buffers they were encoded in.
//!
//! tungstenite copies every outgoing payload into its write buffer and masks it there (the
//! client's masking key, RFC 6455 section 5.3): ~17% of the load generator's CPU when it sends
//! `samples` frames (docs/PERF.md, 2026-12-04 session 12), CPU that the server under test then
//! lacks on a shared machine. A producer's connection is split at the socket instead: tungstenite
//! keeps the read half (the server's errors and notices, [`ReadOnly`]), and [`RawSink`] writes
//! each frame as a header and the payload's own `Bytes`, gathered into one `writev`. The frames
//! are masked with the all-zero key, which RFC 6455 allows (the key is any 32-bit value; the
//! server unmasks every client frame whatever its key, so its work is unchanged): masking then
//! leaves the payload as it is and needs no pass over it. Only the load generator does this;
//! the library's client ([`crate::client`]) masks with random keys through tungstenite.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::conn::Ws;

/// Splits a producer's connection just after its handshake (before its `hello`, while the
/// server has sent nothing that tungstenite could have read ahead): the [`RawSink`] writes,
/// tungstenite reads from the [`ReadOnly`] half. `buffer`: see [`RawSink::new`].
pub(crate) async fn split(ws: Ws, buffer: usize) -> (RawSink, WebSocketStream<ReadOnly>) {
    let cfg = *ws.get_config();
    let (r, w) = ws.into_inner().into_split();
    let rx = WebSocketStream::from_raw_socket(ReadOnly(r), Role::Client, Some(cfg)).await;
    (RawSink::new(w, buffer), rx)
}

/// Pieces handed to one `writev` at most.
const MAX_SLICES: usize = 64;

/// A frame's header: FIN, `opcode`, the mask bit, the payload length, the all-zero key.
fn header(opcode: u8, len: usize) -> Bytes {
    let mut h = Vec::with_capacity(14);
    h.push(0x80 | opcode);
    match len {
        0..=125 => h.push(0x80 | len as u8),
        126..=0xffff => {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(0x80 | 127);
            h.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    h.extend_from_slice(&[0; 4]);
    Bytes::from(h)
}

/// The payload of a close frame: the code and the reason (none for a close without a code).
fn close_payload(f: Option<CloseFrame>) -> Bytes {
    match f {
        None => Bytes::new(),
        Some(f) => {
            let mut p = u16::from(f.code).to_be_bytes().to_vec();
            p.extend_from_slice(f.reason.as_bytes());
            Bytes::from(p)
        }
    }
}

/// Writes WebSocket frames (client role, all-zero masking key) to the socket's write half.
/// Frames queue until `buffer` bytes wait or the sink is flushed, then go out in `writev`s.
pub(crate) struct RawSink {
    w: OwnedWriteHalf,
    queue: VecDeque<Bytes>,
    queued: usize,
    buffer: usize,
}

impl RawSink {
    /// Frames queue until `buffer` bytes wait (or a flush).
    pub fn new(w: OwnedWriteHalf, buffer: usize) -> RawSink {
        RawSink {
            w,
            queue: VecDeque::new(),
            queued: 0,
            buffer,
        }
    }

    fn push(&mut self, opcode: u8, payload: Bytes) {
        self.queued += payload.len() + 14;
        self.queue.push_back(header(opcode, payload.len()));
        if !payload.is_empty() {
            self.queue.push_back(payload);
        }
    }

    /// Writes until the queue is empty (or the socket is full: pending).
    fn poll_write_queue(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        while !self.queue.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .queue
                .iter()
                .take(MAX_SLICES)
                .map(|b| IoSlice::new(b))
                .collect();
            let n = match Pin::new(&mut self.w).poll_write_vectored(cx, &slices) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(WsError::Io(e))),
                Poll::Ready(Ok(0)) => {
                    let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                    return Poll::Ready(Err(WsError::Io(e)));
                }
                Poll::Ready(Ok(n)) => n,
            };
            let mut left = n;
            while left > 0 {
                let Some(front) = self.queue.front_mut() else {
                    break;
                };
                let k = left.min(front.len());
                front.advance(k);
                left -= k;
                if front.is_empty() {
                    self.queue.pop_front();
                }
            }
        }
        self.queued = 0;
        Poll::Ready(Ok(()))
    }
}

impl Sink<Message> for RawSink {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.queued >= this.buffer {
            return this.poll_write_queue(cx);
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, msg: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        match msg {
            Message::Text(t) => this.push(0x1, Bytes::from(t)),
            Message::Binary(b) => this.push(0x2, b),
            Message::Close(f) => this.push(0x8, close_payload(f)),
            Message::Ping(p) => this.push(0x9, p),
            Message::Pong(p) => this.push(0xA, p),
            // Only ever read, never written.
            Message::Frame(_) => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        match this.poll_write_queue(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.w).poll_flush(cx).map_err(WsError::Io),
            other => other,
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        match this.poll_write_queue(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.w).poll_shutdown(cx).map_err(WsError::Io),
            other => other,
        }
    }
}

/// The read half of a producer's socket, for tungstenite to read the server's frames from.
/// What tungstenite writes on it (the reply to the server's close frame) is dropped: the
/// producer's own [`RawSink`] sends its close frame itself.
pub(crate) struct ReadOnly(pub OwnedReadHalf);

impl AsyncRead for ReadOnly {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ReadOnly {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    #[test]
    fn headers_encode_each_length_form() {
        assert_eq!(&header(0x2, 5)[..], [0x82, 0x85, 0, 0, 0, 0]);
        assert_eq!(&header(0x1, 126)[..], [0x81, 0xfe, 0, 126, 0, 0, 0, 0]);
        assert_eq!(
            &header(0x2, 0xffff)[..],
            [0x82, 0xfe, 0xff, 0xff, 0, 0, 0, 0]
        );
        let h = header(0x2, 0x1_0000);
        assert_eq!(&h[..2], [0x82, 0xff]);
        assert_eq!(&h[2..10], 0x1_0000u64.to_be_bytes());
        assert_eq!(&h[10..], [0, 0, 0, 0]);
    }

    /// A tungstenite server reads every frame the sink writes, byte for byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tungstenite_server_reads_what_the_sink_writes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
            let mut got = Vec::new();
            while let Some(Ok(m)) = ws.next().await {
                let close = m.is_close();
                got.push(m);
                if close {
                    break;
                }
            }
            got
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_r, w) = tcp.into_split();
        // A small buffer: the queue goes out part way through, and a large frame takes
        // several writes.
        let mut sink = RawSink::new(w, 1000);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let sent = vec![
            Message::text("{\"type\":\"hello\"}"),
            Message::binary(vec![7u8; 125]),
            Message::binary(vec![]),
            Message::binary(vec![1u8; 126]),
            Message::binary(vec![2u8; 70_000]),
            Message::binary(big),
            Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            })),
        ];
        for m in sent.iter().cloned() {
            sink.feed(m).await.unwrap();
        }
        sink.flush().await.unwrap();
        let got = server.await.unwrap();
        assert_eq!(got, sent);
    }
}
