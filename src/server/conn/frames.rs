//! The server's WebSocket frame reader (RFC 6455 section 5, docs/DESIGN.md section 7): a
//! connection's reading half, parsed into messages without tungstenite's read path, which
//! zero-filled up to 128 KiB of its buffer before every socket read and unmasked in a separate
//! pass (13.6% and 6.0% of the server's CPU in an f32 flood, docs/PERF.md session 16).
//!
//! - A payload over [`READ_AHEAD`] is read straight from the socket into a buffer of its own
//!   (uninitialised memory, no zero-fill, no second copy), taken from the engine's buffer pool
//!   and given back to it when the message's last slice is dropped: recycled memory is already
//!   faulted in and likely in cache, where a fresh 1-2 MiB allocation per frame page-faulted
//!   (~12% of the server's CPU under Python `fuse()`, docs/PERF.md session 17). Smaller frames
//!   and headers come from a read-ahead buffer filled [`READ_AHEAD`] at a time.
//! - The client's mask is removed in place, 8 bytes at a time; an all-zero key (which changes
//!   nothing) is skipped.
//! - What RFC 6455 asks of a server is checked: client frames are masked, reserved bits are
//!   clear, opcodes are known, control frames are whole and at most 125 bytes, fragments come in
//!   order, text is UTF-8, a close frame's code is one a peer may send. A frame or message over
//!   `max_frame_bytes` is refused from its header, before its payload is read.
//! - [`FrameReader::next`] is cancel-safe: every byte read is kept in the reader itself, so the
//!   connection's `select!` may drop it between reads.
//!
//! Pings are returned for the caller to answer (the writer owns the sending half); pongs are
//! dropped here.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::engine::BufferPool;

/// Bytes asked of the socket per read for headers and small frames; a payload longer than this
/// is read into a buffer of its own.
pub(crate) const READ_AHEAD: usize = 64 << 10;

/// The longest frame header: 2 bytes, an 8-byte length, the 4-byte mask.
const MAX_HEADER: usize = 14;

/// A message from the client.
#[derive(Debug, PartialEq)]
pub(crate) enum Incoming {
    Text(Utf8Bytes),
    Binary(Bytes),
    /// Answer with a pong carrying the same payload (RFC 6455 5.5.2).
    Ping(Bytes),
    /// The client's close: the code to echo (RFC 6455 5.5.1; `None`: it sent none).
    Close(Option<u16>),
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// A frame, or a message's fragments together, over the limit: nothing of it was read.
    #[error("Message too long: {size} > {max}")]
    TooLarge { size: u64, max: usize },
    /// The client broke RFC 6455 (close with 1002).
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    /// A text message that is not UTF-8 (close with 1007).
    #[error("WebSocket protocol error: a text message that is not UTF-8")]
    NotUtf8,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    /// The close code to send (RFC 6455 7.4.1); `None` when the socket itself failed.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ReadError::NotUtf8 => Some(1007),
            ReadError::TooLarge { .. } => Some(1009),
            ReadError::Protocol(_) => Some(1002),
            ReadError::Io(_) => None,
        }
    }
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
}

