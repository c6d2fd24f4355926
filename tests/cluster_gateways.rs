//! Several gateways on one NATS, and a gateway restart (docs/DESIGN.md section 11, "Several
//! gateways" and "Gateway identity"), against a real `nats-server -js`: a subscriber of gateway B
//! gets every result of samples produced into gateway A on the same stream exactly once (and
//! A's subscriber B's), equal to the float64 reference; a gateway SIGKILLed with batches in
//! flight and started again with the same `--gateway-id` fans their results out to a subscriber
//! of the new process, each once. Skipped with a printed reason when `nats-server` is missing,
//! unless FUSION_REQUIRE_NATS=1.

mod server_util;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusion_engine::client::{Client, Event, ResumePoint, SubscribeOptions};
use fusion_engine::cluster::gateway::{Gateway, GatewayConfig};
use fusion_engine::engine::Priority;
use fusion_engine::model::FusionHead;
use fusion_engine::server::{start_gateway, Server};
use fusion_engine::tensor::DType;
use server_util::nats::*;
use server_util::*;

const NAMES: [&str; 3] = ["vision", "text", "audio"];

/// The head written to `dir/head.safetensors` (for workers and subprocess gateways), loaded.
fn model(dir: &Path) -> (std::path::PathBuf, Arc<FusionHead>) {
    let p = dir.join("head.safetensors");
    std::fs::write(&p, small_head().to_safetensors(DType::F32).unwrap()).unwrap();
    let head = Arc::new(FusionHead::load(&p).unwrap());
    (p, head)
}

async fn gateway(url: &str, id: &str, head: &Arc<FusionHead>) -> (Server, String) {
    let mut gc = GatewayConfig::new(url);
    gc.id = Some(id.into());
    let gw = Gateway::connect(&gc, head).await.expect("gateway connects");
    assert_eq!(gw.id(), id);
    let server = start_gateway(config(), Arc::clone(head), None, Some(Arc::new(gw)))
        .await
        .expect("gateway serves");
    let ws = format!("ws://{}/", server.local_addr());
    (server, ws)
}

/// Sample `i`'s features, one vector per modality.
fn sample(h: &FusionHead, i: usize) -> Vec<Vec<f32>> {
    (h.modalities.iter().enumerate())
        .map(|(m, md)| features(md.width, i as u64 * 10 + m as u64))
        .collect()
}

/// Produces samples `first..first + n` (keys `k<i>`) on `stream`.
async fn produce(c: &mut Client, h: &FusionHead, stream: &str, first: usize, n: usize) {
    let xs: Vec<Vec<Vec<f32>>> = (first..first + n).map(|i| sample(h, i)).collect();
    let blocks: Vec<Vec<f32>> = (0..NAMES.len())
        .map(|m| xs.iter().flat_map(|x| x[m].iter().copied()).collect())
        .collect();
    let feats: Vec<(&str, &[f32])> = NAMES
        .iter()
        .zip(&blocks)
        .map(|(n, b)| (*n, &b[..]))
        .collect();
    let keys: Vec<String> = (first..first + n).map(|i| format!("k{i}")).collect();
    let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    c.produce_samples(stream, &kr, &feats, Priority::Important, 0)
        .await
        .unwrap();
}

/// What one subscriber received: key -> (count, stream seqs).
#[derive(Default)]
struct Got(HashMap<String, (u32, Vec<u64>)>);

impl Got {
    /// Counts a result after checking it against the reference (f32 within 1e-5).
    fn see(&mut self, h: &FusionHead, stream: &str, ev: Event) {
        match ev {
            Event::Result(r) => {
                assert_eq!(r.stream, stream);
                let i: usize = r.key[1..].parse().expect("a produced key");
                let (ef, ew) = check(h, &sample(h, i), &[1, 1, 1], &r.fused, &r.weights);
                assert!(
                    ef <= 1e-5 && ew <= 1e-5,
                    "{}: fused {ef:e} weights {ew:e}",
                    r.key
                );
                let e = self.0.entry(r.key).or_default();
                e.0 += 1;
                e.1.push(r.stream_seq);
            }
            Event::Error { code, raw, .. } => panic!("error {code}: {raw}"),
            Event::Closed { code, reason } => panic!("closed {code:?} {reason}"),
            _ => {}
        }
    }
}

