//! Delivery under pressure, over real sockets: strict priority order, drop accounting that
//! matches the gaps a client sees, a stalled subscriber closed with 1013 (naming the last
//! delivered seq) while a fast one keeps full speed, bounded memory under a produce flood, a
//! single-class flow that gets BACKPRESSURE before any drop, and BULK conflation.
//! A "stalled" peer is a raw WebSocket that stops polling its socket.

mod server_util;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use fusion_engine::client::{Client, Event};
use fusion_engine::engine::Priority;
use fusion_engine::protocol::decode_result;
use server_util::*;

#[derive(Default, Debug)]
struct Seen {
    results: Vec<(u64, Priority)>,
    /// (key, stream seq) of each result, in delivery order.
    keys: Vec<(String, u64)>,
    dropped: Vec<(u64, u64)>,
    /// `backpressure` and `dropped` notices, in order.
    notices: Vec<serde_json::Value>,
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
                s.keys.push((r.key, r.stream_seq));
            }
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["kind"] == "dropped" || v["kind"] == "backpressure" {
                    s.notices.push(v.clone());
                }
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

/// Waits until `reference` (a subscriber that keeps up) got `n` more results.
async fn fanned_out(reference: &mut Client, n: usize) {
    let mut got = 0;
    while got < n {
        match next(reference, 20.0).await {
            Event::Result(_) => got += 1,
            // The reference's own queue may pass 70% while a burst is fanned out.
            Event::Control(v) if v["kind"] == "backpressure" => {}
            e => panic!("{e:?}"),
        }
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
    // A subscriber that reads everything tells when all results are queued (a slow debug
    // engine under a loaded machine must not make criticals and bulks arrive interleaved).
    let mut reference = Client::connect(&url, None).await.unwrap();
    reference.subscribe("p").await.unwrap();
    let p = Client::connect(&url, None).await.unwrap();
    produce_n(&p, "p", 600, |_| Priority::Bulk, 0).await;
    fanned_out(&mut reference, 600).await;
    produce_n(&p, "p", 600, |_| Priority::Critical, 600).await;
    fanned_out(&mut reference, 600).await;
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
    assert_accounted(&seen, n);
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
    // Results of the send in progress at the close may have arrived too (PROTOCOL 7.3), so a
    // few more may follow, still without a gap.
    assert!(got.len() as u64 >= last, "{reason}: got {got:?}");
    assert_eq!(
        got,
        (1..=got.len() as u64).collect::<Vec<u64>>(),
        "{reason}"
    );
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
    let (mut overloaded, mut shed, mut warned) = (0, 0, 0);
    while overloaded + shed < 150 {
        match next(&mut p, 5.0).await {
            Event::Error { code, raw, .. } => {
                assert_eq!(code, "overloaded");
                assert_eq!(raw["retry"], true);
                overloaded += 1;
            }
            Event::Control(v) if v["kind"] == "shed" => shed += 1,
            Event::Control(v) if v["kind"] == "ingest_backpressure" => {
                assert_eq!(v["state"], "on", "{v}");
                assert_eq!(overloaded + shed, 0, "the notice comes before any refusal");
                warned += 1;
            }
            e => panic!("{e:?}"),
        }
    }
    assert!(overloaded > 0 && shed > 0);
    assert_eq!(
        warned, 1,
        "one ingest_backpressure notice before the refusals"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), p.next_event())
            .await
            .is_err()
    );
    s.shutdown().await;
}

/// Every seq 1..=n delivered or named in a `dropped` notice, and not both.
fn assert_accounted(seen: &Seen, n: u64) {
    let got: BTreeSet<u64> = seen.results.iter().map(|r| r.0).collect();
    assert_eq!(got.len(), seen.results.len(), "a seq was delivered twice");
    let mut all = got;
    for (a, b) in &seen.dropped {
        for q in *a..=*b {
            assert!(all.insert(q), "seq {q} both delivered and reported dropped");
        }
    }
    assert_eq!(all, (1..=n).collect::<BTreeSet<u64>>());
}

