//! Tests of the fan-out of a batch as one unit (docs/DESIGN.md section 5): stream seqs as a
//! range, one shared encoding per result, per-connection seqs written by the writer, and a
//! resume replaying the shared encodings in every result encoding (docs/PROTOCOL.md 7.4).

use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;

use super::outbound::{Next, Outbound, CONTROL};
use super::registry::Registry;
use super::replay::{Replay, Resume};
use super::writer::Framer;
use crate::engine::Priority;
use crate::protocol::{decode_result, DecodedResult, ResultView, VERSION, VERSION_2};
use crate::server::config::ServerConfig;
use crate::server::ingest::keys::RunKeys;
use crate::server::metrics::ServerMetrics;

fn outbound(cfg: &ServerConfig, m: &Arc<ServerMetrics>, json: bool, version: u8) -> Arc<Outbound> {
    let o = Outbound::new(
        1,
        &cfg.send_queue,
        Duration::ZERO,
        cfg.replay_messages,
        Arc::clone(m),
    );
    o.set_encoding(!json, version);
    Arc::new(o)
}

/// Everything queued, framed as the writer frames it: results decoded (JSON ones into the same
/// shape), CONTROL texts apart.
fn drain(o: &Outbound) -> (Vec<DecodedResult>, Vec<String>) {
    let (mut results, mut control) = (Vec::new(), Vec::new());
    let mut f = Framer::default();
    f.begin(o);
    while let Next::Send(it) = o.next() {
        let class = it.class;
        let msgs: Vec<Message> = f.push(it).into_iter().flatten().collect();
        for m in msgs {
            match (class, m) {
                (CONTROL, m) => control.push(m.to_string()),
                (_, Message::Binary(b)) => results.push(decode_result(&b).expect("a result")),
                (_, m) => results.push(from_json(&m.to_string())),
            }
        }
    }
    (results, control)
}

fn from_json(text: &str) -> DecodedResult {
    let v: serde_json::Value = serde_json::from_str(text).expect("JSON");
    let f32s = |k: &str| -> Vec<f32> {
        v[k].as_array()
            .expect("an array")
            .iter()
            .map(|x| x.as_f64().expect("a number") as f32)
            .collect()
    };
    DecodedResult {
        seq: v["seq"].as_u64().expect("seq"),
        stream_seq: v["stream_seq"].as_u64().expect("stream_seq"),
        replayed: v["replayed"].as_bool().unwrap_or(false),
        stream: v["stream"].as_str().expect("stream").to_string(),
        key: v["key"].as_str().expect("key").to_string(),
        priority: crate::protocol::priority_named(v["priority"].as_str().expect("priority"))
            .expect("a class"),
        mask: v["mask"]
            .as_array()
            .expect("mask")
            .iter()
            .map(|x| x.as_u64().expect("0 or 1") as u8)
            .collect(),
        fused: f32s("fused"),
        weights: f32s("weights"),
    }
}

const CLASSES: [Priority; 6] = [
    Priority::Critical,
    Priority::Important,
    Priority::Bulk,
    Priority::Critical,
    Priority::Important,
    Priority::Bulk,
];

/// One batch of six results of stream `s` (keys `k{base + i}`), fanned out as one unit.
fn deliver(replay: &Replay, reg: &Registry, s: &Arc<str>, base: usize) {
    let keys: Vec<String> = (0..6).map(|i| format!("k{}", base + i)).collect();
    let fused: Vec<[f32; 2]> = (0..6).map(|i| [(base + i) as f32, 0.5]).collect();
    let views: Vec<ResultView<'_>> = (0..6)
        .map(|i| ResultView {
            stream: s,
            key: &keys[i],
            priority: CLASSES[i],
            mask: &[1, 0],
            fused: &fused[i],
            weights: &[1.0, 0.0],
            stream_seq: 0,
            replayed: false,
        })
        .collect();
    replay.deliver_stream(reg, s, &views);
}

