use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::ReadBuf;

use super::*;

/// A client frame (RFC 6455 5.2) with `key` (masked) or unmasked.
fn frame(fin: bool, opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![u8::from(fin) << 7 | opcode];
    let m = if key.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xFFFF => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match key {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().zip(k.iter().cycle()).map(|(b, k)| b ^ k));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

const KEY: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

/// Hands out `data` in pieces of the given sizes (cycled), answering `Pending` (and waking
/// itself) before every other piece: a socket whose bytes arrive in bits.
struct Trickle {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    turn: usize,
    pending: bool,
}

impl Trickle {
    fn new(data: Vec<u8>, sizes: Vec<usize>) -> Self {
        Trickle {
            data,
            at: 0,
            sizes,
            turn: 0,
            pending: false,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.pending = !self.pending;
        if self.pending {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let size = self.sizes[self.turn % self.sizes.len()].max(1);
        self.turn += 1;
        let n = size.min(buf.remaining()).min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// Every message of `wire`, read in pieces of `sizes`, each `next` raced against a zero
/// timeout first (dropped when it would wait: the cancellations of the connection's select!).
async fn read_all(wire: Vec<u8>, sizes: Vec<usize>, max: usize) -> Result<Vec<Incoming>, String> {
    let mut r = FrameReader::new(Trickle::new(wire, sizes), BytesMut::new(), max, None);
    let mut got = Vec::new();
    loop {
        let m = match tokio::time::timeout(Duration::ZERO, r.next()).await {
            Ok(m) => m,
            Err(_) => r.next().await,
        };
        match m {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return Ok(got),
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn bytes_of(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[test]
fn messages_of_every_length_encoding_come_out_whole() {
    // 7-bit, 16-bit and 64-bit lengths, under and over the read-ahead, and empty.
    let lens = [0, 1, 125, 126, 4000, 65535, 65536, READ_AHEAD + 1, 300_000];
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for (i, &n) in lens.iter().enumerate() {
        let p = bytes_of(n, i as u8);
        wire.extend(frame(true, OP_BINARY, &p, KEY));
        want.push(Incoming::Binary(Bytes::from(p)));
    }
    wire.extend(frame(true, OP_TEXT, "héllo".as_bytes(), KEY));
    want.push(Incoming::Text("héllo".into()));
    for sizes in [vec![1 << 20], vec![1], vec![7, 3, 100_000, 13], vec![4096]] {
        let got = rt()
            .block_on(read_all(wire.clone(), sizes, 1 << 20))
            .unwrap();
        assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random frames (sizes around the read-ahead, random keys, fragments with pings between
    /// them), random socket pieces: the messages equal what was sent.
    #[test]
    fn random_frames_in_random_pieces(
        msgs in prop::collection::vec((0usize..3 * READ_AHEAD, any::<[u8; 4]>(), 1usize..4), 1..6),
        sizes in prop::collection::vec(1usize..200_000, 1..5),
    ) {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (i, &(n, key, parts)) in msgs.iter().enumerate() {
            let p = bytes_of(n, i as u8);
            let cut = n / parts;
            for j in 0..parts {
                let lo = j * cut;
                let hi = if j + 1 == parts { n } else { lo + cut };
                let op = if j == 0 { OP_BINARY } else { OP_CONTINUATION };
                wire.extend(frame(j + 1 == parts, op, &p[lo..hi], Some(key)));
                if j + 1 < parts {
                    wire.extend(frame(true, OP_PING, b"hi", Some(key)));
                    want.push(Incoming::Ping(Bytes::from_static(b"hi")));
                }
            }
            want.push(Incoming::Binary(Bytes::from(p)));
        }
        let got = rt().block_on(read_all(wire, sizes, 1 << 20)).unwrap();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn bytes_read_by_the_handshake_come_first() {
    let wire = frame(true, OP_BINARY, b"abcdef", KEY);
    let (early, rest) = wire.split_at(5);
    let mut r = FrameReader::new(rest, BytesMut::from(early), 1 << 10, None);
    let got = rt().block_on(r.next()).unwrap();
    assert_eq!(got, Some(Incoming::Binary(Bytes::from_static(b"abcdef"))));
    assert!(rt().block_on(r.next()).unwrap().is_none());
}

#[test]
fn pongs_are_dropped_and_pings_and_closes_returned() {
    let mut wire = frame(true, OP_PONG, b"p", KEY);
    wire.extend(frame(true, OP_PING, b"", KEY));
    wire.extend(frame(true, OP_CLOSE, &[0x03, 0xe8, b'o', b'k'], KEY));
    wire.extend(frame(true, OP_CLOSE, &[], KEY));
    let got = rt().block_on(read_all(wire, vec![3], 1 << 10)).unwrap();
    assert_eq!(
        got,
        vec![
            Incoming::Ping(Bytes::new()),
            Incoming::Close(Some(1000)),
            Incoming::Close(None)
        ]
    );
}

/// What the reader says about `wire` (read in pieces of 5), or the messages before the end.
fn error_of(wire: Vec<u8>, max: usize) -> String {
    match rt().block_on(read_all(wire, vec![5], max)) {
        Err(e) => e,
        Ok(m) => format!("no error: {m:?}"),
    }
}

#[test]
fn every_broken_rule_is_an_error() {
    let ok = |op| frame(true, op, b"x", KEY);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (frame(true, OP_BINARY, b"x", None), "not masked"),
        (
            {
                let mut f = ok(OP_BINARY);
                f[0] |= 0x40;
                f
            },
            "reserved bits",
        ),
        (frame(true, 0x3, b"x", KEY), "unknown opcode"),
        (frame(true, 0xB, b"x", KEY), "unknown opcode"),
        (frame(false, OP_PING, b"x", KEY), "control frame"),
        (frame(true, OP_PING, &[0; 126], KEY), "control frame"),
        (frame(true, OP_CONTINUATION, b"x", KEY), "continuation"),
        (
            [frame(false, OP_BINARY, b"x", KEY), ok(OP_TEXT)].concat(),
            "inside a fragmented",
        ),
        (frame(true, OP_TEXT, &[0xff, 0xfe], KEY), "not UTF-8"),
        // A text message whose fragments split a character is fine; one left broken is not.
        (
            [
                frame(false, OP_TEXT, &[0xc3], KEY),
                frame(true, OP_CONTINUATION, &[0x28], KEY),
            ]
            .concat(),
            "not UTF-8",
        ),
        (frame(true, OP_CLOSE, &[0x03], KEY), "close frame"),
        (
            frame(true, OP_CLOSE, &1005u16.to_be_bytes(), KEY),
            "close frame",
        ),
        (
            frame(true, OP_CLOSE, &[0x03, 0xe8, 0xff], KEY),
            "close frame",
        ),
        (
            frame(true, OP_BINARY, &[7; 300], KEY)[..100].to_vec(),
            "inside a frame",
        ),
        (
            frame(true, OP_BINARY, &[7; 300_000], KEY)[..200_000].to_vec(),
            "inside a frame",
        ),
        (frame(false, OP_BINARY, b"x", KEY), "inside a frame"),
    ];
    for (wire, want) in cases {
        let e = error_of(wire.clone(), 1 << 20);
        assert!(e.contains(want), "{wire:02x?}: {e}");
    }
    let split = [
        frame(false, OP_TEXT, &[0xc3], KEY),
        frame(true, OP_CONTINUATION, &[0xa9], KEY),
    ]
    .concat();
    assert_eq!(
        rt().block_on(read_all(split, vec![5], 64)).unwrap(),
        vec![Incoming::Text("é".into())]
    );
}

#[test]
fn over_the_limit_is_refused_from_the_header() {
    // Only the header is there: the refusal cannot have waited for the payload.
    let head = frame(true, OP_BINARY, &[0; 2000], KEY)[..8].to_vec();
    assert_eq!(error_of(head, 1000), "Message too long: 2000 > 1000");
    // Fragments together over the limit.
    let wire = [
        frame(false, OP_BINARY, &[0; 600], KEY),
        frame(true, OP_CONTINUATION, &[0; 600], KEY),
    ]
    .concat();
    assert_eq!(error_of(wire, 1000), "Message too long: 1200 > 1000");
    // A 64-bit length past usize on any target.
    let mut huge = vec![0x82, 0xFF];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    huge.extend_from_slice(&[0; 4]);
    assert!(error_of(huge, 1000).starts_with("Message too long"));
}

#[test]
fn unmask_equals_the_bytewise_definition() {
    for n in [0, 1, 7, 8, 9, 63, 64, 65, 1000] {
        for key in [[0, 0, 0, 0], [1, 2, 3, 4], [0xff, 0, 0x80, 0x11]] {
            let p = bytes_of(n, 9);
            let mut got = p.clone();
            unmask(&mut got, key);
            let want: Vec<u8> = p.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            assert_eq!(got, want, "n {n} key {key:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Any bytes at all: messages or an error, never a panic, and never more than `max` bytes
    /// in a message.
    #[test]
    fn arbitrary_bytes_never_panic(wire in prop::collection::vec(any::<u8>(), 0..600), max in 1usize..300) {
        let got = rt().block_on(read_all(wire, vec![3, 50], max));
        for m in got.unwrap_or_default() {
            let n = match m {
                Incoming::Text(t) => t.len(),
                Incoming::Binary(b) | Incoming::Ping(b) => b.len(),
                Incoming::Close(_) => 0,
            };
            prop_assert!(n <= max);
        }
    }
}

#[test]
fn large_payloads_are_read_into_pool_buffers_that_come_back() {
    let pool = Arc::new(BufferPool::default());
    let p = bytes_of(READ_AHEAD * 3, 5);
    let mut wire = frame(true, OP_BINARY, &p, KEY);
    // A fragmented one too: its first fragment's buffer goes back at once.
    wire.extend(frame(false, OP_BINARY, &p, KEY));
    wire.extend(frame(true, OP_CONTINUATION, b"tail", KEY));
    let mut r = FrameReader::new(&wire[..], BytesMut::new(), 1 << 20, Some(Arc::clone(&pool)));
    let first = rt().block_on(r.next()).unwrap().unwrap();
    assert_eq!(first, Incoming::Binary(Bytes::from(p.clone())));
    assert_eq!(pool.spare(), 0, "held by the message");
    let Incoming::Binary(b) = first else {
        unreachable!()
    };
    let slice = b.slice(10..20);
    drop(b);
    assert_eq!(pool.spare(), 0, "held by a slice");
    drop(slice);
    assert_eq!(pool.spare(), 1, "back in the pool");
    // The next large payload reuses it.
    let second = rt().block_on(r.next()).unwrap().unwrap();
    let Incoming::Binary(b) = second else {
        panic!("{second:?}")
    };
    assert_eq!(&b[..p.len()], &p[..]);
    assert_eq!(&b[p.len()..], b"tail");
    assert_eq!(pool.spare(), 1, "the fragment's buffer went back");
}

/// Records how many bytes each read may return.
struct Asked<'a> {
    data: &'a [u8],
    asked: Vec<usize>,
}

impl AsyncRead for Asked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        self.asked.push(room);
        let n = room.min(self.data.len());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

#[test]
fn after_a_large_payload_the_next_header_is_read_alone() {
    let big = bytes_of(READ_AHEAD * 2, 1);
    let mut wire = frame(true, OP_BINARY, &big, KEY);
    wire.extend(frame(true, OP_BINARY, &big, KEY));
    wire.extend(frame(true, OP_BINARY, b"small", KEY));
    let asked = Asked {
        data: &wire,
        asked: Vec::new(),
    };
    let mut r = FrameReader::new(asked, BytesMut::new(), 1 << 20, None);
    for want in [&big[..], &big[..], b"small"] {
        let got = rt().block_on(r.next()).unwrap();
        assert_eq!(got, Some(Incoming::Binary(Bytes::copy_from_slice(want))));
    }
    // Read ahead for the first header, then the rest of its payload; the second header alone
    // (14 bytes), its payload; the third header alone, then its small payload read ahead.
    let asked = &r.io.asked;
    assert!(asked[0] >= READ_AHEAD, "{asked:?}");
    let headers: Vec<usize> = asked.iter().copied().filter(|&n| n == MAX_HEADER).collect();
    assert_eq!(headers.len(), 2, "{asked:?}");
}
