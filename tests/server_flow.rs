//! Producer flow control over real sockets (docs/DESIGN.md section 5.6): a producer sees an
//! `ingest_backpressure` `on` notice before its first refusal (aligner full, engine full), BULK
//! is shed with a notice while other classes get a retryable `overloaded` error, and the `off`
//! notice follows when the pressure is gone; `hello` sizes its own send queues (`send_queue`).

mod server_util;

use std::time::Duration;

use fusion_engine::client::{Client, Event};
use fusion_engine::engine::{DeviceSpec, EngineConfig, Priority};
use server_util::*;

/// What a producer saw, in order: `on`/`off` notices, errors (code, retry) and sheds.
#[derive(Debug, PartialEq)]
enum Seen {
    On(f64),
    Off,
    Error(String, bool),
    Shed,
}

async fn collect(c: &mut Client, until: impl Fn(&[Seen]) -> bool, secs: f64) -> Vec<Seen> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    while !until(&seen) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = match tokio::time::timeout(left, c.next_event()).await {
            Ok(Some(ev)) => ev,
            _ => panic!("no more events; seen so far: {seen:?}"),
        };
        match ev {
            Event::Control(v) if v["kind"] == "ingest_backpressure" => {
                if v["state"] == "on" {
                    seen.push(Seen::On(v["fill"].as_f64().unwrap()));
                } else {
                    assert_eq!(v["state"], "off", "{v}");
                    seen.push(Seen::Off);
                }
            }
            Event::Control(v) if v["kind"] == "shed" => seen.push(Seen::Shed),
            Event::Error { code, raw, .. } => {
                seen.push(Seen::Error(code, raw["retry"].as_bool().unwrap()))
            }
            Event::Closed { code, reason } => panic!("closed {code:?} {reason}"),
            _ => {}
        }
    }
    seen
}

fn count(seen: &[Seen], f: impl Fn(&Seen) -> bool) -> usize {
    seen.iter().filter(|s| f(s)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligner_saturation_notice_comes_before_refusals_then_off() {
    let head = small_head();
    let mut cfg = config();
    cfg.max_open_samples = 50;
    cfg.align_timeout = Duration::from_millis(1500);
    let (server, url) = start(head.clone(), cfg).await;
    let mut p = Client::connect(&url, None).await.unwrap();
    let x = features(24, 1);
    // 80 IMPORTANT samples with only their first modality: they stay open in the aligner.
    for k in 0..80 {
        p.produce(
            "s",
            &format!("k{k}"),
            "vision",
            &x,
            Priority::Important,
            false,
        )
        .await
        .unwrap();
    }
    let seen = collect(
        &mut p,
        |s| count(s, |e| matches!(e, Seen::Error(..))) == 30,
        10.0,
    )
    .await;
    let Some(Seen::On(fill)) = seen.first() else {
        panic!("the first thing the producer saw was not the `on` notice: {seen:?}")
    };
    assert!(*fill > 0.7 && *fill <= 1.0, "fill {fill}");
    assert_eq!(count(&seen, |e| matches!(e, Seen::On(_))), 1, "{seen:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|e| *e == Seen::Error("overloaded".into(), true)),
        "{seen:?}"
    );
    // BULK while still saturated: shed with a notice, no second `on`.
    for k in 0..5 {
        p.produce("s", &format!("b{k}"), "vision", &x, Priority::Bulk, false)
            .await
            .unwrap();
    }
    let seen = collect(&mut p, |s| count(s, |e| *e == Seen::Shed) == 5, 10.0).await;
    assert_eq!(seen.len(), 5, "only the 5 sheds: {seen:?}");
    // The open samples are fused at align_timeout; the aligner empties and `off` follows.
    let seen = collect(&mut p, |s| s.contains(&Seen::Off), 10.0).await;
    assert_eq!(seen, vec![Seen::Off]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_saturation_notice_comes_before_refusals() {
    let head = small_head();
    let mut cfg = config();
    cfg.engine =
        EngineConfig::with_devices(DeviceSpec::parse_list("cpu:threads=1:delay=300ms").unwrap());
    cfg.engine.max_pending = Some(2);
    cfg.engine.max_in_flight = 1;
    cfg.max_batch = 1;
    let (server, url) = start(head.clone(), cfg).await;
    let mut p = Client::connect(&url, None).await.unwrap();
    let xs = [features(24, 1), features(16, 2), features(8, 3)];
    let names = ["vision", "text", "audio"];
    for k in 0..12 {
        for (m, x) in names.iter().zip(&xs) {
            let prio = if k % 2 == 0 {
                Priority::Critical
            } else {
                Priority::Bulk
            };
            p.produce("s", &format!("k{k}"), m, x, prio, *m == "audio")
                .await
                .unwrap();
        }
    }
    // 2 batches admitted, the other 10 samples refused (CRITICAL ones with a retryable error,
    // BULK ones shed; which ones depends on how the frames fell into batches), all after the
    // notice.
    let seen = collect(
        &mut p,
        |s| count(s, |e| matches!(e, Seen::Error(..) | Seen::Shed)) >= 10,
        10.0,
    )
    .await;
    assert!(matches!(seen.first(), Some(Seen::On(_))), "{seen:?}");
    assert_eq!(count(&seen, |e| matches!(e, Seen::On(_))), 1, "{seen:?}");
    let sheds = count(&seen, |e| *e == Seen::Shed);
    let errors = count(&seen, |e| *e == Seen::Error("overloaded".into(), true));
    assert_eq!((sheds + errors, seen.len()), (10, 11), "{seen:?}");
    assert!((4..=6).contains(&sheds), "{seen:?}");
    let seen = collect(&mut p, |s| s.contains(&Seen::Off), 10.0).await;
    assert_eq!(seen, vec![Seen::Off]);
    server.shutdown().await;
}

/// Reads until a CONTROL message of `ty` arrives.
async fn control_of(c: &mut Client, ty: &str) -> serde_json::Value {
    loop {
        if let Event::Control(v) = next(c, 10.0).await {
            if v["type"] == ty {
                return v;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_asks_for_send_queue_sizes_capped_by_max_send_queue() {
    let h = small_head();
    let mut cfg = config();
    cfg.max_send_queue = 8000;
    let (s, url) = start(h, cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    let hello = r#"{"type":"hello","version":2,"results":"binary","send_queue":{"important":5000,"bulk":1000000000}}"#;
    c.send_text(hello.into()).await.unwrap();
    let w = control_of(&mut c, "welcome").await;
    let q = &w["limits"]["send_queue"];
    assert_eq!(q["important"], 5000, "{w}");
    assert_eq!(q["bulk"], 8000, "capped at max_send_queue: {w}");
    assert_eq!(
        q["critical"],
        config().send_queue.critical as u64,
        "not asked: {w}"
    );
    assert_eq!(w["limits"]["max_send_queue"], 8000);
    // A bad one is refused and changes nothing; the connection goes on.
    let bad = r#"{"type":"hello","version":2,"results":"binary","send_queue":{"important":0}}"#;
    c.send_text(bad.into()).await.unwrap();
    let (code, e) = next_error(&mut c).await;
    assert_eq!(code, "malformed", "{e}");
    c.send_text(r#"{"type":"hello","version":2,"results":"binary"}"#.into())
        .await
        .unwrap();
    let w = control_of(&mut c, "welcome").await;
    assert_eq!(w["limits"]["send_queue"]["important"], 5000, "kept: {w}");
    c.close().await;
    s.shutdown().await;
}
