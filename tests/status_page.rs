//! The status page on the metrics address (docs/DESIGN.md section 8, docs/PROTOCOL.md section 9):
//! `GET /status.json` under load, the HTTP edge cases (404, 405, HEAD, 400), and `GET /` rendered
//! by headless Chromium, whose DOM after the page's scripts ran must show the device names and a
//! throughput above 0. Without Chromium that test says why it skips, or fails when
//! `FUSION_REQUIRE_CHROMIUM=1` (CI: `.ci/run`).

mod server_util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusion_engine::client::Client;
use fusion_engine::engine::{DeviceSpec, EngineConfig, Priority};
use fusion_engine::server::{start_with_head, Server};
use serde_json::Value;
use server_util::{config, features, small_head};

/// A server on two CPU devices (`cpu:0`, `cpu:1`) with its metrics address, and load on it
/// (a producer of mixed classes, a subscriber draining) until dropped.
struct Loaded {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    http: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Loaded {
    fn start() -> Loaded {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = config();
        cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
        cfg.engine = EngineConfig::with_devices(
            DeviceSpec::parse_list("cpu:threads=1,cpu:threads=1").unwrap(),
        );
        let server = rt
            .block_on(start_with_head(cfg, small_head(), None))
            .expect("server starts");
        let http = server.metrics_addr().expect("a metrics address");
        let url = format!("ws://{}/", server.local_addr());
        let stop = Arc::new(AtomicBool::new(false));
        rt.spawn(load(url, Arc::clone(&stop)));
        Loaded {
            rt,
            server: Some(server),
            http,
            stop,
        }
    }

    fn status(&self) -> Value {
        let (code, body) = http(self.http, "GET /status.json HTTP/1.0\r\n\r\n");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status.json is JSON")
    }

    /// Waits until the server fused at least `n` samples.
    fn wait_for_samples(&self, n: u64) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            if s["samples_total"].as_u64().unwrap_or(0) >= n {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no load: {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown());
        }
    }
}

