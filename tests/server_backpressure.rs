//! Delivery under pressure, over real sockets: strict priority order, drop accounting that
//! matches the gaps a client sees, a stalled subscriber closed with 1013 (naming the last
//! delivered seq) while a fast one keeps full speed, and bounded memory under a produce flood.
//! A "stalled" peer is a raw WebSocket that stops polling its socket.

mod server_util;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use fusion_engine::client::{Client, Event};
use fusion_engine::engine::Priority;
use fusion_engine::server::codec::decode_result;
use server_util::*;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A big-D head (32 KiB results) so a few hundred results fill the socket buffers.
fn wide_head() -> std::sync::Arc<fusion_engine::model::FusionHead> {
    head(&[("a", 4)], 8192, 11)
}

async fn raw_subscriber(url: &str, stream: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text(
        r#"{"type":"hello","version":1,"results":"binary"}"#,
    ))
    .await
    .unwrap();
    ws.send(Message::text(format!(
        r#"{{"type":"subscribe","stream":"{stream}"}}"#
    )))
    .await
    .unwrap();
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            if t.contains("\"ack\"") {
                return ws;
            }
        }
    }
}

#[derive(Default, Debug)]
struct Seen {
    results: Vec<(u64, Priority)>,
    dropped: Vec<(u64, u64)>,
    close: Option<(u16, String)>,
}

