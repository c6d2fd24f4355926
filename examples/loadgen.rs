//! End-to-end load over loopback WebSocket: P producer connections each send every modality of
//! its samples (binary F32, `last` on the final one) into its own stream, subscribed on the
//! same connection, with at most `--window` samples outstanding (keep it under the class's
//! send queue, 400 for IMPORTANT by default, or results are dropped and reported); reports samples/s, p50/p99
//! latency (first modality sent -> result received) and peak RSS.
//!
//! In-process server on the CPU (default) or an external one:
//!   cargo run --release --no-default-features --example loadgen -- --samples 200000
//!   cargo run --release --example loadgen -- --url ws://127.0.0.1:7878/

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use fusion_engine::engine::{DeviceSpec, Priority};
use fusion_engine::model::FusionHead;
use fusion_engine::server::codec::{decode_result, encode_produce, FLAG_LAST};
use fusion_engine::server::{start_with_head, ServerConfig};
use fusion_engine::tensor::DType;

struct Args {
    url: Option<String>,
    samples: usize,
    producers: usize,
    window: usize,
    devices: String,
    priority: Priority,
    stalled: usize,
}

fn args() -> Args {
    let mut a = Args {
        url: None,
        samples: 100_000,
        producers: 2,
        window: 384,
        devices: "cpu".into(),
        priority: Priority::Important,
        stalled: 0,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        let x = v[i + 1].clone();
        match v[i].as_str() {
            "--url" => a.url = Some(x),
            "--samples" => a.samples = x.parse().expect("--samples N"),
            "--producers" => a.producers = x.parse().expect("--producers N"),
            "--window" => a.window = x.parse().expect("--window N"),
            "--devices" => a.devices = x,
            "--stalled" => a.stalled = x.parse().expect("--stalled N"),
            "--priority" => {
                a.priority = fusion_engine::server::codec::priority_named(&x)
                    .expect("critical|important|bulk")
            }
            o => panic!("unknown option {o}"),
        }
        i += 2;
    }
    a
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let a = args();
    let prom = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let head = Arc::new(FusionHead::embedded());
    let mut server = None;
    let url = match &a.url {
        Some(u) => u.clone(),
        None => {
            let mut cfg = ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..ServerConfig::default()
            };
            cfg.engine.devices = DeviceSpec::parse_list(&a.devices).unwrap();
            let s = start_with_head(cfg, head.clone(), prom.clone())
                .await
                .expect("server");
            let u = format!("ws://{}/", s.local_addr());
            server = Some(s);
            u
        }
    };
    let mods: Vec<(String, Vec<u8>)> = head
        .modalities
        .iter()
        .enumerate()
        .map(|(m, md)| {
            let x: Vec<f32> = (0..md.width)
                .map(|i| ((i * 7 + m * 13) % 101) as f32 / 50.0 - 1.0)
                .collect();
            (md.name.clone(), bytemuck::cast_slice(&x).to_vec())
        })
        .collect();
    let mods = Arc::new(mods);
    let per = a.samples / a.producers;
    // Stalled subscribers: subscribe to every producer stream, then never read.
    let mut stalled = Vec::new();
    for _ in 0..a.stalled {
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect");
        ws.send(Message::text(
            r#"{"type":"hello","version":1,"results":"binary"}"#,
        ))
        .await
        .unwrap();
        for p in 0..a.producers {
            ws.send(Message::text(format!(
                r#"{{"type":"subscribe","stream":"lg-{p}"}}"#
            )))
            .await
            .unwrap();
        }
        stalled.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..a.producers {
        let (url, mods, window, prio) = (url.clone(), mods.clone(), a.window, a.priority);
        tasks.push(tokio::spawn(async move {
            producer(p, &url, per, window, prio, &mods).await
        }));
    }
    let mut lat: Vec<u64> = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("producer"));
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let q = |f: f64| {
        lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)))
            .map_or(f64::NAN, |v| *v as f64 / 1e6)
    };
    println!(
        "loadgen: {} samples in {secs:.2} s = {:.0} samples/s over {} connections (window {}, {:?}, {} stalled subscribers); latency p50 {:.2} ms p99 {:.2} ms; peak RSS {:.0} MiB",
        lat.len(),
        lat.len() as f64 / secs,
        a.producers,
        a.window,
        a.priority,
        a.stalled,
        q(0.5),
        q(0.99),
        peak_rss_mib()
    );
    if let Some(p) = &prom {
        let text = p.render();
        for l in text.lines().filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("fusion_server_slow_consumer_total")
                    || l.starts_with("fusion_server_dropped_total")
                    || l.starts_with("fusion_server_backpressure_events_total"))
        }) {
            println!("  {l}");
        }
    }
    drop(stalled);
    if let Some(s) = server {
        s.shutdown().await;
    }
}

/// Returns the latencies (ns) of its samples.
async fn producer(
    p: usize,
    url: &str,
    n: usize,
    window: usize,
    prio: Priority,
    mods: &[(String, Vec<u8>)],
) -> Vec<u64> {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let stream = format!("lg-{p}");
    tx.send(Message::text(
        r#"{"type":"hello","version":1,"results":"binary"}"#,
    ))
    .await
    .unwrap();
    tx.send(Message::text(format!(
        r#"{{"type":"subscribe","stream":"{stream}"}}"#
    )))
    .await
    .unwrap();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let room = Arc::new(Semaphore::new(window));
    let base = Instant::now();
    let recv = {
        let (sent, room) = (sent.clone(), room.clone());
        tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            let mut lost = 0usize;
            while lat.len() + lost < n {
                match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        let r = decode_result(&b).expect("result");
                        let i: usize = r.key.parse().expect("key");
                        let now = base.elapsed().as_nanos() as u64;
                        lat.push(now.saturating_sub(sent[i].load(Ordering::Relaxed)));
                        room.add_permits(1);
                    }
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let v: serde_json::Value =
                            serde_json::from_str(t.as_str()).unwrap_or_default();
                        if v["kind"] == "dropped" {
                            let c = v["count"].as_u64().unwrap_or(0) as usize;
                            lost += c;
                            room.add_permits(c);
                            eprintln!(
                                "producer {p}: {c} results dropped (window above the send queue?)"
                            );
                        } else if v["type"] == "error" || v["kind"] == "shed" {
                            eprintln!("producer {p}: {t}");
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    other => {
                        eprintln!(
                            "producer {p}: stopped after {} results: {other:?}",
                            lat.len()
                        );
                        break;
                    }
                }
            }
            lat
        })
    };
    for i in 0..n {
        room.acquire().await.expect("semaphore").forget();
        let key = i.to_string();
        sent[i].store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        for (j, (name, bytes)) in mods.iter().enumerate() {
            let flags = if j + 1 == mods.len() { FLAG_LAST } else { 0 };
            let f = encode_produce(&stream, &key, name, DType::F32, prio, flags, 0, bytes).unwrap();
            tx.feed(Message::binary(f)).await.unwrap();
        }
        if i % 32 == 31 {
            tx.flush().await.unwrap();
        }
    }
    tx.flush().await.unwrap();
    let lat = recv.await.expect("receiver");
    let _ = tx.send(Message::Close(None)).await;
    lat
}