#[test]
fn a_batch_gets_a_range_of_stream_seqs_and_every_subscriber_its_own_seqs() {
    let cfg = ServerConfig::default();
    let m = Arc::new(ServerMetrics::new());
    let (replay, reg) = (Replay::new(&cfg, Arc::clone(&m)), Registry::default());
    let s: Arc<str> = Arc::from("s");
    let subs = [
        outbound(&cfg, &m, false, VERSION_2),
        outbound(&cfg, &m, false, VERSION),
        outbound(&cfg, &m, true, VERSION_2),
    ];
    for o in &subs {
        reg.subscribe(&s, o);
    }
    deliver(&replay, &reg, &s, 0);
    deliver(&replay, &reg, &s, 6);
    for (n, o) in subs.iter().enumerate() {
        let (got, _) = drain(o);
        // Strict priority within each drain: CRITICAL, IMPORTANT, BULK; seqs as queued.
        let order: Vec<(u64, u64)> = got.iter().map(|r| (r.seq, r.stream_seq)).collect();
        let want = [1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12];
        let sseq = |q: u64| if n == 1 { 0 } else { q };
        let want: Vec<(u64, u64)> = want.iter().map(|&q| (q, sseq(q))).collect();
        assert_eq!(order, want, "subscriber {n}");
        for r in &got {
            assert_eq!(r.key, format!("k{}", r.seq - 1));
            assert_eq!(r.fused, vec![(r.seq - 1) as f32, 0.5]);
            assert!(!r.replayed);
        }
    }
}

#[test]
fn a_resume_replays_the_shared_encodings_in_every_result_encoding() {
    for (json, version) in [(false, VERSION_2), (false, VERSION), (true, VERSION_2)] {
        let cfg = ServerConfig::default();
        let m = Arc::new(ServerMetrics::new());
        let (replay, reg) = (Replay::new(&cfg, Arc::clone(&m)), Registry::default());
        let s: Arc<str> = Arc::from("s");
        deliver(&replay, &reg, &s, 0);
        let o = outbound(&cfg, &m, json, version);
        // Has CRITICAL up to 1 and IMPORTANT up to 2: 4 and 5 are replayed (BULK never is).
        let point = Resume {
            epoch: replay.epoch,
            critical: 1,
            important: 2,
        };
        replay.subscribe(&reg, &s, &o, Some(point), |_| Message::text("ack"));
        let (got, control) = drain(&o);
        assert_eq!(control, vec!["ack".to_string()]);
        let seen: Vec<(u64, u64, bool)> = got
            .iter()
            .map(|r| (r.seq, r.stream_seq, r.replayed))
            .collect();
        let v1 = version == VERSION && !json;
        let sseq = |q: u64| if v1 { 0 } else { q };
        // Version 1 has no replayed flag (PROTOCOL 4.2).
        assert_eq!(
            seen,
            vec![(1, sseq(4), !v1), (2, sseq(5), !v1)],
            "{json} {version}"
        );
        assert_eq!(got[0].fused, vec![3.0, 0.5]);
        assert_eq!(
            (got[1].key.as_str(), got[1].priority),
            ("k4", Priority::Important)
        );
        assert_eq!(got[1].mask, vec![1, 0]);
        assert_eq!(got[1].weights, vec![1.0, 0.0]);
        // Live results follow, with the next seqs and no replayed flag.
        deliver(&replay, &reg, &s, 6);
        let (live, _) = drain(&o);
        let seqs: Vec<(u64, bool)> = live.iter().map(|r| (r.seq, r.replayed)).collect();
        let want: Vec<(u64, bool)> = [3, 6, 4, 7, 5, 8].iter().map(|&q| (q, false)).collect();
        assert_eq!(seqs, want);
    }
}

