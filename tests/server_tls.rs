//! `wss://` (issue 20; docs/DESIGN.md section 7, docs/PROTOCOL.md section 1): a certificate made
//! in the test with rcgen, a TLS round trip with the Rust client against the f64 reference, a
//! plain `ws://` client (and garbage, and a client that does not trust the certificate) refused
//! with a clear error while the server keeps serving, and bad certificate or key files refused
//! at start, in process and by `fusion-engine serve`.

mod server_util;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use fusion_engine::client::{Client, ClientError, ConnectOptions};
use fusion_engine::engine::Priority;
use fusion_engine::server::{start_with_head, ServerConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use server_util::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files.
struct Certs {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn certs() -> Certs {
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    Certs { dir, cert, key }
}

fn tls_config(c: &Certs) -> ServerConfig {
    ServerConfig {
        tls_cert: Some(c.cert.clone()),
        tls_key: Some(c.key.clone()),
        ..config()
    }
}

fn with_ca(ca: &Path) -> ConnectOptions {
    ConnectOptions {
        ca_file: Some(ca.to_path_buf()),
        ..ConnectOptions::default()
    }
}

/// One fuse of every modality, checked against the float64 reference (f32 within 1e-5).
async fn round_trip(c: &mut Client, h: &fusion_engine::model::FusionHead, seed: u64) {
    let x: Vec<Vec<f32>> = h
        .modalities
        .iter()
        .enumerate()
        .map(|(i, m)| features(m.width, seed * 10 + i as u64))
        .collect();
    let feats: Vec<(&str, &[f32])> = h
        .modalities
        .iter()
        .zip(&x)
        .map(|(m, v)| (m.name.as_str(), &v[..]))
        .collect();
    let r = c.fuse("tls", &feats, Priority::Critical).await.unwrap();
    let (ef, ew) = check(h, &x, &[1, 1, 1], &r.fused, &r.weights);
    assert!(ef <= 1e-5 && ew <= 1e-5, "fused {ef}, weights {ew}");
}

fn connect_error(r: Result<Client, ClientError>) -> String {
    match r {
        Ok(_) => panic!("connected, but should not have"),
        Err(ClientError::Connect(m)) => m,
        Err(e) => panic!("not a connect error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_round_trip_matches_the_reference_and_reconnects() {
    let certs = certs();
    let h = small_head();
    let (s, url) = start_wss(h.clone(), tls_config(&certs)).await;
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    let mut c = Client::connect_with_options(&url, &with_ca(&certs.cert))
        .await
        .unwrap();
    assert_eq!(c.welcome().dim, 32);
    round_trip(&mut c, &h, 1).await;
    // The CA file is kept for a reconnect.
    c.reconnect().await.unwrap();
    round_trip(&mut c, &h, 2).await;
    // JSON results over TLS too.
    let o = ConnectOptions {
        binary: false,
        ..with_ca(&certs.cert)
    };
    let mut j = Client::connect_with_options(&url, &o).await.unwrap();
    round_trip(&mut j, &h, 3).await;
    c.close().await;
    j.close().await;
    s.shutdown().await;
}

/// This test binary's Prometheus recorder (installed once: it is process-wide).
fn prometheus() -> PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
        .clone()
}

/// `fusion_server_refused_total{reason="REASON"}` in `text` (0 when absent).
fn refused(text: &str, reason: &str) -> f64 {
    let label = format!("fusion_server_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&label))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_untrusted_clients_fail_clearly_and_the_server_keeps_serving() {
    let certs = certs();
    let h = small_head();
    let prom = prometheus();
    let s = start_with_head(tls_config(&certs), h.clone(), Some(prom.clone()))
        .await
        .unwrap();
    let addr = s.local_addr();
    let url = format!("wss://{addr}/");

    // ws:// to the TLS port: the server answers in plain HTTP that it speaks TLS.
    let plain = format!("ws://{addr}/");
    let m = connect_error(Client::connect(&plain, None).await);
    eprintln!("ws:// on the TLS port: {m}");
    assert!(m.contains("400") && m.contains("wss://"), "{m}");

    // Plain HTTP by hand: the same answer, then the server closes.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let read = tcp.read_to_string(&mut answer);
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the server answers and closes")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("wss://"), "{answer}");

    // Garbage that starts like a TLS record, then a hang-up: a failed handshake, nothing else.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    drop(tcp);

    // wss:// without the CA file: the self-signed certificate is not trusted.
    let m = connect_error(Client::connect(&url, None).await);
    eprintln!("wss:// without the CA file: {m}");
    assert!(m.to_lowercase().contains("certificate"), "{m}");

    // A CA file that is not one: a clear error naming it, before any connection.
    let junk = certs.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let m = connect_error(Client::connect_with_options(&url, &with_ca(&junk)).await);
    assert!(m.contains("junk.pem"), "{m}");

    // Each refusal is counted: plain text (the ws:// client, the HTTP request) as not_tls, the
    // garbage and the client that did not trust the certificate as tls.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = prom.render();
        let (plain, tls) = (refused(&text, "not_tls"), refused(&text, "tls"));
        if plain >= 2.0 && tls >= 2.0 {
            break;
        }
        let late = tokio::time::Instant::now() > deadline;
        assert!(!late, "refused_total not_tls {plain}, tls {tls}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // And the server still serves a client that trusts it.
    let mut c = Client::connect_with_options(&url, &with_ca(&certs.cert))
        .await
        .unwrap();
    round_trip(&mut c, &h, 4).await;
    c.close().await;
    s.shutdown().await;
}

/// The error `start_with_head` gives for `cfg`.
async fn start_error(cfg: ServerConfig) -> String {
    match start_with_head(cfg, small_head(), None).await {
        Ok(_) => panic!("the server started, but should not have"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_or_key_files_are_refused_at_start() {
    let certs = certs();
    let d = certs.dir.path();
    let junk = d.join("junk.pem");
    std::fs::write(&junk, "-----BEGIN NOTHING-----\n").unwrap();
    let missing = d.join("missing.pem");
    let cfg = |cert: &Path, key: &Path| ServerConfig {
        tls_cert: Some(cert.to_path_buf()),
        tls_key: Some(key.to_path_buf()),
        ..config()
    };

    let m = start_error(cfg(&missing, &certs.key)).await;
    assert!(m.contains("tls_cert") && m.contains("missing.pem"), "{m}");
    let m = start_error(cfg(&certs.cert, &missing)).await;
    assert!(m.contains("tls_key") && m.contains("missing.pem"), "{m}");
    let m = start_error(cfg(&junk, &certs.key)).await;
    assert!(m.contains("junk.pem") && m.contains("tls_cert"), "{m}");
    let m = start_error(cfg(&certs.cert, &junk)).await;
    assert!(m.contains("junk.pem") && m.contains("tls_key"), "{m}");
    // The certificate's file as the key: no private key in it.
    let m = start_error(cfg(&certs.cert, &certs.cert)).await;
    assert!(m.contains("cert.pem") && m.contains("private key"), "{m}");
    // A key of another certificate.
    let other = certs_in(d, "other");
    let m = start_error(cfg(&certs.cert, &other)).await;
    assert!(m.contains("other-key.pem") && m.contains("cert.pem"), "{m}");
    // One without the other.
    let half = ServerConfig {
        tls_cert: Some(certs.cert.clone()),
        ..config()
    };
    let m = start_error(half).await;
    assert!(m.contains("tls_cert and tls_key"), "{m}");
}

/// A second key pair's key file in `dir`.
fn certs_in(dir: &Path, name: &str) -> PathBuf {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    key
}

#[test]
fn serve_refuses_bad_tls_files_before_it_starts() {
    let certs = certs();
    let junk = certs.dir.path().join("junk.pem");
    std::fs::write(&junk, "nothing here").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
            .args(["serve", "--listen", "127.0.0.1:0", "--devices", "cpu"])
            .args(args)
            .output()
            .expect("the binary runs")
    };
    let cert = certs.cert.to_str().unwrap();
    let o = run(&["--tls-cert", cert, "--tls-key", junk.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("junk.pem"), "{err}");
    let o = run(&["--tls-cert", cert]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("tls_cert and tls_key"), "{err}");
    // The TOML config carries them too.
    let toml = certs.dir.path().join("serve.toml");
    let text = format!(
        "tls_cert = {:?}\ntls_key = {:?}\n",
        cert,
        junk.to_str().unwrap()
    );
    std::fs::write(&toml, text).unwrap();
    let o = run(&["--config", toml.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("junk.pem"), "{err}");
}
