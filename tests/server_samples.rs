//! `samples` frames (PROTOCOL 4.4) over real sockets: whole samples of one stream in one frame,
//! against the f64 reference (f32 and f16 payloads, modalities listed out of head order, more
//! samples than one batch); every bad frame gets its typed error and the connection goes on;
//! results frames. What the batcher makes of frames: `server_batches.rs`.

mod server_util;

use std::collections::HashMap;

use fusion_engine::client::Client;
use fusion_engine::engine::Priority;
use fusion_engine::protocol::encode_samples;
use fusion_engine::tensor::DType;
use half::f16;
use server_util::frames::*;
use server_util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_frames_match_the_reference() {
    let h = small_head();
    let (s, url) = start(h.clone(), config()).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    c.subscribe("cam").await.unwrap();

    // 300 samples (more than one batch of 256), text and vision listed out of head order,
    // audio absent: masked out.
    let n = 300;
    let x = rows(&h, n, 1);
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let (text, vision) = (block(&x, 1), block(&x, 0));
    let feats: [(&str, &[f32]); 2] = [("text", &text), ("vision", &vision)];
    c.produce_samples("cam", &kr, &feats, Priority::Important, 5)
        .await
        .unwrap();
    let got = collect(&mut c, n, Some(5)).await;
    for (i, k) in keys.iter().enumerate() {
        let r = &got[k];
        assert_eq!(r.mask, [1, 1, 0]);
        assert_eq!(r.priority, Priority::Important);
        let (ef, ew) = check(&h, &x[i], &[1, 1, 0], &r.fused, &r.weights);
        assert!(ef <= 1e-5 && ew <= 1e-5, "sample {i}: {ef} {ew}");
        assert_eq!(r.weights[2], 0.0);
    }

    // f16 payload, every modality, CRITICAL, no ack asked.
    let n = 17;
    let x = rows(&h, n, 2);
    let keys: Vec<String> = (0..n).map(|i| format!("h{i}")).collect();
    let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let blocks: Vec<Vec<u8>> = (0..3)
        .map(|m| {
            block(&x, m)
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect()
        })
        .collect();
    let br: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
    let names = ["vision", "text", "audio"];
    let f = encode_samples(
        "cam",
        &kr,
        &names,
        &br,
        DType::F16,
        Priority::Critical,
        false,
        0,
    );
    c.send_binary(f.unwrap()).await.unwrap();
    let got = collect(&mut c, n, None).await;
    for (i, k) in keys.iter().enumerate() {
        let r = &got[k];
        assert_eq!(
            (r.mask.as_slice(), r.priority),
            (&[1u8, 1, 1][..], Priority::Critical)
        );
        // The reference on the values the wire carried (rounded to f16).
        let xr: Vec<Vec<f32>> = x[i]
            .iter()
            .map(|v| v.iter().map(|a| f16::from_f32(*a).to_f32()).collect())
            .collect();
        let (ef, ew) = check(&h, &xr, &[1, 1, 1], &r.fused, &r.weights);
        assert!(ef <= 1e-5 && ew <= 1e-5, "f16 sample {i}: {ef} {ew}");
    }
    c.close().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_samples_frames_get_typed_errors_and_the_connection_goes_on() {
    let h = small_head();
    let mut cfg = config();
    cfg.max_streams_per_connection = 2;
    // A frame of more rows than the ingest queue holds is still taken when nothing else is
    // queued (it would otherwise be refused forever).
    cfg.ingest_capacity = 8;
    let (s, url) = start(h.clone(), cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    let x = rows(&h, 3, 3);
    let (v, t, a) = (block(&x, 0), block(&x, 1), block(&x, 2));
    let b = |x: &[f32]| -> Vec<u8> { bytemuck::cast_slice(x).to_vec() };
    let frame = |stream: &str, keys: &[&str], names: &[&str], blocks: &[Vec<u8>]| {
        let br: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
        encode_samples(
            stream,
            keys,
            names,
            &br,
            DType::F32,
            Priority::Bulk,
            false,
            11,
        )
        .unwrap()
    };
    let k3 = ["a", "b", "c"];
    let mut nan = t.clone();
    nan[16 + 5] = f32::INFINITY; // sample 1 ("b"), element 5
    let good = frame("s", &k3, &["text"], &[b(&t)]);
    let mut truncated = good.clone();
    truncated.pop();
    let mut bad_priority = good.clone();
    bad_priority[5] = 9;
    let mut with_last = good.clone();
    with_last[6] = 2;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unknown_modality",
            frame("s", &k3, &["smell"], &[b(&t)]),
            "smell",
        ),
        // 3 samples x 24 values read as 3 x 24 text rows: the table says width 24.
        (
            "wrong_width",
            frame("s", &k3, &["text"], &[b(&v)]),
            "width 16, got 24",
        ),
        (
            "non_finite",
            frame("s", &k3, &["text"], &[b(&nan)]),
            "sample 1 (key \"b\"): element 5",
        ),
        (
            "duplicate_modality",
            frame("s", &k3, &["text", "text"], &[b(&t), b(&t)]),
            "twice",
        ),
        (
            "invalid_name",
            frame("s", &["a", "", "c"], &["text"], &[b(&t)]),
            "sample 1",
        ),
        (
            "invalid_name",
            frame("", &k3, &["text"], &[b(&t)]),
            "stream",
        ),
        ("malformed", truncated, "payload bytes"),
        ("malformed", with_last, "reserved"),
        ("bad_priority", bad_priority, "priority code 9"),
    ];
    for (want, f, says) in cases {
        c.send_binary(f).await.unwrap();
        let (code, raw) = next_error(&mut c).await;
        assert_eq!(code, want, "{raw}");
        assert_eq!(raw["id"], 11, "{raw}");
        let msg = raw["message"].as_str().unwrap();
        assert!(msg.contains(says), "{want}: {msg}");
    }
    // Too many streams: the third stream of this connection.
    c.subscribe("s").await.unwrap();
    c.subscribe("s2").await.unwrap();
    c.send_binary(frame("s3", &k3, &["text"], &[b(&t)]))
        .await
        .unwrap();
    assert_eq!(next_error(&mut c).await.0, "too_many_streams");
    // Nothing of the refused frames was fused; a good frame (9 rows > ingest_capacity 8) is.
    let kr = ["a", "b", "c"];
    let feats: [(&str, &[f32]); 3] = [("audio", &a), ("vision", &v), ("text", &t)];
    c.produce_samples("s", &kr, &feats, Priority::Bulk, 0)
        .await
        .unwrap();
    let got = collect(&mut c, 3, None).await;
    for (i, k) in kr.iter().enumerate() {
        let r = &got[*k];
        let (ef, _) = check(&h, &x[i], &[1, 1, 1], &r.fused, &r.weights);
        assert!(ef <= 1e-5, "{k}: {ef}");
    }
    c.close().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuse_batch_returns_every_result_in_order() {
    let h = small_head();
    let mut cfg = config();
    // A small IMPORTANT queue: 1000 samples at once would overflow it many times over; the
    // window (half of it) keeps the server from dropping any.
    cfg.send_queue.important = 40;
    let (s, url) = start(h.clone(), cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    let n = 1000;
    let x = rows(&h, n, 4);
    let (v, a) = (block(&x, 0), block(&x, 2));
    let r = c
        .fuse_batch(
            "many",
            &[("audio", &a), ("vision", &v)],
            Priority::Important,
        )
        .await
        .unwrap();
    assert_eq!(r.len(), n);
    for (i, r) in r.iter().enumerate() {
        assert_eq!(r.mask, [1, 0, 1], "row {i}");
        let (ef, ew) = check(&h, &x[i], &[1, 0, 1], &r.fused, &r.weights);
        assert!(ef <= 1e-5 && ew <= 1e-5, "row {i}: {ef} {ew}");
    }
    // Bad arguments: unknown modality, rows that do not agree.
    let e = c
        .fuse_batch("many", &[("smell", &a)], Priority::Important)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("smell"), "{e}");
    let e = c
        .fuse_batch(
            "many",
            &[("audio", &a), ("vision", &v[..24 * 3])],
            Priority::Important,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("vision"), "{e}");
    assert!(c.fuse_batch("many", &[], Priority::Bulk).await.is_err());
    c.close().await;
    s.shutdown().await;
}

/// `batch_results` (PROTOCOL 4.5): a raw subscriber that asked for it gets `results` frames of
/// several records, each a whole binary result, with consecutive seqs and the same numbers as
/// a subscriber that gets one frame per result; `batch_results` without binary results, or not
/// a boolean, is refused as `malformed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_frames_carry_the_same_results() {
    use fusion_engine::protocol::{decode_result, split_results, KIND_RESULTS};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let h = small_head();
    let (s, url) = start(h.clone(), config()).await;
    let sub = r#"{"type":"subscribe","stream":"b"}"#;
    let mut raw = raw_subscriber_with(&url, 2, sub).await;
    raw.send(Message::text(
        r#"{"type":"hello","version":2,"results":"binary","batch_results":true}"#,
    ))
    .await
    .unwrap();
    loop {
        match raw.next().await {
            Some(Ok(Message::Text(t))) if t.contains("welcome") => {
                assert!(t.contains(r#""batch_results":true"#), "{t}");
                break;
            }
            Some(Ok(_)) => {}
            m => panic!("no welcome: {m:?}"),
        }
    }
    let mut single = Client::connect_with(&url, None, true).await.unwrap();
    single.subscribe("b").await.unwrap();

    let n = 300;
    let x = rows(&h, n, 3);
    let keys: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
    let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let blocks: Vec<Vec<f32>> = (0..3).map(|m| block(&x, m)).collect();
    let feats: [(&str, &[f32]); 3] = [
        ("vision", &blocks[0]),
        ("text", &blocks[1]),
        ("audio", &blocks[2]),
    ];
    let mut p = Client::connect(&url, None).await.unwrap();
    p.produce_samples("b", &kr, &feats, Priority::Important, 0)
        .await
        .unwrap();

    let mut seqs = Vec::new();
    let mut batched = HashMap::new();
    let (mut frames, mut widest) = (0, 0);
    while batched.len() < n {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), raw.next())
            .await
            .expect("results within 10 s");
        let Some(Ok(Message::Binary(b))) = m else {
            continue;
        };
        assert_eq!(b[3], KIND_RESULTS, "every result comes in a results frame");
        let records = split_results(&b).expect("a well-formed results frame");
        frames += 1;
        widest = widest.max(records.len());
        for r in records {
            let r = decode_result(r).expect("each record is a whole result");
            seqs.push(r.seq);
            assert!(batched.insert(r.key.clone(), r).is_none(), "twice");
        }
    }
    assert_eq!(
        seqs,
        (1..=n as u64).collect::<Vec<_>>(),
        "seqs in order, no gap"
    );
    assert!(widest > 1 && frames < n, "{frames} frames, widest {widest}");
    let one = collect(&mut single, n, None).await;
    for (i, k) in keys.iter().enumerate() {
        let (b, o) = (&batched[k], &one[k]);
        assert_eq!(
            (&b.fused, &b.weights, &b.mask),
            (&o.fused, &o.weights, &o.mask)
        );
        let (ef, ew) = check(&h, &x[i], &[1, 1, 1], &b.fused, &b.weights);
        assert!(ef <= 1e-5 && ew <= 1e-5, "sample {i}: {ef} {ew}");
    }

    for hello in [
        r#"{"type":"hello","version":2,"results":"json","batch_results":true}"#,
        r#"{"type":"hello","version":2,"results":"binary","batch_results":"yes"}"#,
    ] {
        p.send_text(hello.to_string()).await.unwrap();
        let (code, v) = next_error(&mut p).await;
        assert_eq!(code, "malformed", "{v}");
        assert!(
            v["message"].as_str().unwrap().contains("batch_results"),
            "{v}"
        );
    }
    p.close().await;
    single.close().await;
    s.shutdown().await;
}
