//! The NATS scale-out under bad conditions (docs/DESIGN.md section 11), each with a clear answer:
//! NATS unreachable at start (`serve --nats` and `worker --nats` exit non-zero naming the URL;
//! an unreadable `--nats-creds` or `--nats-tls-ca` file is named);
//! JetStream's bound on queued batches (a tiny `max_bytes`, no worker) answered to producers as
//! `overloaded` (IMPORTANT) and `shed` (BULK), the batches it held computed once a worker comes;
//! a worker with another head refuses the work, logs why, and the gateway's `/healthz` says no
//! compatible worker is alive. Skipped with a printed reason when `nats-server` is missing,
//! unless FUSION_REQUIRE_NATS=1 (the unreachable case needs no server and always runs).

mod server_util;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
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

/// Runs the CLI and returns (exit status success?, stderr), killing it after 30 s.
fn run_cli(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (st.success(), String::from_utf8_lossy(&out.stderr).into());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} still running after 30 s with NATS unreachable");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unreachable_nats_fails_at_start_naming_the_url() {
    let url = format!("nats://127.0.0.1:{}", free_port()); // nothing listens there
    let listen = format!("127.0.0.1:{}", free_port());
    let serve = [
        "serve",
        "--nats",
        &url,
        "--listen",
        &listen,
        "--devices",
        "cpu:threads=1",
    ];
    let worker = ["worker", "--nats", &url, "--devices", "cpu:threads=1"];
    for args in [&serve[..], &worker[..]] {
        let (ok, err) = run_cli(args);
        assert!(!ok, "{args:?} exited 0");
        assert!(
            err.contains(&format!("cannot connect to NATS at {url}")),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn unreadable_nats_credentials_and_ca_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", free_port());
    let garbage = dir.path().join("garbage.creds");
    std::fs::write(&garbage, "not a credentials file\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let (g, m) = (garbage.to_str().unwrap(), missing.to_str().unwrap());
    let listen = format!("127.0.0.1:{}", free_port());
    for (flag, file) in [("--nats-creds", g), ("--nats-tls-ca", m)] {
        let serve = ["serve", "--nats", &url, "--listen", &listen, flag, file];
        let worker = ["worker", "--nats", &url, flag, file];
        for args in [&serve[..], &worker[..]] {
            let (ok, err) = run_cli(args);
            assert!(!ok, "{args:?} exited 0");
            assert!(err.contains(&format!("{flag} {file}")), "{args:?}: {err}");
        }
    }
}

fn write_head(dir: &Path, name: &str, head: &FusionHead) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, head.to_safetensors(DType::F32).unwrap()).unwrap();
    p
}

/// An in-process gateway on `nats` (its /healthz on a free port).
async fn gateway(nats: &str, head: &Arc<FusionHead>, max_bytes: i64) -> (Server, String) {
    let mut gc = GatewayConfig::new(nats);
    gc.max_bytes = max_bytes;
    let gw = Gateway::connect(&gc, head).await.expect("gateway connects");
    let mut cfg = config();
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    let server = start_gateway(cfg, Arc::clone(head), None, Some(Arc::new(gw)))
        .await
        .expect("gateway serves");
    let ws = format!("ws://{}/", server.local_addr());
    (server, ws)
}

