//! `loadgen --url` against a separate `fusion-engine serve` process, without `--metrics`, as a
//! new user runs it from the README: the slow-consumer scenario passes its own checks, the
//! stalled subscriber among them (it must stall, be closed 1013 and read a close naming the
//! last seq it read). Before the fix its probe channel closed at once without a metrics
//! scraper, so the stalled subscriber kept reading and was never closed.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fusion-engine");

/// The server process, killed when the test ends (or panics).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start_server(ws: SocketAddr) -> Server {
    let child = Command::new(BIN)
        .args(["serve", "--listen", &ws.to_string(), "--devices", "cpu"])
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
        if TcpStream::connect(ws).is_ok() {
            return server;
        }
        assert!(Instant::now() < deadline, "server did not come up in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn slow_consumer_scenario_passes_against_a_separate_server_without_metrics() {
    let ws = free_addr();
    let _server = start_server(ws);
    let plot = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "loadgen",
            "--url",
            &format!("ws://{ws}/"),
            "--scenario",
            "slow-consumer",
            "--duration",
            "10",
            "--json",
            "--plot",
        ])
        .arg(plot.path().join("p.svg"))
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "loadgen printed no JSON report ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = report["checks"].as_object().expect("checks");
    assert_eq!(
        checks.get("stalled_closed_1013_naming_its_last_seq"),
        Some(&Value::Bool(true)),
        "report: {report}"
    );
    assert_eq!(report["stalled_close_code"], 1013, "report: {report}");
    // The stalled subscriber stopped reading: it read far fewer than were produced.
    let read = report["stalled_last_seq_read"].as_u64().unwrap_or(u64::MAX);
    let sent: u64 = ["critical", "important", "bulk"]
        .iter()
        .map(|c| report["samples_sent"][c].as_u64().unwrap_or(0))
        .sum();
    assert!(read < sent, "stalled read {read} of {sent}: {report}");
    assert!(
        checks.values().all(|v| v == &Value::Bool(true)),
        "every check passes: {report}"
    );
    assert!(out.status.success(), "loadgen exit: {}", out.status);
}