fn patient(mut cfg: fusion_engine::server::ServerConfig) -> fusion_engine::server::ServerConfig {
    cfg.send_timeout = Duration::from_secs(20);
    cfg.slow_send = Duration::from_secs(10);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_class_flow_gets_backpressure_before_any_drop() {
    // Default queues: IMPORTANT 300 of 1000 data slots, so IMPORTANT alone never passes 70% of
    // the total; the IMPORTANT queue's own fill must raise BACKPRESSURE.
    let cap = config().send_queue.important as u64;
    assert_eq!(cap, 300);
    let (s, url) = start(wide_head(), patient(config())).await;
    let mut sub = raw_subscriber(&url, "b").await;
    let mut reference = Client::connect(&url, None).await.unwrap();
    reference.subscribe("b").await.unwrap();
    let p = Client::connect(&url, None).await.unwrap();
    let n = 1500u64;
    // In chunks the reference keeps up with (its own IMPORTANT queue must not overflow); every
    // result is fanned out (the reference got them all) before the stalled one reads.
    for c in 0..(n as usize / 100) {
        produce_n(&p, "b", 100, |_| Priority::Important, c * 100).await;
        fanned_out(&mut reference, 100).await;
    }
    let accounted = |s: &Seen| {
        s.results.len() as u64 + s.dropped.iter().map(|r| r.1 - r.0 + 1).sum::<u64>() >= n
    };
    let seen = read_all(&mut sub, 60, accounted).await;
    assert_accounted(&seen, n);
    assert!(
        !seen.dropped.is_empty(),
        "the IMPORTANT queue never overflowed"
    );
    let first = &seen.notices[0];
    assert_eq!(
        (&first["kind"], &first["state"], &first["class"]),
        (&"backpressure".into(), &"on".into(), &"important".into()),
        "{:?}",
        seen.notices
    );
    assert_eq!(first["class_capacity"], cap);
    assert!(first["class_queued"].as_u64().unwrap() > cap * 7 / 10);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflation_keeps_the_newest_per_key_and_announces_the_rest() {
    let (s, url) = start(wide_head(), patient(config())).await;
    let sub = r#"{"type":"subscribe","stream":"v","conflate":"key"}"#;
    let mut live_view = raw_subscriber_with(&url, 2, sub).await;
    let mut reference = Client::connect(&url, None).await.unwrap();
    reference.subscribe("v").await.unwrap();
    let p = Client::connect(&url, None).await.unwrap();
    let (keys, rounds) = (5usize, 300usize);
    let n = (keys * rounds) as u64;
    // The newest stream seq of each key, from a subscriber that reads everything (paced per
    // round so that its own BULK queue never fills).
    let mut newest = std::collections::HashMap::new();
    for r in 0..rounds {
        for k in 0..keys {
            let x = [r as f32, k as f32, 0.5, -1.0];
            p.produce("v", &format!("key{k}"), "a", &x, Priority::Bulk, true)
                .await
                .unwrap();
        }
        let mut got = 0;
        while got < keys {
            match next(&mut reference, 20.0).await {
                Event::Result(r) => {
                    let e = newest.entry(r.key.clone()).or_insert(0);
                    *e = r.stream_seq.max(*e);
                    got += 1;
                }
                e => panic!("{e:?}"),
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let accounted = |s: &Seen| {
        s.results.len() as u64 + s.dropped.iter().map(|r| r.1 - r.0 + 1).sum::<u64>() >= n
    };
    let seen = read_all(&mut live_view, 60, accounted).await;
    assert_accounted(&seen, n);
    let conflated: u64 = seen
        .notices
        .iter()
        .filter(|v| v["kind"] == "dropped" && v["reason"] == "conflated")
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert!(conflated > 0, "nothing was conflated: {:?}", seen.notices);
    assert!(seen
        .notices
        .iter()
        .all(|v| v["kind"] != "dropped" || v["class"] == "bulk"));
    // The last result delivered for each key is its newest.
    let mut last = std::collections::HashMap::new();
    for (k, q) in &seen.keys {
        last.insert(k.clone(), *q);
    }
    assert_eq!(last, newest);
    s.shutdown().await;
}