#[test]
fn a_batch_of_several_streams_goes_out_per_stream_in_batch_order() {
    use super::deliver::{deliver_results, Meta};
    let cfg = ServerConfig::default();
    let m = Arc::new(ServerMetrics::new());
    let (replay, reg) = (Replay::new(&cfg, Arc::clone(&m)), Registry::default());
    // Stream `a` is named so that it sorts after stream `b`: the grouping is by name.
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("b-stream"), Arc::from("a-stream"));
    let both = outbound(&cfg, &m, false, VERSION_2);
    reg.subscribe(&a, &both);
    reg.subscribe(&b, &both);
    let meta = |s: &Arc<str>, k: &str| Meta {
        stream: Arc::clone(s),
        keys: RunKeys::Own(k.to_string()),
        priority: Priority::Important,
        mask: Arc::new([1]),
        producers: Arc::new([]),
    };
    let metas = [
        meta(&a, "a0"),
        meta(&b, "b0"),
        meta(&a, "a1"),
        meta(&b, "b1"),
        meta(&a, "a2"),
    ];
    // D = 1, M = 1; the last row has no outputs and is skipped.
    let fused = [0.0, 1.0, 2.0, 3.0];
    let weights = [1.0; 4];
    deliver_results(&replay, &reg, &metas, &fused, &weights, (1, 1));
    let (got, _) = drain(&both);
    let seen: Vec<(u64, &str, u64, f32)> = got
        .iter()
        .map(|r| (r.seq, r.key.as_str(), r.stream_seq, r.fused[0]))
        .collect();
    // Grouped by stream (in name order), each stream's results in batch order with its own
    // stream seqs; every result once.
    assert_eq!(
        seen,
        vec![
            (1, "b0", 1, 1.0),
            (2, "b1", 2, 3.0),
            (3, "a0", 1, 0.0),
            (4, "a1", 2, 2.0),
        ]
    );
    let streams: Vec<(String, u64)> = replay
        .streams()
        .iter()
        .map(|(s, last, _)| (s.to_string(), *last))
        .collect();
    assert_eq!(
        streams,
        vec![("a-stream".to_string(), 2), ("b-stream".to_string(), 2)]
    );
}

/// With `batch_results` a send carries up to 64 WebSocket messages, a `results` frame counting
/// once (PROTOCOL 7.3): 240 small results queued at once go out in one frame, not one frame per
/// 64 results, with every seq once and in the writer's strict priority order.
#[tokio::test]
async fn one_send_frames_every_small_result_queued_in_one_results_frame() {
    use futures_util::SinkExt;

    use super::writer::{write_loop, WriterConfig};
    use crate::protocol::split_results;

    let cfg = ServerConfig::default();
    let m = Arc::new(ServerMetrics::new());
    let (replay, reg) = (Replay::new(&cfg, Arc::clone(&m)), Registry::default());
    let s: Arc<str> = Arc::from("s");
    let o = outbound(&cfg, &m, false, VERSION_2);
    o.set_batch_results(true);
    reg.subscribe(&s, &o);
    for b in 0..40 {
        deliver(&replay, &reg, &s, 6 * b);
    }
    o.close_after_drain(1000, "test");
    let mut sent: Vec<Message> = Vec::new();
    let sink = (&mut sent).sink_map_err(|e: std::convert::Infallible| match e {});
    let wcfg = WriterConfig {
        send_timeout: Duration::from_secs(5),
        slow_send: Duration::from_secs(5),
        slow_sends: 5,
        close_linger: Duration::from_secs(1),
        heartbeat: Duration::from_secs(60),
    };
    write_loop(Arc::clone(&o), sink, wcfg, m).await;
    let frames: Vec<Vec<u64>> = sent
        .iter()
        .filter_map(|msg| match msg {
            Message::Binary(b) => Some(
                split_results(b)
                    .expect("a results frame")
                    .iter()
                    .map(|r| decode_result(r).expect("a result").seq)
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(
        frames.len(),
        1,
        "{:?}",
        frames.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // CRITICAL (seqs 1, 4, ...), then IMPORTANT, then BULK.
    let want: Vec<u64> = (1..=3).flat_map(|c| (c..=240).step_by(3)).collect();
    assert_eq!(frames[0], want);
    assert!(matches!(sent.last(), Some(Message::Close(_))));
}
