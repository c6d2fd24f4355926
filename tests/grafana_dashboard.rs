//! docs/grafana/fusion-engine.json against a live server: every metric name that a query of the
//! dashboard uses appears in `GET /metrics` of a `fusion-engine serve --metrics` process. The
//! metrics exported only once their event happened are made to exist first: the slow-consumer
//! loadgen scenario (drops, 1013 closes), a device that always fails (device errors, state
//! changes), a refused handshake, and a garbage frame (an error message sent).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_fusion-engine");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docs/grafana/fusion-engine.json"
);

/// The server process, killed when the test ends (or panics).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two free loopback addresses (both bound at once, so they differ; then released).
fn free_addrs() -> (SocketAddr, SocketAddr) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap(), b.local_addr().unwrap())
}

/// A plain HTTP/1.0 GET: (status code, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

fn start_server(ws: SocketAddr, metrics: SocketAddr) -> Server {
    let child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &ws.to_string(),
            "--metrics",
            &metrics.to_string(),
        ])
        // The second device fails every batch: device errors, retries and a state change. The
        // first takes 2 ms more per batch, so that batches spill over to the second (small
        // batches run on the device's own thread since session 11 and finished so fast that
        // none ever did).
        .args(["--devices", "cpu:threads=1:delay=2ms,cpu:threads=1:fail=1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fusion-engine serve starts");
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("fusion-engine serve exited early: {status}");
        }
        if matches!(http_get(metrics, "/metrics"), Ok((200, _))) && TcpStream::connect(ws).is_ok() {
            return server;
        }
        assert!(Instant::now() < deadline, "server did not come up in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The slow-consumer scenario against the server (its subscribers stall: drops and 1013 closes).
fn slow_consumer_load(ws: SocketAddr, metrics: SocketAddr) -> Output {
    Command::new(BIN)
        .args([
            "loadgen",
            "--url",
            &format!("ws://{ws}/"),
            "--metrics",
            &metrics.to_string(),
        ])
        .args([
            "--scenario",
            "slow-consumer",
            "--duration",
            "5",
            "--rate",
            "8000",
            "--json",
        ])
        .output()
        .expect("fusion-engine loadgen runs")
}

/// A plain HTTP request on the WebSocket port: the handshake is refused.
fn refused_handshake(ws: SocketAddr) {
    let mut s = TcpStream::connect(ws).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: {ws}\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

/// A garbage binary frame on a WebSocket connection: the server answers with an error message.
fn garbage_frame(ws: SocketAddr) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut c, _) = tokio_tungstenite::connect_async(format!("ws://{ws}/"))
            .await
            .expect("WebSocket connects");
        c.send(Message::Binary(b"not a frame".to_vec().into()))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, c.next()).await {
            if m.to_text().is_ok_and(|t| t.contains("\"error\"")) {
                break;
            }
        }
        let _ = c.close(None).await;
    });
}

/// The exported sample names and the `# TYPE` of each metric family.
fn exported(text: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                types.insert(name.to_string(), kind.to_string());
            }
        } else if !line.is_empty() && !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            samples.insert(line[..end].to_string());
        }
    }
    (samples, types)
}

/// Whether `name`, as a query uses it, is exported: a sample name or a metric family, or a
/// histogram's `_bucket`, or a histogram's or summary's `_sum`/`_count`.
fn is_exported(name: &str, samples: &BTreeSet<String>, types: &BTreeMap<String, String>) -> bool {
    if samples.contains(name) || types.contains_key(name) {
        return true;
    }
    let suffixes: [(&str, &[&str]); 3] = [
        ("_bucket", &["histogram"]),
        ("_sum", &["histogram", "summary"]),
        ("_count", &["histogram", "summary"]),
    ];
    suffixes.iter().any(|(suffix, kinds)| {
        name.strip_suffix(suffix)
            .and_then(|base| types.get(base))
            .is_some_and(|kind| kinds.contains(&kind.as_str()))
    })
}

