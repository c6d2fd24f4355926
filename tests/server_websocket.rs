//! The server's WebSocket layer over raw sockets on 127.0.0.1 (RFC 6455; docs/DESIGN.md
//! section 7, docs/PROTOCOL.md section 2): frames sent in the same write as the upgrade request,
//! fragments with a ping between them, pings, the close handshake, and clients that break the
//! rules (closed with 1002, or 1007 for text that is not UTF-8).

mod server_util;

use std::time::Duration;

use server_util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: [u8; 4] = [0x12, 0x9a, 0x00, 0xfe];

/// A client frame, masked with [`KEY`] (or not).
fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![u8::from(fin) << 7 | opcode];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if masked {
        f.extend_from_slice(&KEY);
        f.extend(payload.iter().zip(KEY.iter().cycle()).map(|(b, k)| b ^ k));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// A raw connection after the upgrade, with what was read past the 101 response.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// Connects and sends the upgrade request with `then` in the same write.
async fn upgrade_with(url: &str, then: &[u8]) -> Raw {
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(then);
    tcp.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed during the upgrade");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    Raw {
        tcp,
        buf: buf[end..].to_vec(),
    }
}

impl Raw {
    /// The next server frame (opcode, payload); `None` when the server closed the socket.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(n) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if at > 0 && self.buf.len() >= at + len {
                    assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(5), self.tcp.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("no frame from the server in 5 s"),
            }
        }
    }

    /// The next frame that is not a JSON `heartbeat`.
    async fn next_non_heartbeat(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            let f = self.next_frame().await?;
            if !(f.0 == 1 && String::from_utf8_lossy(&f.1).contains("\"heartbeat\"")) {
                return Some(f);
            }
        }
    }
}

const HELLO: &[u8] = br#"{"type":"hello","version":2,"results":"binary"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_the_upgrade_write_fragments_pings_and_the_close_handshake() {
    let (server, url) = start(small_head(), config()).await;

    // `hello` in the same write as the request, split in three fragments with a ping between.
    let mut early = frame(false, 0x1, &HELLO[..10], true);
    early.extend(frame(true, 0x9, b"ping-1", true));
    early.extend(frame(false, 0x0, &HELLO[10..30], true));
    early.extend(frame(true, 0x0, &HELLO[30..], true));
    let mut c = upgrade_with(&url, &early).await;
    assert_eq!(
        c.next_non_heartbeat().await,
        Some((0xA, b"ping-1".to_vec()))
    );
    let (op, welcome) = c.next_non_heartbeat().await.unwrap();
    assert_eq!(op, 0x1);
    assert!(String::from_utf8_lossy(&welcome).contains("\"welcome\""));

    // A ping is answered with the same payload.
    c.tcp
        .write_all(&frame(true, 0x9, b"abc", true))
        .await
        .unwrap();
    assert_eq!(c.next_non_heartbeat().await, Some((0xA, b"abc".to_vec())));

    // The close handshake: the same code back, then the socket closes.
    let mut close = 4001u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    c.tcp
        .write_all(&frame(true, 0x8, &close, true))
        .await
        .unwrap();
    let (op, body) = c.next_non_heartbeat().await.unwrap();
    assert_eq!(op, 0x8);
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), 4001);
    let reason = String::from_utf8_lossy(&body[2..]).to_string();
    assert!(reason.starts_with("closed_by_peer last_seq="), "{reason}");
    assert_eq!(c.next_frame().await, None);

    // A close without a code is answered with 1000.
    let mut c = upgrade_with(&url, &frame(true, 0x8, b"", true)).await;
    let (op, body) = c.next_non_heartbeat().await.unwrap();
    assert_eq!((op, u16::from_be_bytes([body[0], body[1]])), (0x8, 1000));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_breaks_rfc_6455_is_closed_and_others_go_on() {
    let (server, url) = start(small_head(), config()).await;
    let mut reserved = frame(true, 0x1, HELLO, true);
    reserved[0] |= 0x40;
    let broken = [
        (frame(true, 0x1, HELLO, false), 1002),        // not masked
        (reserved, 1002),                              // RSV1 without an extension
        (frame(true, 0x3, b"x", true), 1002),          // unknown opcode
        (frame(true, 0x0, b"x", true), 1002),          // continuation of nothing
        (frame(true, 0x1, &[0xff, 0xfe], true), 1007), // text that is not UTF-8
        (frame(false, 0x9, b"x", true), 1002),         // fragmented ping
        (frame(true, 0x8, &1005u16.to_be_bytes(), true), 1002), // a code no peer may send
    ];
    for (wire, code) in broken {
        let mut c = upgrade_with(&url, &wire).await;
        let (op, body) = c.next_non_heartbeat().await.expect("a close frame");
        assert_eq!(op, 0x8, "{wire:02x?}");
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), code, "{wire:02x?}");
        assert!(String::from_utf8_lossy(&body[2..]).starts_with("protocol_error"));
        assert_eq!(c.next_frame().await, None, "{wire:02x?}");
    }
    // The server is fine: a well-behaved client still gets its welcome.
    let mut c = upgrade_with(&url, &frame(true, 0x1, HELLO, true)).await;
    let (op, welcome) = c.next_non_heartbeat().await.unwrap();
    assert!(op == 0x1 && String::from_utf8_lossy(&welcome).contains("\"welcome\""));
    server.shutdown().await;
}
