//! How the NATS workers share the work (docs/DESIGN.md section 11): a worker whose device takes
//! 50 ms a batch, next to a normal one, gets under 10% of the batches (a worker fetches only
//! what its devices hold in flight); under a BULK backlog, CRITICAL samples overtake it (p99
//! latency at most a quarter of BULK's: CRITICAL is fetched first). Skipped with a printed
//! reason when `nats-server` is missing, unless FUSION_REQUIRE_NATS=1.

mod server_util;

use std::collections::HashMap;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusion_engine::client::{Client, Event};
use fusion_engine::cluster::gateway::{Gateway, GatewayConfig};
use fusion_engine::engine::Priority;
use fusion_engine::model::FusionHead;
use fusion_engine::server::{start_gateway, Server};
use fusion_engine::tensor::DType;
use server_util::nats::*;
use server_util::*;

fn metered(nats: &str, model: &Path, name: &str, devices: &str) -> (Child, u16) {
    let port = free_port();
    let child = worker_cmd(nats, model, name)
        .args(["--devices", devices, "--metrics-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .spawn()
        .expect("worker starts");
    (child, port)
}

/// An in-process gateway making batches of at most 10 samples; waits until `workers` workers
/// with its head are alive (its /healthz).
async fn gateway(nats: &str, head: &Arc<FusionHead>, workers: usize) -> (Server, String) {
    let gw = Gateway::connect(&GatewayConfig::new(nats), head)
        .await
        .expect("gateway connects");
    let mut cfg = config();
    cfg.max_batch = 10;
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    let server = start_gateway(cfg, Arc::clone(head), None, Some(Arc::new(gw)))
        .await
        .expect("gateway serves");
    let port = server.metrics_addr().unwrap().port();
    let want = format!("ok {workers} compatible workers");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(port, "/healthz");
        if body.starts_with(&want) {
            break;
        }
        assert!(Instant::now() < deadline, "workers never came: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ws = format!("ws://{}/", server.local_addr());
    (server, ws)
}

fn setup(dir: &Path) -> Option<(Child, String, Arc<FusionHead>, std::path::PathBuf)> {
    let (nats, url) = nats_server(&dir.join("js"))?;
    let head = small_head();
    let model = dir.join("head.safetensors");
    std::fs::write(&model, head.to_safetensors(DType::F32).unwrap()).unwrap();
    Some((nats, url, head, model))
}

/// `n` samples' feature blocks, one per modality.
fn blocks(head: &FusionHead, n: usize) -> Vec<Vec<f32>> {
    head.modalities
        .iter()
        .map(|m| (0..n).flat_map(|s| features(m.width, s as u64)).collect())
        .collect()
}

fn feats(b: &[Vec<f32>]) -> Vec<(&'static str, &[f32])> {
    ["vision", "text", "audio"]
        .into_iter()
        .zip(b)
        .map(|(n, v)| (n, &v[..]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_gets_under_a_tenth_of_the_batches() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, url, head, model)) = setup(dir.path()) else {
        return;
    };
    let (fast, fp) = metered(&url, &model, "fast", "cpu:threads=1");
    let (slow, sp) = metered(&url, &model, "slow", "cpu:threads=1:delay=50ms");
    let _procs = Procs(vec![nats, fast, slow]);
    let (server, ws) = gateway(&url, &head, 2).await;
    let mut c = Client::connect(&ws, None).await.unwrap();
    let n = 6000;
    let b = blocks(&head, n);
    let started = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(120),
        c.fuse_batch("s", &feats(&b), Priority::Important),
    )
    .await
    .expect("in time")
    .unwrap();
    assert_eq!(got.len(), n);
    let done = |port| {
        metric(
            &http_get(port, "/metrics").1,
            "fusion_worker_results_published_total",
        )
    };
    let (f, s) = (done(fp), done(sp));
    let share = s / (f + s);
    eprintln!(
        "{n} samples in {:.1} s: fast worker {f} batches, slow {s} ({:.1}%)",
        started.elapsed().as_secs_f64(),
        share * 100.0
    );
    assert!(
        f + s >= (n / 10) as f64,
        "{f} + {s} batches for {n} samples"
    );
    assert!(
        share < 0.10,
        "the slow worker got {:.1}% of the batches",
        share * 100.0
    );
    server.shutdown().await;
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_overtakes_a_bulk_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, url, head, model)) = setup(dir.path()) else {
        return;
    };
    // One worker at 10 ms a batch of 10: about 1,000 samples/s; BULK is offered faster.
    let (w, _) = metered(&url, &model, "w", "cpu:threads=1:delay=10ms");
    let _procs = Procs(vec![nats, w]);
    let (server, ws) = gateway(&url, &head, 1).await;
    let mut sub = Client::connect(&ws, None).await.unwrap();
    sub.subscribe("bulk").await.unwrap();
    sub.subscribe("crit").await.unwrap();
    let mut bulk = Client::connect(&ws, None).await.unwrap();
    let mut crit = Client::connect(&ws, None).await.unwrap();
    let chunk = 50;
    let b = blocks(&head, chunk);
    let one = blocks(&head, 1);
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let (mut lat_b, mut lat_c) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let (mut nb, mut nc) = (0usize, 0usize);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while start.elapsed() < Duration::from_secs(8) {
        tokio::select! {
            _ = tick.tick() => {
                // Every 20 ms: 100 BULK samples (5,000/s offered) and one CRITICAL sample.
                for _ in 0..2 {
                    let keys: Vec<String> = (nb..nb + chunk).map(|i| format!("b{i}")).collect();
                    let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
                    bulk.produce_samples("bulk", &kr, &feats(&b), Priority::Bulk, 0).await.unwrap();
                    let now = Instant::now();
                    sent.extend(keys.into_iter().map(|k| (k, now)));
                    nb += chunk;
                }
                let k = format!("c{nc}");
                crit.produce_samples("crit", &[&k], &feats(&one), Priority::Critical, 0).await.unwrap();
                sent.insert(k, Instant::now());
                nc += 1;
            }
            ev = sub.next_event() => match ev {
                Some(Event::Result(r)) => {
                    let l = sent[&r.key].elapsed().as_secs_f64();
                    if r.key.starts_with('c') { lat_c.push(l) } else { lat_b.push(l) }
                }
                Some(Event::Closed { code, reason }) => panic!("closed {code:?} {reason}"),
                _ => {}
            },
            ev = crit.next_event() => if let Some(Event::Error { code, raw, .. }) = ev {
                panic!("CRITICAL refused: {code} {raw}");
            },
            _ = bulk.next_event() => {} // shed notices: BULK beyond the bound
        }
    }
    assert!(
        lat_c.len() * 10 >= nc * 9,
        "{} of {nc} CRITICAL results",
        lat_c.len()
    );
    assert!(lat_b.len() >= 100, "only {} BULK results", lat_b.len());
    let (pc, pb) = (p99(&mut lat_c), p99(&mut lat_b));
    eprintln!(
        "p99 latency: CRITICAL {:.1} ms ({} results), BULK {:.1} ms ({} of {nb})",
        pc * 1e3,
        lat_c.len(),
        pb * 1e3,
        lat_b.len()
    );
    assert!(pc * 4.0 <= pb, "CRITICAL p99 {pc:.3} s vs BULK {pb:.3} s");
    server.shutdown().await;
}
