//! `samples` frames (PROTOCOL 4.4) as the batcher sees them, over real sockets: a frame with a
//! NaN in its last row leaves nothing in any batch; frames of two connections interleaved into
//! one stream keep each connection's results and seqs; a whole frame of half a batch is a batch
//! of its own and the classes keep their order.

mod server_util;

use std::collections::HashMap;

use fusion_engine::client::{Client, FuseResult};
use fusion_engine::engine::Priority;
use server_util::frames::*;
use server_util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_a_nan_in_its_last_row_leaves_nothing_in_any_batch() {
    let h = small_head();
    let (s, url) = start(h.clone(), config()).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    c.subscribe("s").await.unwrap();
    let n = 40;
    let names = ["vision", "text", "audio"];
    for round in 0..3u64 {
        // The bad frame: every block whole and finite but the last modality's last row, whose
        // last element is NaN; its rows must not reach any batch (nor stale copies of them the
        // next frame, which reuses the pooled buffers they were copied into).
        let x = rows(&h, n, 10 + round);
        let bad_keys: Vec<String> = (0..n).map(|i| format!("bad{round}-{i}")).collect();
        let br: Vec<&str> = bad_keys.iter().map(|k| k.as_str()).collect();
        let mut blocks: Vec<Vec<f32>> = (0..3).map(|m| block(&x, m)).collect();
        *blocks[2].last_mut().unwrap() = f32::NAN;
        let feats: Vec<(&str, &[f32])> = names
            .iter()
            .zip(&blocks)
            .map(|(nm, b)| (*nm, b.as_slice()))
            .collect();
        c.produce_samples("s", &br, &feats, Priority::Important, 0)
            .await
            .unwrap();
        let (code, raw) = next_error(&mut c).await;
        assert_eq!(code, "non_finite", "{raw}");
        let width = h.modalities[2].width;
        let says = format!(
            "sample {} (key \"bad{round}-{}\"): element {}",
            n - 1,
            n - 1,
            width - 1
        );
        assert!(raw["message"].as_str().unwrap().contains(&says), "{raw}");

        // A good frame after it: exactly its own results, equal to the reference.
        let y = rows(&h, n, 20 + round);
        let keys: Vec<String> = (0..n).map(|i| format!("ok{round}-{i}")).collect();
        let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        let good: Vec<Vec<f32>> = (0..3).map(|m| block(&y, m)).collect();
        let feats: Vec<(&str, &[f32])> = names
            .iter()
            .zip(&good)
            .map(|(nm, b)| (*nm, b.as_slice()))
            .collect();
        c.produce_samples("s", &kr, &feats, Priority::Important, 0)
            .await
            .unwrap();
        let got = collect(&mut c, n, None).await;
        assert_eq!(got.len(), n, "only the good frame's samples were fused");
        for (i, k) in keys.iter().enumerate() {
            let r = got
                .get(k)
                .unwrap_or_else(|| panic!("{k} missing: {:?}", got.keys()));
            let (ef, ew) = check(&h, &y[i], &[1, 1, 1], &r.fused, &r.weights);
            assert!(ef <= 1e-5 && ew <= 1e-5, "{k}: {ef} {ew}");
        }
    }
    c.close().await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_interleaving_frames_into_one_stream_keep_results_and_seqs() {
    let h = small_head();
    let (s, url) = start(h.clone(), config()).await;
    let mut conns = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&url, None).await.unwrap();
        c.subscribe("mix").await.unwrap();
        conns.push(c);
    }
    // Each connection sends 6 frames of 37 samples (batches of 256 then mix both connections'
    // rows and split frames), alternating with the other.
    let (frames, per) = (6, 37);
    let mut want = HashMap::new();
    for f in 0..frames {
        for (ci, c) in conns.iter_mut().enumerate() {
            let x = rows(&h, per, 100 + (f * 2 + ci) as u64);
            let keys: Vec<String> = (0..per).map(|i| format!("c{ci}-f{f}-{i}")).collect();
            send_all_modalities(c, "mix", keys, x, Priority::Important, &mut want).await;
        }
    }
    let total = frames * 2 * per;
    for (ci, c) in conns.iter_mut().enumerate() {
        let order = results_in_order(c, total).await;
        let seqs: Vec<u64> = order.iter().map(|r| r.seq).collect();
        let got: HashMap<String, FuseResult> =
            order.into_iter().map(|r| (r.key.clone(), r)).collect();
        // Every result of both connections' frames, each equal to its own sample's reference,
        // and this connection's seqs 1, 2, 3, ... in the order it received them.
        for (k, x) in &want {
            let r = got
                .get(k)
                .unwrap_or_else(|| panic!("connection {ci}: {k} missing"));
            let (ef, ew) = check(&h, x, &[1, 1, 1], &r.fused, &r.weights);
            assert!(ef <= 1e-5 && ew <= 1e-5, "connection {ci}, {k}: {ef} {ew}");
        }
        let expect: Vec<u64> = (1..=total as u64).collect();
        assert_eq!(
            seqs, expect,
            "connection {ci}: per-connection seqs without gaps"
        );
    }
    for c in conns {
        c.close().await;
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_frame_of_half_a_batch_is_a_batch_of_its_own_and_classes_keep_their_order() {
    let h = small_head();
    let mut cfg = config();
    cfg.max_batch = 256;
    cfg.max_batch_delay = std::time::Duration::from_millis(300);
    let (s, url) = start(h.clone(), cfg).await;
    let mut c = Client::connect(&url, None).await.unwrap();
    c.subscribe("solo").await.unwrap();
    // CRITICAL 10, BULK 20, BULK 200 (whole, >= 128), BULK 30: the last one brings 260 rows
    // waiting. Merged, they would be one batch of 256 (the 30 split) and one of 4; with the
    // 200-row frame on its own: [10 + 20], [200], then [30] after the delay.
    let plan = [
        ("c", 10, Priority::Critical),
        ("a", 20, Priority::Bulk),
        ("b", 200, Priority::Bulk),
        ("d", 30, Priority::Bulk),
    ];
    let mut want = HashMap::new();
    for (fi, (name, n, prio)) in plan.into_iter().enumerate() {
        let x = rows(&h, n, 300 + fi as u64);
        let keys: Vec<String> = (0..n).map(|i| format!("{name}{i}")).collect();
        send_all_modalities(&mut c, "solo", keys, x, prio, &mut want).await;
    }
    let order = results_in_order(&mut c, want.len()).await;
    let bulk_order: Vec<String> = order
        .iter()
        .filter(|r| !r.key.starts_with('c'))
        .map(|r| r.key.clone())
        .collect();
    let got: HashMap<String, FuseResult> = order.into_iter().map(|r| (r.key.clone(), r)).collect();
    for (k, x) in &want {
        let (ef, ew) = check(&h, x, &[1, 1, 1], &got[k].fused, &got[k].weights);
        assert!(ef <= 1e-5 && ew <= 1e-5, "{k}: {ef} {ew}");
    }
    // BULK rows reach the subscriber in the order they were sent: a, then b, then d.
    let sent: Vec<String> = plan
        .iter()
        .filter(|p| p.2 == Priority::Bulk)
        .flat_map(|(name, n, _)| (0..*n).map(move |i| format!("{name}{i}")))
        .collect();
    assert_eq!(bulk_order, sent);
    let st = s.engine().stats();
    let counters = &st.devices[0].counters;
    assert_eq!((counters.batches, counters.samples), (3, 260));
    c.close().await;
    s.shutdown().await;
}