/// About 1000 samples/s in frames of 10 (critical, important, bulk in turn) on stream "cam",
/// and a subscriber of "cam" reading every result.
async fn load(url: String, stop: Arc<AtomicBool>) {
    let mut sub = Client::connect(&url, None)
        .await
        .expect("subscriber connects");
    sub.subscribe("cam").await.expect("subscribed");
    tokio::spawn(async move { while sub.next_event().await.is_some() {} });
    let p = Client::connect(&url, None)
        .await
        .expect("producer connects");
    let (v, t) = (features(24 * 10, 1), features(16 * 10, 2));
    let feats: [(&str, &[f32]); 2] = [("vision", &v), ("text", &t)];
    let classes = [Priority::Critical, Priority::Important, Priority::Bulk];
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let keys: Vec<String> = (0..10).map(|k| format!("k{i}-{k}")).collect();
        let kr: Vec<&str> = keys.iter().map(String::as_str).collect();
        let class = classes[(i % 3) as usize];
        if p.produce_samples("cam", &kr, &feats, class, 0)
            .await
            .is_err()
        {
            return;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `request` as is; (status code, body).
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

#[test]
fn status_json_under_load_and_http_edges() {
    let l = Loaded::start();
    l.wait_for_samples(300);
    std::thread::sleep(Duration::from_millis(300));
    let s = l.status();
    let names: Vec<&str> = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cpu:0", "cpu:1"], "{s}");
    for d in s["devices"].as_array().unwrap() {
        assert!(["HEALTHY", "SLOW", "FAILED"].contains(&d["state"].as_str().unwrap()));
        for k in ["queued", "in_flight", "batches", "samples"] {
            assert!(d[k].is_u64(), "{k}: {d}");
        }
        assert!(
            d["ms_per_sample"].is_null() || d["ms_per_sample"].is_f64(),
            "{d}"
        );
    }
    assert!(s["samples_per_s"].as_f64().unwrap() > 0.0, "{s}");
    let classes: Vec<&str> = s["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["class"].as_str().unwrap())
        .collect();
    assert_eq!(classes, ["control", "critical", "important", "bulk"]);
    for c in &s["classes"].as_array().unwrap()[1..] {
        assert!(c["sent"].as_u64().unwrap() > 0, "results were sent: {c}");
        assert!(c["dropped"].is_u64() && c["queue_depth"].is_u64(), "{c}");
        let p99 = c["latency_ms"]["p99"].as_f64().expect("a p99 under load");
        assert!(
            p99 > 0.0 && p99 >= c["latency_ms"]["p50"].as_f64().unwrap(),
            "{c}"
        );
    }
    assert_eq!(s["connections"]["open"], 2, "{s}");
    assert!(s["ingest"]["backpressure"].is_boolean(), "{s}");
    assert!(s["ingest"]["fill"].is_f64(), "{s}");
    assert!(s["closes"]["slow_consumer_1013"].is_u64(), "{s}");
    let cam = &s["streams"][0];
    assert_eq!(cam["name"], "cam", "{s}");
    assert_eq!(cam["subscribers"], 1, "{s}");
    assert!(cam["last_seq"].as_u64().unwrap() > 0, "{s}");

    // The page itself, and what the endpoint refuses.
    let (code, page) = http(l.http, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 200);
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("/status.json"));
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
    assert_eq!(http(l.http, "GET /nope HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(l.http, "POST /status.json HTTP/1.1\r\n\r\n").0, 405);
    let (code, body) = http(l.http, "HEAD / HTTP/1.1\r\n\r\n");
    assert_eq!((code, body.as_str()), (405, ""));
    assert_eq!(http(l.http, "garbage\r\n\r\n").0, 400);
    let huge = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(10_000));
    assert_eq!(http(l.http, &huge).0, 400);
    // Still serving after all that.
    assert_eq!(http(l.http, "GET /healthz HTTP/1.0\r\n\r\n").0, 200);
}

/// Chromium, or why not: `None` (test skipped) unless FUSION_REQUIRE_CHROMIUM=1.
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        let why = "no /usr/bin/chromium (scripts/setup installs Debian's chromium)";
        if std::env::var("FUSION_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("FUSION_REQUIRE_CHROMIUM=1 but {why}");
        }
        eprintln!("skipping the browser test: {why}");
    }
    found
}

/// The DOM after the page's scripts ran for 5 s of virtual time.
fn rendered_dom(chromium: &PathBuf, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` (up to its first child tag).
fn text_of<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(rest[start..end].trim())
}

#[test]
fn page_renders_devices_and_throughput_in_chromium() {
    let Some(chromium) = chromium() else {
        return;
    };
    let l = Loaded::start();
    l.wait_for_samples(300);
    let url = format!("http://{}/", l.http);
    // Load keeps going while Chromium runs; one retry for a slow start of the browser.
    let mut dom = String::new();
    for _ in 0..2 {
        dom = rendered_dom(&chromium, &url);
        let rate = text_of(&dom, "throughput").and_then(|t| t.parse::<f64>().ok());
        if rate.is_some_and(|r| r > 0.0) && dom.contains("id=\"device-cpu:1\"") {
            break;
        }
    }
    let rate = text_of(&dom, "throughput");
    assert!(
        rate.and_then(|t| t.parse::<f64>().ok())
            .is_some_and(|r| r > 0.0),
        "throughput {rate:?} in the rendered page:\n{dom}"
    );
    for name in ["cpu:0", "cpu:1"] {
        assert!(
            dom.contains(&format!("id=\"device-{name}\"")),
            "no tile for {name}:\n{dom}"
        );
        let tile = &dom[dom.find(&format!("id=\"device-{name}\"")).unwrap()..];
        assert!(
            tile.contains(&format!("<div class=\"name\">{name}</div>")),
            "{name} not shown:\n{dom}"
        );
    }
    let states = dom.matches("data-state=\"").count();
    assert_eq!(states, 2, "a state per device tile:\n{dom}");
    assert!(
        text_of(&dom, "connections").is_some_and(|t| t == "2"),
        "connections: {:?}",
        text_of(&dom, "connections")
    );
}
