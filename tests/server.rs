//! The server over real sockets on 127.0.0.1:0: request/response against the f64 reference,
//! alignment (late and missing modalities), every bad-input path, auth, metrics/health,
//! graceful shutdown.

mod server_util;

use std::time::Duration;

use fusion_engine::client::{Client, Event};
use fusion_engine::engine::Priority;
use fusion_engine::protocol::{encode_produce, FLAG_ACK};
use fusion_engine::tensor::DType;
use server_util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuse_matches_the_reference_binary_and_json() {
    let h = small_head();
    let (s, url) = start(h.clone(), config()).await;
    for binary in [true, false] {
        let mut c = Client::connect_with(&url, None, binary).await.unwrap();
        assert_eq!(c.welcome().dim, 32);
        assert_eq!(c.welcome().modalities[1], ("text".to_string(), 16));
        for (seed, mask) in [(1u64, [1u8, 1, 1]), (2, [1, 0, 1]), (3, [0, 1, 0])] {
            let x: Vec<Vec<f32>> = h
                .modalities
                .iter()
                .enumerate()
                .map(|(i, m)| features(m.width, seed * 10 + i as u64))
                .collect();
            let feats: Vec<(&str, &[f32])> = h
                .modalities
                .iter()
                .zip(&x)
                .zip(mask)
                .filter(|(_, p)| *p == 1)
                .map(|((m, v), _)| (m.name.as_str(), &v[..]))
                .collect();
            let r = c.fuse("s", &feats, Priority::Critical).await.unwrap();
            assert_eq!(r.mask, mask.to_vec());
            let (ef, ew) = check(&h, &x, &mask, &r.fused, &r.weights);
            assert!(
                ef <= 1e-5 && ew <= 1e-5,
                "binary={binary} mask={mask:?}: {ef} {ew}"
            );
            for (w, p) in r.weights.iter().zip(mask) {
                if p == 0 {
                    assert_eq!(*w, 0.0);
                }
            }
        }
        c.close().await;
    }
    // The JSON produce form, integer key, ack.
    let mut c = Client::connect_with(&url, None, false).await.unwrap();
    c.subscribe("j").await.unwrap();
    let x = features(16, 5);
    let msg = serde_json::json!({"type": "produce", "stream": "j", "key": 17, "modality": "text",
        "values": x, "last": true, "ack": true, "id": "p1", "priority": "bulk"});
    c.send_text(msg.to_string()).await.unwrap();
    let mut acked = false;
    loop {
        match next(&mut c, 5.0).await {
            Event::Control(v) if v["type"] == "ack" => {
                assert_eq!(v["id"], "p1");
                assert_eq!(v["key"], "17");
                acked = true;
            }
            Event::Result(r) => {
                assert_eq!(r.key, "17");
                assert_eq!(r.priority, Priority::Bulk);
                let xs = vec![vec![0.0; 24], x.clone(), vec![0.0; 8]];
                let (ef, _) = check(&h, &xs, &[0, 1, 0], &r.fused, &r.weights);
                assert!(ef <= 1e-5);
                break;
            }
            e => panic!("unexpected {e:?}"),
        }
    }
    assert!(acked);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alignment_late_and_missing_modalities() {
    let h = small_head();
    let mut cfg = config();
    cfg.align_timeout = Duration::from_millis(80);
    let (s, url) = start(h.clone(), cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    c.subscribe("a").await.unwrap();
    let x: Vec<Vec<f32>> = h.modalities.iter().map(|m| features(m.width, 3)).collect();
    // Late modalities within align_timeout: one complete sample.
    c.produce("a", "k1", "audio", &x[2], Priority::Important, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.produce("a", "k1", "vision", &x[0], Priority::Important, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.produce("a", "k1", "text", &x[1], Priority::Critical, false)
        .await
        .unwrap();
    match next(&mut c, 5.0).await {
        Event::Result(r) => {
            assert_eq!(
                (r.key.as_str(), r.mask.clone(), r.priority),
                ("k1", vec![1, 1, 1], Priority::Critical)
            );
            assert!(check(&h, &x, &[1, 1, 1], &r.fused, &r.weights).0 <= 1e-5);
        }
        e => panic!("{e:?}"),
    }
    // A missing modality: fused with what arrived after align_timeout.
    let t0 = std::time::Instant::now();
    c.produce("a", "k2", "vision", &x[0], Priority::Important, false)
        .await
        .unwrap();
    c.produce("a", "k2", "text", &x[1], Priority::Important, false)
        .await
        .unwrap();
    match next(&mut c, 5.0).await {
        Event::Result(r) => {
            assert_eq!(r.mask, vec![1, 1, 0]);
            assert!(
                t0.elapsed() >= Duration::from_millis(70),
                "{:?}",
                t0.elapsed()
            );
            assert!(check(&h, &x, &[1, 1, 0], &r.fused, &r.weights).0 <= 1e-5);
        }
        e => panic!("{e:?}"),
    }
    s.shutdown().await;
    // min_modalities = 2: one modality is rejected with incomplete_sample.
    let mut cfg = config();
    cfg.align_timeout = Duration::from_millis(30);
    cfg.min_modalities = 2;
    let (s, url) = start(h.clone(), cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    c.produce("a", "k3", "audio", &x[2], Priority::Important, false)
        .await
        .unwrap();
    let (code, raw) = next_error(&mut c).await;
    assert_eq!(code, "incomplete_sample");
    assert_eq!(raw["key"], "k3");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_a_typed_error_and_the_connection_goes_on() {
    let h = small_head();
    let mut cfg = config();
    cfg.max_streams_per_connection = 3;
    cfg.max_frame_bytes = 64 * 1024;
    let (s, url) = start(h.clone(), cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    let good = features(16, 1);
    let gb: &[u8] = bytemuck::cast_slice(&good);
    let mut nan = good.clone();
    nan[3] = f32::NAN;
    let frame = |s: &str, k: &str, m: &str, d: DType, p: &[u8]| {
        encode_produce(s, k, m, d, Priority::Important, 0, 9, p).unwrap()
    };
    let mut bad_dtype = frame("s", "k", "text", DType::F32, gb);
    bad_dtype[4] = 7;
    let mut bad_magic = frame("s", "k", "text", DType::F32, gb);
    bad_magic[0] = b'X';
    let cases: Vec<(&str, Result<String, Vec<u8>>)> = vec![
        ("malformed", Ok("{not json".into())),
        ("malformed", Ok("[1,2]".into())),
        ("unknown_type", Ok(r#"{"type":"teleport"}"#.into())),
        ("malformed", Ok(r#"{"type":"produce","stream":"s"}"#.into())),
        ("bad_priority", Ok(r#"{"type":"produce","stream":"s","key":"k","modality":"text","priority":"urgent","values":[1]}"#.into())),
        ("malformed", Ok(r#"{"type":"hello","version":1,"results":"xml"}"#.into())),
        ("unknown_stream", Ok(r#"{"type":"unsubscribe","stream":"never"}"#.into())),
        ("invalid_name", Ok(r#"{"type":"subscribe","stream":""}"#.into())),
        ("unknown_modality", Err(frame("s", "k", "smell", DType::F32, gb))),
        ("wrong_width", Err(frame("s", "k", "text", DType::F32, &gb[..40]))),
        ("wrong_width", Err(frame("s", "k", "vision", DType::F32, gb))),
        ("non_finite", Err(frame("s", "k", "text", DType::F32, bytemuck::cast_slice(&nan)))),
        ("non_finite", Err(frame("s", "k", "text", DType::F16, &[0x00, 0x7c].repeat(16)))),
        ("bad_dtype", Err(bad_dtype)),
        ("malformed", Err(bad_magic)),
        ("malformed", Err(vec![1, 2, 3])),
        ("invalid_name", Err(frame("", "k", "text", DType::F32, gb))),
        ("invalid_name", Err(frame("s", &"k".repeat(300), "text", DType::F32, gb))),
    ];
    for (want, msg) in cases {
        match msg.clone() {
            Ok(t) => c.send_text(t).await.unwrap(),
            Err(b) => c.send_binary(b).await.unwrap(),
        }
        let (code, _) = next_error(&mut c).await;
        assert_eq!(code, want, "{msg:?}");
    }
    // Too many streams (3 per connection), duplicate modality.
    for st in ["s1", "s2", "s3"] {
        c.subscribe(st).await.unwrap();
    }
    assert_eq!(
        c.subscribe("s4").await.unwrap_err().code(),
        "too_many_streams"
    );
    c.produce("s1", "d", "text", &good, Priority::Important, false)
        .await
        .unwrap();
    c.produce("s1", "d", "text", &good, Priority::Important, false)
        .await
        .unwrap();
    assert_eq!(next_error(&mut c).await.0, "duplicate_modality");
    // Still serving this connection: a good sample comes back.
    let r = c
        .fuse("s1", &[("text", &good[..])], Priority::Critical)
        .await
        .unwrap();
    assert_eq!(r.mask, vec![0, 1, 0]);
    // Ack of a binary produce carries the request id.
    let f = encode_produce(
        "s1",
        "a1",
        "audio",
        DType::F32,
        Priority::Bulk,
        FLAG_ACK,
        77,
        bytemuck::cast_slice(&features(8, 1)),
    )
    .unwrap();
    c.send_binary(f).await.unwrap();
    loop {
        if let Event::Control(v) = next(&mut c, 5.0).await {
            if v["type"] == "ack" && v["op"] == "produce" {
                assert_eq!(v["id"], 77);
                break;
            }
        }
    }
    // An oversized frame closes that connection with 1009; others keep being served.
    let mut other = Client::connect(&url, None).await.unwrap();
    c.send_binary(vec![0u8; 100 * 1024]).await.unwrap();
    loop {
        match next(&mut c, 5.0).await {
            Event::Closed { code, .. } => {
                assert_eq!(code, Some(1009));
                break;
            }
            Event::Error { code, .. } => assert_eq!(code, "frame_too_large"),
            _ => {}
        }
    }
    assert!(other
        .fuse("o", &[("text", &good[..])], Priority::Important)
        .await
        .is_ok());
    // An unsupported protocol version closes with 1002.
    other
        .send_text(r#"{"type":"hello","version":9}"#.into())
        .await
        .unwrap();
    assert_eq!(next_error(&mut other).await.0, "unsupported_version");
    loop {
        if let Event::Closed { code, .. } = next(&mut other, 5.0).await {
            assert_eq!(code, Some(1002));
            break;
        }
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_auth_and_connection_limit() {
    let mut cfg = config();
    cfg.token = Some("s3cret".into());
    cfg.max_connections = 2;
    let (s, url) = start(small_head(), cfg).await;
    let e = Client::connect(&url, None).await.err().unwrap();
    assert!(e.to_string().contains("401"), "{e}");
    let e = Client::connect(&url, Some("wrong")).await.err().unwrap();
    assert!(e.to_string().contains("401"), "{e}");
    let a = Client::connect(&url, Some("s3cret")).await.unwrap();
    let b = Client::connect(&format!("{url}?token=s3cret"), None)
        .await
        .unwrap();
    let e = Client::connect(&url, Some("s3cret")).await.err().unwrap();
    assert!(e.to_string().contains("503"), "{e}");
    drop((a, b));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_graceful_shutdown_drain() {
    let prom = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let h = small_head();
    let mut cfg = config();
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    cfg.align_timeout = Duration::from_secs(10);
    let s = fusion_engine::server::start_with_head(cfg, h.clone(), prom)
        .await
        .unwrap();
    let url = format!("ws://{}/", s.local_addr());
    let maddr = s.metrics_addr().unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut t = tokio::net::TcpStream::connect(maddr).await.unwrap();
        t.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        t.read_to_string(&mut out).await.unwrap();
        out
    };
    let mut c = Client::connect(&url, None).await.unwrap();
    let x = features(16, 2);
    c.fuse("m", &[("text", &x[..])], Priority::Important)
        .await
        .unwrap();
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    let m = get("/metrics").await;
    for name in [
        "fusion_server_connections",
        "fusion_server_sent_total",
        "fusion_device_batches_total",
        "fusion_server_queue_depth",
    ] {
        assert!(m.contains(name), "{name} missing in {m}");
    }
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    // Shutdown drains: an open sample (align_timeout 10 s) is fused with what it has and
    // delivered before the 1001 close.
    c.produce("m", "open", "text", &x, Priority::Critical, false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    s.shutdown().await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    let (mut got, mut notice) = (false, false);
    loop {
        match next(&mut c, 5.0).await {
            Event::Result(r) if r.key == "open" => got = true,
            Event::Control(v) if v["kind"] == "shutdown" => notice = true,
            Event::Closed { code, .. } => {
                assert_eq!(code, Some(1001));
                break;
            }
            _ => {}
        }
    }
    assert!(
        got && notice,
        "before the 1001 close: the open sample's result {got}, the shutdown notice {notice}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_state_changes_are_announced_on_the_devices_stream() {
    let h = small_head();
    let mut cfg = config();
    cfg.engine.devices =
        fusion_engine::engine::DeviceSpec::parse_list("cpu:threads=1,cpu:threads=1").unwrap();
    cfg.engine.restart_backoff = Duration::from_secs(5);
    let (s, url) = start(h.clone(), cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    c.subscribe("$devices").await.unwrap();
    let faults = fusion_engine::engine::FaultSpec {
        fail: 1.0,
        ..Default::default()
    };
    s.engine().set_faults(0, &faults).unwrap();
    s.engine().set_faults(1, &faults).unwrap();
    let x = features(16, 1);
    // The batches fail (both devices), and the producer hears about it.
    let r = c.fuse("d", &[("text", &x[..])], Priority::Critical).await;
    assert_eq!(r.unwrap_err().code(), "device_error");
    let mut failed = false;
    let t0 = std::time::Instant::now();
    while !failed && t0.elapsed() < Duration::from_secs(5) {
        if let Event::Control(v) = next(&mut c, 5.0).await {
            failed = v["kind"] == "device" && v["state"] == "failed";
        }
    }
    assert!(failed, "no device notice");
    s.shutdown().await;
}
