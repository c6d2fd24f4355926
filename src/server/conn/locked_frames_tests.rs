//! `samples` frames kept in page-locked pool buffers, end to end over a real socket
//! (docs/DESIGN.md sections 4.1 and 6.7): with a page lock installed on the engine's pool, as a
//! CUDA device installs one, large frames are read into pool buffers, locked once they come
//! back, and their blocks then stay in them as batch matrices; the buffers go round while
//! batches still hold earlier frames. Every result must match the float64 reference, and the
//! lock must have been used without misuse. (A fake lock: no GPU needed.)

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::BatchRef;
use crate::client::{Client, ConnectOptions, Event};
use crate::engine::buffers::lock_tests::FakeLock;
use crate::engine::{DeviceSpec, EngineConfig, Priority};
use crate::model::FusionHead;
use crate::reference::{reference, rel_error};
use crate::server::{start_with_head, ServerConfig};
use crate::tensor::MatRef;

/// Deterministic features in [-1, 1).
fn features(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_locked_pool_buffers_are_fused_right_while_their_buffers_go_round() {
    let dims = [
        ("vision".to_string(), 24),
        ("text".to_string(), 16),
        ("audio".to_string(), 8),
    ];
    let head = Arc::new(FusionHead::random(&dims, 32, 1e-5, 7));
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        engine: EngineConfig::with_devices(DeviceSpec::parse_list("cpu:threads=1").expect("spec")),
        ..ServerConfig::default()
    };
    let s = start_with_head(cfg, Arc::clone(&head), None)
        .await
        .expect("server starts");
    let fake = Arc::new(FakeLock::default());
    s.engine().buffer_pool().set_page_lock(fake.clone());
    let url = format!("ws://{}/", s.local_addr());
    // A send queue that holds every result, so that a subscriber checking each one against the
    // reference never falls far enough behind for IMPORTANT results to be dropped.
    let opts = ConnectOptions {
        binary: true,
        batch: true,
        send_queue: Some([8192; 3]),
        ..ConnectOptions::default()
    };
    let mut c = Client::connect_with_options(&url, &opts)
        .await
        .expect("connects");
    c.subscribe("cam").await.expect("subscribes");

    // 16 frames of 400 samples: 76.8 KB of f32 each, over the 64 KiB the reader reads into a
    // pool buffer, sent back to back by a producer of its own so that later frames land in
    // recycled (locked) buffers while batches still hold earlier ones.
    let (frames, n) = (16, 400);
    let mut sent: HashMap<String, [Vec<f32>; 3]> = HashMap::new();
    let mut wire = Vec::new();
    for f in 0..frames {
        let keys: Vec<String> = (0..n).map(|i| format!("f{f}s{i}")).collect();
        let x: Vec<Vec<f32>> = dims
            .iter()
            .enumerate()
            .map(|(m, (_, w))| features(n * w, (f * 3 + m) as u64 + 1))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            let row = |m: usize| x[m][i * dims[m].1..(i + 1) * dims[m].1].to_vec();
            sent.insert(k.clone(), [row(0), row(1), row(2)]);
        }
        wire.push((keys, x));
    }
    let names: Vec<String> = dims.iter().map(|(name, _)| name.clone()).collect();
    let producer = tokio::spawn(async move {
        let p = Client::connect(&url, None)
            .await
            .expect("producer connects");
        for (keys, x) in &wire {
            let kr: Vec<&str> = keys.iter().map(String::as_str).collect();
            let feats: Vec<(&str, &[f32])> = names
                .iter()
                .zip(x)
                .map(|(name, v)| (name.as_str(), v.as_slice()))
                .collect();
            p.produce_samples("cam", &kr, &feats, Priority::Important, 0)
                .await
                .expect("frame sent");
        }
        p
    });

    let mut left = sent.len();
    while left > 0 {
        let ev = tokio::time::timeout(Duration::from_secs(20), c.next_event())
            .await
            .expect("a result in time")
            .expect("the connection is open");
        let r = match ev {
            Event::Result(r) => r,
            Event::Error { code, message, .. } => panic!("error {code}: {message}"),
            Event::Control(v) if v["kind"] == "dropped" => panic!("results dropped: {v}"),
            _ => continue,
        };
        let x = sent
            .remove(&r.key)
            .expect("a result for a sample sent, once");
        let inputs: Vec<MatRef<'_>> = x
            .iter()
            .zip(&head.modalities)
            .map(|(v, m)| MatRef::from_f32(1, m.width, v).expect("row"))
            .collect();
        let want = reference(
            &head,
            &BatchRef {
                rows: 1,
                inputs,
                mask: &[1, 1, 1],
            },
        );
        let (ef, ew) = (
            rel_error(&r.fused, &want.fused),
            rel_error(&r.weights, &want.weights),
        );
        assert!(ef <= 1e-5 && ew <= 1e-5, "{}: {ef} {ew}", r.key);
        left -= 1;
    }

    assert!(
        fake.locks.load(SeqCst) > 0,
        "the pool locked the buffers it recycled"
    );
    producer.await.expect("producer task").close().await;
    c.close().await;
    s.shutdown().await;

    assert!(fake.misuse.lock().is_empty(), "{:?}", fake.misuse.lock());
}
