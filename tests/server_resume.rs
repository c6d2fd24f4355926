//! Resume with replay over real sockets (docs/PROTOCOL.md 7.4): a subscriber that goes away while
//! results of every class keep flowing gets each CRITICAL and IMPORTANT result it missed exactly
//! once, in stream seq order, then live results without a gap or a duplicate; a resume point
//! older than the buffer gets `unrecoverable` naming the exact range; a wrong epoch too.

mod server_util;

use std::collections::BTreeMap;
use std::time::Duration;

use fusion_engine::client::{Client, Event, FuseResult, ResumePoint, SubscribeOptions};
use fusion_engine::engine::Priority;
use server_util::*;

fn prio(i: usize) -> Priority {
    [Priority::Critical, Priority::Important, Priority::Bulk][i % 3]
}

async fn produce(
    p: &Client,
    stream: &str,
    range: std::ops::Range<usize>,
    prio: fn(usize) -> Priority,
) {
    for i in range {
        let x = features(16, i as u64);
        p.produce(stream, &format!("k{i}"), "text", &x, prio(i), true)
            .await
            .unwrap();
    }
}

/// Reads `n` results (panics on a close); control messages are returned alongside.
async fn results(c: &mut Client, n: usize) -> (Vec<FuseResult>, Vec<serde_json::Value>) {
    let (mut rs, mut ctl) = (Vec::new(), Vec::new());
    while rs.len() < n {
        match next(c, 10.0).await {
            Event::Result(r) => rs.push(r),
            Event::Control(v) => ctl.push(v),
            e => panic!("{e:?} after {} results", rs.len()),
        }
    }
    (rs, ctl)
}