/// Reads until `done(&seen)` or the close, within `secs`.
async fn read_all(ws: &mut Ws, secs: u64, done: impl Fn(&Seen) -> bool) -> Seen {
    let mut s = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done(&s) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(m) = tokio::time::timeout(left, ws.next()).await else {
            panic!("timed out: {s:?}")
        };
        match m {
            Some(Ok(Message::Binary(b))) => {
                let r = decode_result(&b).unwrap();
                s.results.push((r.seq, r.priority));
            }
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["kind"] == "dropped" {
                    for r in v["ranges"].as_array().unwrap() {
                        s.dropped
                            .push((r[0].as_u64().unwrap(), r[1].as_u64().unwrap()));
                    }
                }
            }
            Some(Ok(Message::Close(f))) => {
                s.close = f.map(|f| (u16::from(f.code), f.reason.to_string()));
                break;
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    s
}

async fn produce_n(
    p: &Client,
    stream: &str,
    n: usize,
    prio: impl Fn(usize) -> Priority,
    from: usize,
) {
    let x = [0.5f32, -0.25, 1.0, 0.125];
    for i in from..from + n {
        p.produce(stream, &format!("k{i}"), "a", &x, prio(i), true)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_priority_order_when_a_queue_builds_up() {
    let mut cfg = config();
    cfg.send_queue.critical = 3000;
    cfg.send_queue.important = 3000;
    cfg.send_queue.bulk = 3000;
    cfg.send_timeout = Duration::from_secs(20);
    cfg.slow_send = Duration::from_secs(10);
    let (s, url) = start(wide_head(), cfg).await;
    let mut sub = raw_subscriber(&url, "p").await;
    let p = Client::connect(&url, None).await.unwrap();
    produce_n(&p, "p", 600, |_| Priority::Bulk, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce_n(&p, "p", 600, |_| Priority::Critical, 600).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = read_all(&mut sub, 30, |s| s.results.len() >= 1200).await;
    assert!(seen.dropped.is_empty());
    // Every critical result overtook the bulk ones still queued when it arrived: some critical
    // was delivered before a bulk result with a smaller seq.
    let first_crit = seen
        .results
        .iter()
        .position(|r| r.1 == Priority::Critical)
        .unwrap();
    let last_bulk = seen
        .results
        .iter()
        .rposition(|r| r.1 == Priority::Bulk)
        .unwrap();
    assert!(
        first_crit < last_bulk,
        "no overtaking: {first_crit} {last_bulk}"
    );
    // Once criticals flow, no bulk result comes in between them.
    let crit_end = seen
        .results
        .iter()
        .rposition(|r| r.1 == Priority::Critical)
        .unwrap();
    assert!(seen.results[first_crit..=crit_end]
        .iter()
        .all(|r| r.1 == Priority::Critical));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_accounting_matches_the_gaps_a_client_sees() {
    let mut cfg = config();
    cfg.send_queue.critical = 100;
    cfg.send_queue.important = 50;
    cfg.send_queue.bulk = 50;
    cfg.send_timeout = Duration::from_secs(20);
    cfg.slow_send = Duration::from_secs(10);
    let (s, url) = start(wide_head(), cfg).await;
    let mut sub = raw_subscriber(&url, "d").await;
    let p = Client::connect(&url, None).await.unwrap();
    let n = 900u64;
    produce_n(
        &p,
        "d",
        n as usize,
        |i| {
            if i % 3 == 0 {
                Priority::Important
            } else {
                Priority::Bulk
            }
        },
        0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let accounted = |s: &Seen| {
        s.results.len() as u64 + s.dropped.iter().map(|r| r.1 - r.0 + 1).sum::<u64>() >= n
    };
    let seen = read_all(&mut sub, 30, accounted).await;
    let got: BTreeSet<u64> = seen.results.iter().map(|r| r.0).collect();
    assert_eq!(got.len(), seen.results.len(), "a seq was delivered twice");
    let mut all = got.clone();
    for (a, b) in &seen.dropped {
        for q in *a..=*b {
            assert!(all.insert(q), "seq {q} both delivered and reported dropped");
        }
    }
    assert_eq!(all, (1..=n).collect::<BTreeSet<u64>>());
    assert!(!seen.dropped.is_empty(), "the queues never overflowed");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_closed_1013_while_a_fast_one_keeps_up() {
    let mut cfg = config();
    cfg.send_timeout = Duration::from_millis(300);
    cfg.close_linger = Duration::from_secs(10);
    let (s, url) = start(wide_head(), cfg).await;
    let mut stalled = raw_subscriber(&url, "c").await;
    let mut fast = raw_subscriber(&url, "c").await;
    let p = Client::connect(&url, None).await.unwrap();
    let n = 1500usize;
    let t0 = Instant::now();
    let prod = async {
        for chunk in 0..(n / 100) {
            produce_n(&p, "c", 100, |_| Priority::Critical, chunk * 100).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (_, fast_seen) = tokio::join!(prod, read_all(&mut fast, 30, |s| s.results.len() >= n));
    let fast_time = t0.elapsed();
    assert_eq!(fast_seen.results.len(), n);
    assert!(fast_seen.close.is_none() && fast_seen.dropped.is_empty());
    assert!(fast_time < Duration::from_secs(10), "{fast_time:?}");
    // The stalled one reads now: everything up to the close, then 1013 naming its last seq.
    let seen = read_all(&mut stalled, 30, |_| false).await;
    let (code, reason) = seen.close.clone().expect("a close frame");
    assert_eq!(code, 1013, "{reason}");
    let last: u64 = reason.rsplit("last_seq=").next().unwrap().parse().unwrap();
    let got: Vec<u64> = seen.results.iter().map(|r| r.0).collect();
    // No CRITICAL result lost without the close naming it: 1..=last all arrived, in order.
    assert_eq!(got, (1..=last).collect::<Vec<u64>>(), "{reason}");
    assert!((last as usize) < n);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_flood_is_refused_not_buffered() {
    let mut cfg = config();
    cfg.max_open_samples = 50;
    cfg.align_timeout = Duration::from_secs(10);
    let (s, url) = start(small_head(), cfg).await;
    let mut p = Client::connect(&url, None).await.unwrap();
    let x = features(16, 1);
    for i in 0..200 {
        let prio = if i % 2 == 0 {
            Priority::Important
        } else {
            Priority::Bulk
        };
        p.produce("f", &format!("k{i}"), "text", &x, prio, false)
            .await
            .unwrap();
    }
    let (mut overloaded, mut shed) = (0, 0);
    while overloaded + shed < 150 {
        match next(&mut p, 5.0).await {
            Event::Error { code, raw, .. } => {
                assert_eq!(code, "overloaded");
                assert_eq!(raw["retry"], true);
                overloaded += 1;
            }
            Event::Control(v) if v["kind"] == "shed" => shed += 1,
            e => panic!("{e:?}"),
        }
    }
    assert!(overloaded > 0 && shed > 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), p.next_event())
            .await
            .is_err()
    );
    s.shutdown().await;
}