/// A producer's event: an error fails the test.
fn refused(e: Option<Event>) {
    if let Some(Event::Error { raw, .. }) = e {
        panic!("producer: {raw}");
    }
}

/// Nothing more arrives on `c` within `secs` (a result delivered twice would).
async fn quiet(c: &mut Client, secs: u64) {
    let extra = tokio::time::timeout(Duration::from_secs(secs), async {
        loop {
            if let Some(Event::Result(r)) = c.next_event().await {
                return r.key;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "a result came twice: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_of_gateway_b_gets_what_gateway_a_computed_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let (m, h) = model(dir.path());
    let _procs = Procs(vec![nats, worker(&url, &m, "w")]);
    let (a, wa) = gateway(&url, "gw-a", &h).await;
    let (b, wb) = gateway(&url, "gw-b", &h).await;
    // Any character in a stream name: the subject carries a hash of it.
    let stream = "cam/1 \u{e9}.*>";
    let mut sub_a = Client::connect(&wa, None).await.unwrap();
    let mut sub_b = Client::connect(&wb, None).await.unwrap();
    sub_a.subscribe(stream).await.unwrap();
    sub_b.subscribe(stream).await.unwrap();
    let mut prod_a = Client::connect(&wa, None).await.unwrap();
    let mut prod_b = Client::connect(&wb, None).await.unwrap();
    // 200 samples into A, 100 into B, 10 at a time, at most 100 unanswered.
    let (total, chunk) = (300, 10);
    let (mut got_a, mut got_b) = (Got::default(), Got::default());
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while got_a.0.len() < total || got_b.0.len() < total {
        assert!(
            Instant::now() < deadline,
            "{sent} sent; A's subscriber has {}, B's {}",
            got_a.0.len(),
            got_b.0.len()
        );
        if sent < total && sent < got_a.0.len().min(got_b.0.len()) + 100 {
            let p = if (sent / chunk) % 3 == 2 {
                &mut prod_b
            } else {
                &mut prod_a
            };
            produce(p, &h, stream, sent, chunk).await;
            sent += chunk;
            continue;
        }
        tokio::select! {
            e = next(&mut sub_a, 30.0) => got_a.see(&h, stream, e),
            e = next(&mut sub_b, 30.0) => got_b.see(&h, stream, e),
            e = prod_a.next_event() => refused(e),
            e = prod_b.next_event() => refused(e),
        }
    }
    quiet(&mut sub_b, 3).await;
    quiet(&mut sub_a, 1).await;
    for (name, got) in [("A", &got_a), ("B", &got_b)] {
        let twice: Vec<_> = got.0.iter().filter(|(_, (n, _))| *n != 1).collect();
        assert!(twice.is_empty(), "{name}'s subscriber: {twice:?}");
        // Stream seqs are each gateway's own: 1..=300 on both, each once.
        let mut seqs: Vec<u64> = got.0.values().flat_map(|(_, s)| s.clone()).collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "{name}'s stream seqs"
        );
    }
    eprintln!("{total} samples produced into two gateways: both subscribers got each once");
    a.shutdown().await;
    b.shutdown().await;
}

/// `fusion-engine serve --nats` as a subprocess gateway `id` with its WebSocket and metrics
/// ports; returns the child once it listens.
fn serve(url: &str, model: &Path, id: &str) -> (Child, u16, u16) {
    let (ws, metrics) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fusion-engine"));
    cmd.args([
        "serve",
        "--nats",
        url,
        "--gateway-id",
        id,
        "--devices",
        "cpu:threads=1",
    ])
    .args(["--listen", &format!("127.0.0.1:{ws}")])
    .args(["--metrics", &format!("127.0.0.1:{metrics}")])
    .arg("--model")
    .arg(model);
    let (child, _log) = spawn_logged(&mut cmd);
    wait_listening(ws, Duration::from_secs(30));
    wait_listening(metrics, Duration::from_secs(10));
    (child, ws, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_with_its_id_fans_out_the_batches_it_had_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let (m, h) = model(dir.path());
    // 1.5 s a batch on one device: every batch is still being computed when the gateway dies.
    let slow = worker_cmd(&url, &m, "slow")
        .args(["--devices", "cpu:threads=1:delay=1500ms"])
        .spawn()
        .unwrap();
    let mut procs = Procs(vec![nats, slow]);
    let (gw, port, mport) = serve(&url, &m, "gw-r");
    procs.0.push(gw);
    let ws = format!("ws://127.0.0.1:{port}/");
    let stream = "cam";
    let mut early = Client::connect(&ws, None).await.unwrap();
    early.subscribe(stream).await.unwrap();
    let mut prod = Client::connect(&ws, None).await.unwrap();
    let (n, chunk) = (40, 5);
    for first in (0..n).step_by(chunk) {
        produce(&mut prod, &h, stream, first, chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every sample batched and every batch stored in JetStream: then SIGKILL the gateway.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = http_get(mport, "/metrics");
        let samples = metric(&text, "fusion_server_samples_total");
        let batches = metric(&text, "fusion_server_batch_size_count");
        let stored = metric(&text, "fusion_nats_batches_published_total");
        if samples == n as f64 && stored == batches {
            eprintln!("{n} samples in {batches} batches stored; killing the gateway");
            break;
        }
        assert!(Instant::now() < deadline, "not all published: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    procs.0[2].kill().unwrap();
    let _ = procs.0[2].wait();
    // The test's premise: no result had come back before the kill.
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::ZERO, early.next_event()).await {
        assert!(
            !matches!(ev, Event::Result(_)),
            "a result before the kill: {ev:?}"
        );
    }
    let killed = Instant::now();
    let (gw, port, _) = serve(&url, &m, "gw-r");
    procs.0[2] = gw;
    let mut sub = Client::connect(&format!("ws://127.0.0.1:{port}/"), None)
        .await
        .unwrap();
    // A resume point from another epoch: what the new process fanned out before this subscribe
    // is replayed (IMPORTANT results are kept), what comes later arrives live.
    let resume = ResumePoint {
        epoch: 1,
        critical: 0,
        important: 0,
    };
    let opts = SubscribeOptions {
        resume: Some(resume),
        conflate: None,
    };
    sub.subscribe_with(stream, opts).await.unwrap();
    let mut got = Got::default();
    while got.0.len() < n {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "only {} of {n} results after the restart: {:?}",
            got.0.len(),
            got.0.keys().collect::<Vec<_>>()
        );
        got.see(&h, stream, next(&mut sub, 60.0).await);
    }
    quiet(&mut sub, 3).await;
    let twice: Vec<_> = got.0.iter().filter(|(_, (c, _))| *c != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    eprintln!(
        "the restarted gateway fanned out all {n} results, each once, {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_gateways_with_one_id_are_reported_and_a_bad_id_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let _procs = Procs(vec![nats]);
    let h = small_head();
    let mut gc = GatewayConfig::new(&url);
    gc.id = Some("gw-twin".into());
    let g1 = Gateway::connect(&gc, &h).await.expect("connects");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Alone (and without a worker): 503 for the worker, not for the id.
    let (ok, msg) = g1.health();
    assert!(!ok && msg.starts_with("no compatible worker"), "{msg}");
    let g2 = Gateway::connect(&gc, &h).await.expect("connects");
    let deadline = Instant::now() + Duration::from_secs(5);
    for g in [&g1, &g2] {
        loop {
            let (ok, msg) = g.health();
            if msg.starts_with("gateway id gw-twin is also used by another live gateway") {
                assert!(!ok);
                break;
            }
            assert!(Instant::now() < deadline, "{msg}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    gc.id = Some("a.b".into());
    let e = Gateway::connect(&gc, &h).await.err().expect("refused");
    assert!(e.to_string().contains("--gateway-id \"a.b\""), "{e}");
}