/// The keys an `error` / `shed` notice is about.
fn keys_of(raw: &serde_json::Value) -> Vec<String> {
    raw["keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| Some(k.as_str()?.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_stream_refuses_producers_and_keeps_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let mut procs = Procs(vec![nats]);
    let head = small_head();
    let model = write_head(dir.path(), "head.safetensors", &head);
    // About four 10-sample batches (192 bytes of features per sample) fit; no worker runs.
    let (server, ws) = gateway(&url, &head, 10_000).await;
    let mut sub = Client::connect(&ws, None).await.unwrap();
    sub.subscribe("cam").await.unwrap();
    let mut prod = Client::connect(&ws, None).await.unwrap();
    let x: Vec<Vec<Vec<f32>>> = (0..10)
        .map(|s| {
            head.modalities
                .iter()
                .map(|m| features(m.width, s))
                .collect()
        })
        .collect();
    let blocks: Vec<Vec<f32>> = (0..3)
        .map(|m| x.iter().flat_map(|s| s[m].iter().copied()).collect())
        .collect();
    let names = ["vision", "text", "audio"];
    let feats: Vec<(&str, &[f32])> = names
        .iter()
        .zip(&blocks)
        .map(|(n, b)| (*n, &b[..]))
        .collect();
    let (mut sent, mut refused) = (Vec::new(), HashSet::new());
    // IMPORTANT chunks, one at a time, until the stream is full: `overloaded` naming the keys.
    for c in 0..40 {
        let keys: Vec<String> = (0..10).map(|i| format!("i{c}-{i}")).collect();
        let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        prod.produce_samples("cam", &kr, &feats, Priority::Important, 0)
            .await
            .unwrap();
        sent.extend(keys);
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match next(&mut prod, 5.0).await {
                    Event::Error { code, raw, .. } => return (code, raw),
                    _ => continue,
                }
            }
        })
        .await;
        if let Ok((code, raw)) = got {
            assert_eq!(code, "overloaded", "{raw}");
            refused.extend(keys_of(&raw));
            break;
        }
    }
    assert!(!refused.is_empty(), "40 chunks and never refused");
    assert!(refused.len() < sent.len(), "nothing was stored");
    // BULK samples refused by the full stream are `shed`, protocol unchanged.
    let keys: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    let kr: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    prod.produce_samples("cam", &kr, &feats, Priority::Bulk, 0)
        .await
        .unwrap();
    let shed = loop {
        match next(&mut prod, 5.0).await {
            Event::Control(v) if v["kind"] == "shed" => break v,
            Event::Error { code, raw, .. } => panic!("BULK got error {code}: {raw}"),
            _ => {}
        }
    };
    assert_eq!(keys_of(&shed).len(), 10, "{shed}");
    // A worker comes: the batches JetStream held are computed, each stored sample once.
    procs.0.push(worker(&url, &model, "late"));
    let want: HashSet<String> = sent
        .iter()
        .filter(|k| !refused.contains(*k))
        .cloned()
        .collect();
    let mut got = HashSet::new();
    while got.len() < want.len() {
        match next(&mut sub, 30.0).await {
            Event::Result(r) => {
                let i: usize = r.key.rsplit('-').next().unwrap().parse().unwrap();
                let (ef, ew) = check(&head, &x[i], &[1, 1, 1], &r.fused, &r.weights);
                assert!(ef <= 1e-5 && ew <= 1e-5);
                assert!(
                    want.contains(&r.key),
                    "result of a refused sample {}",
                    r.key
                );
                assert!(got.insert(r.key.clone()), "{} twice", r.key);
            }
            Event::Error { code, raw, .. } => panic!("{code}: {raw}"),
            _ => {}
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_head_refuses_and_healthz_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let Some((nats, url)) = nats_server(&dir.path().join("js")) else {
        return;
    };
    let head = small_head();
    let model = write_head(dir.path(), "head.safetensors", &head);
    let other = server_util::head(&[("vision", 24), ("text", 16), ("audio", 8)], 32, 8);
    let other_model = write_head(dir.path(), "other.safetensors", &other);
    let (server, ws) = gateway(&url, &head, 1 << 24).await;
    let health = server.metrics_addr().unwrap().port();
    let metrics_port = free_port();
    let (wrong, log) = spawn_logged(
        worker_cmd(&url, &other_model, "wrong")
            .args(["--devices", "cpu:threads=1", "--metrics-listen"])
            .arg(format!("127.0.0.1:{metrics_port}")),
    );
    let mut procs = Procs(vec![nats, wrong]);
    // Its heartbeat announces the other head: 503, no compatible worker.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (code, body) = http_get(health, "/healthz");
        if body.contains("(1 alive with another head)") {
            assert_eq!(code, 503, "{body}");
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "healthz never saw the worker: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.starts_with("no compatible worker"), "{body}");
    let fp = format!(
        "{:016x}",
        fusion_engine::cluster::fingerprint::fingerprint(&head)
    );
    assert!(body.contains(&fp), "{body}");
    // A sample's batch is refused with a clear log line and counted on the worker's /metrics.
    let mut c = Client::connect(&ws, None).await.unwrap();
    c.subscribe("s").await.unwrap();
    let x: Vec<Vec<f32>> = head
        .modalities
        .iter()
        .map(|m| features(m.width, 3))
        .collect();
    let feats: Vec<(&str, &[f32])> = ["vision", "text", "audio"]
        .iter()
        .zip(&x)
        .map(|(n, v)| (*n, &v[..]))
        .collect();
    c.produce_samples("s", &["k"], &feats, Priority::Critical, 0)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log.lock().unwrap().contains("refusing batch") {
        assert!(Instant::now() < deadline, "no refusal logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = log.lock().unwrap().clone();
    assert!(
        line.contains("is not this worker's") && line.contains(&fp),
        "{line}"
    );
    let (_, text) = http_get(metrics_port, "/metrics");
    assert!(
        metric(&text, "fusion_worker_refused_total") >= 1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "fusion_worker_results_published_total"), 0.0);
    // A worker with the gateway's head: healthy, and the refused batch is computed by it.
    procs.0.push(worker(&url, &model, "right"));
    let r = loop {
        match next(&mut c, 30.0).await {
            Event::Result(r) => break r,
            Event::Error { code, raw, .. } => panic!("{code}: {raw}"),
            _ => {}
        }
    };
    let (ef, ew) = check(&head, &x, &[1, 1, 1], &r.fused, &r.weights);
    assert!(ef <= 1e-5 && ew <= 1e-5);
    let (code, body) = http_get(health, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok 1 compatible workers"), "{body}");
    server.shutdown().await;
}