/// The metric names a PromQL expression selects: identifiers outside strings, label matchers
/// `{..}`, ranges `[..]`, Grafana variables (`$x`, `${x}`) and `by/without/on/ignoring/group_*`
/// label lists, that are neither functions, aggregations nor keywords.
fn metric_names(expr: &str) -> Vec<String> {
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &[
        "bool", "and", "or", "unless", "offset", "atan2", "inf", "nan",
    ];
    let c: Vec<char> = expr.chars().collect();
    let ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let ident_char = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    // The index after the string starting at `i`, or after the group closing at `close`.
    let skip_string = |mut i: usize| {
        let q = c[i];
        i += 1;
        while i < c.len() && c[i] != q {
            i += if c[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    let skip_group = |mut i: usize, close: char| {
        while i < c.len() && c[i] != close {
            i = if matches!(c[i], '"' | '\'' | '`') {
                skip_string(i)
            } else {
                i + 1
            };
        }
        i + 1
    };
    let next_non_space = |mut i: usize| {
        while i < c.len() && c[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if matches!(ch, '"' | '\'' | '`') {
            i = skip_string(i);
        } else if ch == '{' {
            i = skip_group(i + 1, '}');
        } else if ch == '[' {
            i = skip_group(i + 1, ']');
        } else if ch == '$' {
            i = if c.get(i + 1) == Some(&'{') {
                skip_group(i + 2, '}')
            } else {
                let mut j = i + 1;
                while j < c.len() && ident_char(c[j]) {
                    j += 1;
                }
                j
            };
        } else if ch.is_ascii_digit() || ch == '.' {
            // A number or a duration (0.99, 5m, 1e-3).
            i += 1;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ident_start(ch) {
            let start = i;
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = next_non_space(i);
            let after: String = c[next..].iter().take_while(|ch| ident_char(**ch)).collect();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if c.get(next) == Some(&'(') {
                    i = skip_group(next + 1, ')');
                }
            } else if c.get(next) == Some(&'(')
                || (AGGREGATIONS.contains(&lower.as_str())
                    && matches!(after.as_str(), "by" | "without"))
                || KEYWORDS.contains(&lower.as_str())
            {
                // A function, an aggregation or a keyword.
            } else {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every query of the dashboard: the `expr` of each target of each panel (rows' panels too).
fn queries(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            if let Some(Value::Array(targets)) = o.get("targets") {
                let title = o.get("title").and_then(Value::as_str).unwrap_or("?");
                for t in targets {
                    let expr = t.get("expr").and_then(Value::as_str).unwrap_or("");
                    out.push((title.to_string(), expr.to_string()));
                }
            }
            for (k, child) in o {
                if k != "targets" {
                    queries(child, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|child| queries(child, out)),
        _ => {}
    }
}

#[test]
fn promql_metric_names_are_extracted() {
    assert_eq!(
        metric_names(
            r#"sum by (class, le) (rate(fusion_a_total{class=~"x|y", q="}]by("}[$__rate_interval]))"#
        ),
        ["fusion_a_total"]
    );
    assert_eq!(
        metric_names(
            "sum(rate(b_sum[5m])) / on (device) group_left (x) sum without (k) (b_count offset 1h) \
             * 0.99 > bool 1e3 and max(${DS}) or topk(3, c)"
        ),
        ["b_sum", "b_count", "c"]
    );
    let (samples, types) = exported(
        "# TYPE h_seconds summary\nh_seconds{quantile=\"0.5\"} 1\nh_seconds_sum 2\n\
         h_seconds_count 3\n# TYPE g gauge\ng{device=\"cpu:0\"} 0\n",
    );
    for name in ["h_seconds", "h_seconds_sum", "h_seconds_count", "g"] {
        assert!(is_exported(name, &samples, &types), "{name}");
    }
    // A misspelled name, or a histogram's bucket of what is a summary, is not.
    for name in ["gg", "h_second", "h_seconds_bucket", "fusion_a_total"] {
        assert!(!is_exported(name, &samples, &types), "{name}");
    }
}

#[test]
fn every_dashboard_metric_is_exported_by_a_live_server() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard file"))
            .expect("dashboard is JSON");
    // Importable: a Prometheus data source input, used by every panel.
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let mut exprs = Vec::new();
    queries(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "only {} queries", exprs.len());
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{}",
                p["title"]
            );
        }
    }
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr:?}");
        for n in names {
            used.entry(n).or_default().push(title.clone());
        }
    }

    let (ws, metrics) = free_addrs();
    let _server = start_server(ws, metrics);
    refused_handshake(ws);
    garbage_frame(ws);
    // A 1013 close needs the stalled readers' queues to fill, which takes longer on a slow or busy
    // machine: up to three runs of the scenario, until nothing is missing.
    for run in 1..=3 {
        let load = slow_consumer_load(ws, metrics);
        let (code, text) = http_get(metrics, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{text}");
        let (samples, types) = exported(&text);
        let missing: Vec<String> = used
            .iter()
            .filter(|(name, _)| !is_exported(name, &samples, &types))
            .map(|(name, panels)| format!("{name} (in {panels:?})"))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            run < 3,
            "not in /metrics: {missing:#?}\nexported: {:?}\nloadgen: {}\n{}",
            types.keys().collect::<Vec<_>>(),
            String::from_utf8_lossy(&load.stdout),
            String::from_utf8_lossy(&load.stderr)
        );
    }
}