/// The stream seqs of `rs` of class `p`.
fn seqs(rs: &[FuseResult], p: Priority) -> Vec<u64> {
    rs.iter()
        .filter(|r| r.priority == p)
        .map(|r| r.stream_seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_critical_and_important_results_are_replayed_once_in_order() {
    let (s, url) = start(small_head(), config()).await;
    let mut reference = Client::connect(&url, None).await.unwrap();
    reference.subscribe("r").await.unwrap();
    let mut a = Client::connect(&url, None).await.unwrap();
    a.subscribe("r").await.unwrap();
    let epoch = a.welcome().epoch;
    assert!(epoch > 0 && epoch < 1 << 53);
    let p = Client::connect(&url, None).await.unwrap();

    produce(&p, "r", 0..30, prio).await;
    let (before, _) = results(&mut a, 30).await;
    let (ref_before, _) = results(&mut reference, 30).await;
    let mut all: Vec<u64> = before.iter().map(|r| r.stream_seq).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=30).collect::<Vec<u64>>());
    let point = a.resume_point("r").unwrap();
    assert_eq!(point.epoch, epoch);
    let max = |p| {
        ref_before
            .iter()
            .filter(|r| r.priority == p)
            .map(|r| r.stream_seq)
            .max()
    };
    assert_eq!(Some(point.critical), max(Priority::Critical));
    assert_eq!(Some(point.important), max(Priority::Important));

    // Away: 60 more results of all classes.
    a.disconnect().await;
    produce(&p, "r", 30..90, prio).await;
    let (away, _) = results(&mut reference, 60).await;
    assert!(away.iter().all(|r| r.stream_seq > 30 && !r.replayed));

    a.reconnect().await.unwrap();
    // Live again, then read until every expected result is in.
    produce(&p, "r", 90..120, prio).await;
    let (live, _) = results(&mut reference, 30).await;
    let missed: Vec<&FuseResult> = away
        .iter()
        .filter(|r| r.priority != Priority::Bulk)
        .collect();
    let (got, ctl) = results(&mut a, missed.len() + live.len()).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.next_event())
            .await
            .is_err(),
        "more results than expected"
    );
    assert!(
        ctl.iter()
            .all(|v| v["kind"] != "unrecoverable" && v["kind"] != "dropped"),
        "{ctl:?}"
    );
    // The replayed ones: exactly the missed CRITICAL and IMPORTANT, same values.
    let replayed: Vec<&FuseResult> = got.iter().filter(|r| r.replayed).collect();
    let want: BTreeMap<u64, &FuseResult> = missed.iter().map(|r| (r.stream_seq, *r)).collect();
    let have: BTreeMap<u64, &FuseResult> = replayed.iter().map(|r| (r.stream_seq, *r)).collect();
    assert_eq!(have.len(), replayed.len(), "a replay was duplicated");
    assert_eq!(
        have.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (q, r) in &have {
        let w = want[q];
        assert_eq!(
            (&r.key, r.priority, &r.fused, &r.weights),
            (&w.key, w.priority, &w.fused, &w.weights)
        );
    }
    // Live ones: all 30 (every class), not marked replayed, none duplicated.
    let mut live_got: Vec<u64> = got
        .iter()
        .filter(|r| !r.replayed)
        .map(|r| r.stream_seq)
        .collect();
    live_got.sort_unstable();
    assert_eq!(live_got, (91..=120).collect::<Vec<u64>>());
    // Per class, replay then live, in stream seq order without a gap in what was expected.
    for c in [Priority::Critical, Priority::Important] {
        let order = seqs(&got, c);
        let mut expect: Vec<u64> = seqs(&away, c);
        expect.extend(seqs(&live, c));
        expect.sort_unstable();
        assert_eq!(order, expect, "{c:?}");
    }
    let point = a.resume_point("r").unwrap();
    assert_eq!(
        point.critical,
        seqs(&live, Priority::Critical).into_iter().max().unwrap()
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_older_than_the_buffer_gets_the_exact_unrecoverable_range() {
    let mut cfg = config();
    cfg.replay_messages = 10;
    let (s, url) = start(small_head(), cfg).await;
    let mut a = Client::connect(&url, None).await.unwrap();
    a.subscribe("u").await.unwrap();
    let mut watcher = Client::connect(&url, None).await.unwrap();
    watcher.subscribe("u").await.unwrap();
    let p = Client::connect(&url, None).await.unwrap();
    let important = |_: usize| Priority::Important;
    produce(&p, "u", 0..3, important).await;
    results(&mut a, 3).await;
    a.disconnect().await;
    // 40 more IMPORTANT (stream seqs 4..=43) while away.
    produce(&p, "u", 3..43, important).await;
    // The watcher stayed: once it has all 43, the buffer holds the last 10 (34..=43).
    let (w, _) = results(&mut watcher, 43).await;
    assert_eq!(w.last().map(|r| r.stream_seq), Some(43));

    a.reconnect().await.unwrap();
    let (got, ctl) = results(&mut a, 10).await;
    let unrec: Vec<&serde_json::Value> = ctl
        .iter()
        .filter(|v| v["kind"] == "unrecoverable")
        .collect();
    assert_eq!(unrec.len(), 1, "{ctl:?}");
    let u = unrec[0];
    assert_eq!(
        (
            u["stream"].as_str(),
            u["class"].as_str(),
            u["first"].as_u64(),
            u["last"].as_u64(),
            u["reason"].as_str()
        ),
        (
            Some("u"),
            Some("important"),
            Some(4),
            Some(33),
            Some("evicted")
        )
    );
    let order: Vec<u64> = got.iter().map(|r| r.stream_seq).collect();
    assert_eq!(order, (34..=43).collect::<Vec<u64>>());
    assert!(got.iter().all(|r| r.replayed));
    // The point moved past the unrecoverable range and the replay.
    assert_eq!(a.resume_point("u").unwrap().important, 43);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_epoch_gets_unrecoverable_then_the_whole_buffer() {
    let (s, url) = start(small_head(), config()).await;
    let mut w = Client::connect(&url, None).await.unwrap();
    w.subscribe("e").await.unwrap();
    let p = Client::connect(&url, None).await.unwrap();
    produce(&p, "e", 0..6, prio).await;
    let (ref_rs, _) = results(&mut w, 6).await;
    let epoch = w.welcome().epoch;

    let mut c = Client::connect(&url, None).await.unwrap();
    let stale = ResumePoint {
        epoch: epoch ^ 1,
        critical: 40,
        important: 41,
    };
    let opts = SubscribeOptions {
        resume: Some(stale),
        conflate: None,
    };
    c.subscribe_with("e", opts).await.unwrap();
    let (got, ctl) = results(&mut c, 4).await;
    let unrec: Vec<(String, u64, bool)> = ctl
        .iter()
        .filter(|v| v["kind"] == "unrecoverable")
        .map(|v| {
            assert_eq!(v["reason"], "epoch");
            (
                v["class"].as_str().unwrap().to_string(),
                v["first"].as_u64().unwrap(),
                v["last"].is_null(),
            )
        })
        .collect();
    assert_eq!(
        unrec,
        vec![
            ("critical".to_string(), 41, true),
            ("important".to_string(), 42, true)
        ]
    );
    // The new epoch's buffer from its start: the 4 CRITICAL/IMPORTANT results, not the BULK.
    let mut want: Vec<u64> = ref_rs
        .iter()
        .filter(|r| r.priority != Priority::Bulk)
        .map(|r| r.stream_seq)
        .collect();
    want.sort_unstable();
    let mut have: Vec<u64> = got.iter().map(|r| r.stream_seq).collect();
    have.sort_unstable();
    assert_eq!(have, want);
    assert!(got.iter().all(|r| r.replayed));
    let point = c.resume_point("e").unwrap();
    assert_eq!(point.epoch, epoch);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_resume_while_results_keep_flowing_loses_and_repeats_nothing() {
    let (s, url) = start(small_head(), config()).await;
    let mut reference = Client::connect(&url, None).await.unwrap();
    reference.subscribe("f").await.unwrap();
    let mut a = Client::connect(&url, None).await.unwrap();
    a.subscribe("f").await.unwrap();
    let p = Client::connect(&url, None).await.unwrap();
    let n = 600usize;
    let producer = tokio::spawn(async move {
        for chunk in 0..n / 20 {
            produce(&p, "f", chunk * 20..chunk * 20 + 20, prio).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        p
    });
    let mut got: Vec<FuseResult> = Vec::new();
    // Two disconnect/resume cycles in the middle of the flow.
    for round in 0..2 {
        while got.len() < 100 * (round + 1) {
            if let Event::Result(r) = next(&mut a, 10.0).await {
                got.push(r);
            }
        }
        a.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.reconnect().await.unwrap();
    }
    let _p = producer.await.unwrap();
    let (all, _) = results(&mut reference, n).await;
    let want: BTreeMap<u64, &FuseResult> = all
        .iter()
        .filter(|r| r.priority != Priority::Bulk)
        .map(|r| (r.stream_seq, r))
        .collect();
    let have_ci = |got: &[FuseResult]| got.iter().filter(|r| r.priority != Priority::Bulk).count();
    while have_ci(&got) < want.len() {
        match next(&mut a, 10.0).await {
            Event::Result(r) => got.push(r),
            Event::Control(v) => assert_ne!(v["kind"], "unrecoverable", "{v}"),
            e => panic!("{e:?}"),
        }
    }
    // What else comes (late BULK, or a duplicate, which the checks below would catch).
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), a.next_event()).await {
        if let Event::Result(r) = e {
            got.push(r);
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in &got {
        assert!(
            seen.insert(r.stream_seq),
            "stream seq {} twice",
            r.stream_seq
        );
        if let Some(w) = want.get(&r.stream_seq) {
            assert_eq!((&r.key, &r.fused), (&w.key, &w.fused));
        }
    }
    let ci: Vec<u64> = got
        .iter()
        .filter(|r| r.priority != Priority::Bulk)
        .map(|r| r.stream_seq)
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    assert_eq!(ci, want.keys().copied().collect::<Vec<u64>>());
    assert!(
        got.iter().any(|r| r.replayed),
        "nothing was missed: the test did not test"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_closed_1013_resumes_from_its_last_stream_seq() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let mut cfg = config();
    // Room for all 1500 in the reference's CRITICAL queue (a debug build decodes slowly); the
    // stalled peer is closed by the send timeout once its socket is full.
    cfg.send_queue.critical = 2000;
    cfg.send_timeout = Duration::from_millis(300);
    cfg.close_linger = Duration::from_secs(10);
    let (s, url) = start(wide_head(), cfg).await;
    let sub = r#"{"type":"subscribe","stream":"c"}"#;
    let mut stalled = raw_subscriber_with(&url, 2, sub).await;
    let mut reference = Client::connect(&url, None).await.unwrap();
    reference.subscribe("c").await.unwrap();
    let epoch = reference.welcome().epoch;
    let p = Client::connect(&url, None).await.unwrap();
    let n = 1500u64;
    let x = [0.5f32, -0.25, 1.0, 0.125];
    for i in 0..n {
        p.produce("c", &format!("k{i}"), "a", &x, Priority::Critical, true)
            .await
            .unwrap();
    }
    let (all, _) = results(&mut reference, n as usize).await;
    assert_eq!(all.last().map(|r| r.stream_seq), Some(n));
    // Stay stalled well past send_timeout: on a quiet machine the reference can be done before
    // the stalled peer's writer has been blocked that long.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The stalled one reads now: results up to its 1013 close.
    let mut point = 0;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(20), stalled.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                let r = fusion_engine::protocol::decode_result(&b).unwrap();
                assert_eq!(r.stream_seq, point + 1, "in order, no gap");
                point = r.stream_seq;
            }
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close, Some(1013));
    assert!(point > 0 && point < n, "{point}");
    // Resume: the buffer holds the last 1024 (477..=1500); older ones are announced.
    let mut c = Client::connect(&url, None).await.unwrap();
    let resume = ResumePoint {
        epoch,
        critical: point,
        important: 0,
    };
    let opts = SubscribeOptions {
        resume: Some(resume),
        conflate: None,
    };
    c.subscribe_with("c", opts).await.unwrap();
    let first_kept = n - 1024 + 1;
    let from = point.max(first_kept - 1) + 1;
    let (got, ctl) = results(&mut c, (n - from + 1) as usize).await;
    let seqs: Vec<u64> = got.iter().map(|r| r.stream_seq).collect();
    assert_eq!(seqs, (from..=n).collect::<Vec<u64>>());
    assert!(got
        .iter()
        .all(|r| r.replayed && r.priority == Priority::Critical));
    let unrec: Vec<(u64, u64)> = ctl
        .iter()
        .filter(|v| v["kind"] == "unrecoverable")
        .map(|v| (v["first"].as_u64().unwrap(), v["last"].as_u64().unwrap()))
        .collect();
    if point + 1 < first_kept {
        assert_eq!(unrec, vec![(point + 1, first_kept - 1)]);
    } else {
        assert!(unrec.is_empty(), "{unrec:?}");
    }
    assert_eq!(c.resume_point("c").unwrap().critical, n);
    s.shutdown().await;
}