/// Parses the header at the front of `buf`: `Ok(None)` while it is incomplete, else the header
/// and its length in bytes. Checks what can be checked from the header alone.
fn parse_header(buf: &[u8], max: usize) -> Result<Option<(Header, usize)>, ReadError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(ReadError::Protocol(
            "reserved bits set (no extension was agreed)",
        ));
    }
    let opcode = b0 & 0x0F;
    let control = opcode & 0x8 != 0;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(ReadError::Protocol("unknown opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("a client frame that is not masked"));
    }
    let fin = b0 & 0x80 != 0;
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                (u64::from_be_bytes(n), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if control && (!fin || len > 125) {
        return Err(ReadError::Protocol(
            "a control frame fragmented or over 125 bytes",
        ));
    }
    if len > max as u64 {
        return Err(ReadError::TooLarge { size: len, max });
    }
    let Some(k) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let header = Header {
        fin,
        opcode,
        mask: [k[0], k[1], k[2], k[3]],
        // At most `max`, a usize (checked above).
        len: len as usize,
    };
    Ok(Some((header, at + 4)))
}

/// Removes the client's mask from a whole payload (RFC 6455 5.3), 8 bytes at a time.
fn unmask(buf: &mut [u8], key: [u8; 4]) {
    if key == [0; 4] {
        return;
    }
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        w.copy_from_slice(&(u64::from_ne_bytes(b) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so at key byte 0.
    for (b, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *b ^= k;
    }
}

/// Reads one connection's frames (see the module's notes).
pub(crate) struct FrameReader<R> {
    io: R,
    /// Bytes read and not yet parsed (headers, small payloads).
    buf: BytesMut,
    /// `max_frame_bytes`: the most a frame or a message may carry.
    max: usize,
    /// The header whose payload is being read.
    header: Option<Header>,
    /// A payload over [`READ_AHEAD`] being read into memory of its own.
    big: Option<Vec<u8>>,
    /// Where that memory comes from and goes back to (`None`: allocated and freed).
    pool: Option<Arc<BufferPool>>,
    /// The last frame's payload was over [`READ_AHEAD`] (see [`FrameReader::fill`]).
    after_big: bool,
    /// A fragmented message so far: text or not, and its payload.
    partial: Option<(bool, BytesMut)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of `io` that starts with `read` (bytes the handshake read past the request),
    /// reading large payloads into buffers of `pool`.
    pub fn new(io: R, read: BytesMut, max: usize, pool: Option<Arc<BufferPool>>) -> Self {
        FrameReader {
            io,
            buf: read,
            max,
            header: None,
            big: None,
            pool,
            after_big: false,
            partial: None,
        }
    }

    /// The next message; `Ok(None)` when the client closed the socket between frames.
    /// Cancel-safe (see the module's notes).
    pub async fn next(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let h = match self.header {
                Some(h) => h,
                None => match parse_header(&self.buf, self.max)? {
                    Some((h, n)) => {
                        self.buf.advance(n);
                        self.start(h)?;
                        h
                    }
                    None => {
                        if self.fill().await? == 0 {
                            let mid_frame = !self.buf.is_empty() || self.partial.is_some();
                            return match mid_frame {
                                true => Err(eof()),
                                false => Ok(None),
                            };
                        }
                        continue;
                    }
                },
            };
            let payload = if let Some(big) = self.big.as_mut() {
                let left = h.len - big.len();
                if left > 0 {
                    if self.io.read_buf(&mut big.limit(left)).await? == 0 {
                        return Err(eof());
                    }
                    continue;
                }
                Payload::Big(self.big.take().unwrap_or_default())
            } else if self.buf.len() < h.len {
                if self.fill().await? == 0 {
                    return Err(eof());
                }
                continue;
            } else {
                Payload::Small(self.buf.split_to(h.len))
            };
            self.header = None;
            self.after_big = h.len > READ_AHEAD;
            if let Some(m) = self.frame(h, payload)? {
                return Ok(Some(m));
            }
        }
    }

    /// A header was parsed: checks it against the message in progress, and sets a large
    /// payload up to be read into memory of its own.
    fn start(&mut self, h: Header) -> Result<(), ReadError> {
        match (h.opcode, &self.partial) {
            (OP_CONTINUATION, None) => {
                return Err(ReadError::Protocol("a continuation frame with no message"))
            }
            (OP_TEXT | OP_BINARY, Some(_)) => {
                return Err(ReadError::Protocol("a new message inside a fragmented one"))
            }
            (OP_CONTINUATION, Some((_, so_far))) => {
                let size = so_far.len() as u64 + h.len as u64;
                if size > self.max as u64 {
                    return Err(ReadError::TooLarge {
                        size,
                        max: self.max,
                    });
                }
            }
            _ => {}
        }
        self.header = Some(h);
        if h.len > READ_AHEAD {
            let mut big = match &self.pool {
                Some(p) => p.take(h.len),
                None => Vec::with_capacity(h.len),
            };
            let have = self.buf.len().min(h.len);
            big.extend_from_slice(&self.buf[..have]);
            self.buf.advance(have);
            self.big = Some(big);
        }
        Ok(())
    }

    /// Reads what the socket has into the read-ahead buffer (no zero-fill: `read_buf` reads
    /// into its spare capacity). `Ok(0)`: end of stream.
    ///
    /// After a large payload the next header is read alone (at most [`MAX_HEADER`] bytes): a
    /// producer of large frames is likely to send another, whose payload would otherwise be read
    /// into the read-ahead buffer and copied out of it (2.4% of the server's CPU in an f32 flood
    /// of 2 MiB frames). One more read per large frame; small frames read ahead as before.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.header.is_none() && self.after_big && self.buf.len() < MAX_HEADER {
            let n = MAX_HEADER - self.buf.len();
            self.buf.reserve(n);
            return self.io.read_buf(&mut (&mut self.buf).limit(n)).await;
        }
        let want = self.header.map_or(0, |h| h.len - self.buf.len());
        self.buf.reserve(want.max(READ_AHEAD));
        self.io.read_buf(&mut self.buf).await
    }

    /// A whole frame's payload: the message it completes, if any.
    fn frame(&mut self, h: Header, mut payload: Payload) -> Result<Option<Incoming>, ReadError> {
        unmask(payload.as_mut(), h.mask);
        let data = match h.opcode {
            OP_PING => return Ok(Some(Incoming::Ping(self.bytes(payload)))),
            OP_PONG => return Ok(None),
            OP_CLOSE => return close_code(payload.as_mut()).map(|c| Some(Incoming::Close(c))),
            OP_CONTINUATION => {
                let Some((text, mut so_far)) = self.partial.take() else {
                    return Err(ReadError::Protocol("a continuation frame with no message"));
                };
                so_far.extend_from_slice(payload.as_mut());
                self.give_back(payload);
                if !h.fin {
                    self.partial = Some((text, so_far));
                    return Ok(None);
                }
                (text, so_far.freeze())
            }
            op => {
                if !h.fin {
                    // A first fragment (rare): kept in a buffer that can grow.
                    let first = BytesMut::from(&payload.as_mut()[..]);
                    self.give_back(payload);
                    self.partial = Some((op == OP_TEXT, first));
                    return Ok(None);
                }
                (op == OP_TEXT, self.bytes(payload))
            }
        };
        match data {
            (true, p) => Utf8Bytes::try_from(p)
                .map(|t| Some(Incoming::Text(t)))
                .map_err(|_| ReadError::NotUtf8),
            (false, p) => Ok(Some(Incoming::Binary(p))),
        }
    }

    /// A payload as a message's bytes: a buffer of the pool goes back to it with the last slice.
    fn bytes(&self, payload: Payload) -> Bytes {
        match (payload, &self.pool) {
            (Payload::Small(b), _) => b.freeze(),
            (Payload::Big(v), Some(pool)) => Bytes::from_owner(Pooled {
                v,
                pool: Arc::clone(pool),
            }),
            (Payload::Big(v), None) => Bytes::from(v),
        }
    }

    /// A payload no message holds: its buffer goes back to the pool.
    fn give_back(&self, payload: Payload) {
        if let (Payload::Big(v), Some(pool)) = (payload, &self.pool) {
            pool.give(v);
        }
    }
}

/// A frame's payload: a slice of the read-ahead buffer, or memory of its own.
enum Payload {
    Small(BytesMut),
    Big(Vec<u8>),
}

impl Payload {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            Payload::Small(b) => b,
            Payload::Big(v) => v,
        }
    }
}

/// A message's buffer from the pool, given back when the message's last slice is dropped.
struct Pooled {
    v: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.v
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.v));
    }
}

fn eof() -> ReadError {
    ReadError::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the client closed the socket inside a frame",
    ))
}

/// A close frame's code (RFC 6455 5.5.1, 7.4): none, or one a peer may send, with a UTF-8
/// reason.
fn close_code(payload: &[u8]) -> Result<Option<u16>, ReadError> {
    let bad = || ReadError::Protocol("a close frame with a bad code or reason");
    match payload {
        [] => Ok(None),
        [_] => Err(bad()),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed || std::str::from_utf8(reason).is_err() {
                return Err(bad());
            }
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
#[path = "frames_tests.rs"]
mod tests;
