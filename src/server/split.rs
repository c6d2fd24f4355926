//! A connection's socket around the WebSocket upgrade (docs/DESIGN.md section 7):
//! tungstenite answers the handshake through a [`HandshakeTap`], which hands it the request
//! only up to the end of its head, so that anything the client sent after it (its first
//! frames) stays for the connection's own frame reader (`conn/frames.rs`). Then the socket is
//! split: [`ReadSide`] goes to the frame reader, [`WriteSide`] to tungstenite for the writer
//! task (`fanout/writer.rs`). A plain socket splits into its owned halves (no lock between
//! them); TLS, whose session both directions share, through `tokio::io::split`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use super::tls::Stream;

/// The end of an HTTP request's head.
const HEAD_END: &[u8; 4] = b"\r\n\r\n";

/// The stream tungstenite's handshake reads and writes (see the module's notes).
pub(crate) struct HandshakeTap {
    inner: Stream,
    /// Read from the socket and not handed to tungstenite.
    held: BytesMut,
    /// How much of [`HEAD_END`] the bytes handed out so far end with.
    matched: usize,
}

impl HandshakeTap {
    pub fn new(inner: Stream) -> Self {
        HandshakeTap {
            inner,
            held: BytesMut::new(),
            matched: 0,
        }
    }

    /// The socket and what was read past the request's head.
    pub fn into_parts(self) -> (Stream, BytesMut) {
        (self.inner, self.held)
    }
}

impl AsyncRead for HandshakeTap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.matched == HEAD_END.len() {
            // The head is out; tungstenite does not read past it. Say end of stream, not hang.
            return Poll::Ready(Ok(()));
        }
        if me.held.is_empty() {
            let mut chunk = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut me.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => me.held.extend_from_slice(rb.filled()),
                other => return other,
            }
            if me.held.is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
        let mut n = 0;
        for &b in me.held.iter().take(out.remaining()) {
            n += 1;
            me.matched = match b {
                _ if b == HEAD_END[me.matched] => me.matched + 1,
                b'\r' => 1,
                _ => 0,
            };
            if me.matched == HEAD_END.len() {
                break;
            }
        }
        out.put_slice(&me.held[..n]);
        me.held.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HandshakeTap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What the frame reader reads: a plain socket's reading half or TLS's.
pub(crate) type ReadSide = Either<OwnedReadHalf, ReadHalf<Box<TlsStream<TcpStream>>>>;

/// What the writer's tungstenite writes. Dropping it shuts the socket's sending direction.
pub(crate) struct WriteSide(Either<OwnedWriteHalf, WriteHalf<Box<TlsStream<TcpStream>>>>);

/// The socket's two directions.
pub(crate) fn split(s: Stream) -> (ReadSide, WriteSide) {
    match s {
        Stream::Plain(tcp) => {
            let (r, w) = tcp.into_split();
            (Either::Left(r), WriteSide(Either::Left(w)))
        }
        Stream::Tls(tls) => {
            let (r, w) = tokio::io::split(tls);
            (Either::Right(r), WriteSide(Either::Right(w)))
        }
    }
}

/// tungstenite's `WebSocketStream` wants a stream that reads too; the writer only feeds,
/// flushes and closes its sink, which never reads, and the frame reader has the reading half.
/// A read here is answered "end of stream".
impl AsyncRead for WriteSide {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for WriteSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// tungstenite reads the head in chunks: the tap stops at the blank line, and what the client
    /// sent after it stays in the tap.
    #[tokio::test]
    async fn the_tap_hands_out_the_head_only() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let sent = b"GET / HTTP/1.1\r\nHost: x\r\r\n\r\n\x82\x85frame";
        c.write_all(sent).await.unwrap();
        let mut tap = HandshakeTap::new(Stream::Plain(s));
        let mut head = Vec::new();
        let mut chunk = [0u8; 7];
        loop {
            let n = tap.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let end = sent.windows(4).position(|w| w == HEAD_END).unwrap() + 4;
        assert_eq!(head, &sent[..end]);
        let (_, held) = tap.into_parts();
        assert_eq!(&held[..], &sent[end..]);
    }
}
