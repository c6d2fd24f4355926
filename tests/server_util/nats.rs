//! Shared set-up of the NATS cluster tests (docs/DESIGN.md section 11): a real `nats-server -js`
//! on a free loopback port (skipped with a printed reason when the binary is missing, unless
//! FUSION_REQUIRE_NATS=1), `fusion-engine worker` subprocesses, and children killed however the
//! test ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Child processes killed when the test ends, however it ends.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// True when nats-server can run; prints why not (and fails under FUSION_REQUIRE_NATS=1).
pub fn have_nats() -> bool {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    let why = "nats-server not found (apt-get install nats-server; scripts/setup does)";
    assert!(
        std::env::var("FUSION_REQUIRE_NATS").as_deref() != Ok("1"),
        "{why}"
    );
    eprintln!("skipped: {why}");
    false
}

/// Starts nats-server with JetStream storing in `dir` on `port`, waiting until it listens.
pub fn nats_on(dir: &Path, port: u16) -> Child {
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    wait_listening(port, Duration::from_secs(10));
    child
}

/// Starts nats-server with JetStream in `dir`, or None (skip) when the binary is missing.
pub fn nats_server(dir: &Path) -> Option<(Child, String)> {
    if !have_nats() {
        return None;
    }
    let port = free_port();
    Some((nats_on(dir, port), format!("nats://127.0.0.1:{port}")))
}

pub fn wait_listening(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `fusion-engine worker` on one CPU thread with ack_wait 2 s; add arguments, then spawn.
pub fn worker_cmd(nats: &str, model: &Path, name: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fusion-engine"));
    c.args(["worker", "--nats", nats, "--ack-wait", "2", "--name", name])
        .arg("--model")
        .arg(model)
        .stdout(Stdio::null());
    c
}

pub fn worker(nats: &str, model: &Path, name: &str) -> Child {
    worker_cmd(nats, model, name)
        .args(["--devices", "cpu:threads=1"])
        .spawn()
        .expect("worker starts")
}

/// Spawns `cmd` with stderr collected (and echoed) into the returned buffer.
pub fn spawn_logged(cmd: &mut Command) -> (Child, Arc<Mutex<String>>) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().expect("starts");
    let log = Arc::new(Mutex::new(String::new()));
    let (err, l) = (child.stderr.take().unwrap(), Arc::clone(&log));
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            eprintln!("{line}");
            l.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    (child, log)
}

/// `GET path` on 127.0.0.1:port: (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("http connects");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    let code = r.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (code, body.to_string())
}

/// The sum of a Prometheus metric's samples (every label set) in `text`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
