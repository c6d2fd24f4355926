//! Shared set-up of the server tests: a server on 127.0.0.1:0 over one CPU device with a small
//! random head, helpers to read events with a deadline, and raw subscribers that can stall.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use fusion_engine::batch::BatchRef;
use fusion_engine::client::{Client, Event};
use fusion_engine::engine::{DeviceSpec, EngineConfig};
use fusion_engine::model::FusionHead;
use fusion_engine::reference::{reference, rel_error};
use fusion_engine::server::{start_with_head, Server, ServerConfig};
use fusion_engine::tensor::MatRef;

pub fn head(dims: &[(&str, usize)], d: usize, seed: u64) -> Arc<FusionHead> {
    let dims: Vec<(String, usize)> = dims.iter().map(|(n, w)| (n.to_string(), *w)).collect();
    Arc::new(FusionHead::random(&dims, d, 1e-5, seed))
}

pub fn small_head() -> Arc<FusionHead> {
    head(&[("vision", 24), ("text", 16), ("audio", 8)], 32, 7)
}

pub fn config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        engine: EngineConfig::with_devices(DeviceSpec::parse_list("cpu:threads=1").unwrap()),
        shutdown_grace: Duration::from_secs(2),
        close_linger: Duration::from_secs(3),
        ..ServerConfig::default()
    }
}

pub async fn start(head: Arc<FusionHead>, cfg: ServerConfig) -> (Server, String) {
    let s = start_with_head(cfg, head, None)
        .await
        .expect("server starts");
    let url = format!("ws://{}/", s.local_addr());
    (s, url)
}

/// [`start`] for a config with `tls_cert` / `tls_key`: the URL is `wss://127.0.0.1:PORT/`
/// (the test certificate names 127.0.0.1).
pub async fn start_wss(head: Arc<FusionHead>, cfg: ServerConfig) -> (Server, String) {
    let s = start_with_head(cfg, head, None)
        .await
        .expect("TLS server starts");
    let url = format!("wss://{}/", s.local_addr());
    (s, url)
}

/// Next event within `secs`, panicking on timeout.
pub async fn next(c: &mut Client, secs: f64) -> Event {
    tokio::time::timeout(Duration::from_secs_f64(secs), c.next_event())
        .await
        .expect("an event in time")
        .expect("the connection is open")
}

/// The next `error` (skipping acks, notices, heartbeats), as (code, raw).
pub async fn next_error(c: &mut Client) -> (String, serde_json::Value) {
    loop {
        match next(c, 5.0).await {
            Event::Error { code, raw, .. } => return (code, raw),
            Event::Closed { code, reason } => panic!("closed {code:?} {reason}"),
            _ => {}
        }
    }
}

/// Deterministic features.
pub fn features(width: usize, seed: u64) -> Vec<f32> {
    (0..width)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// Relative errors of (fused, weights) against the f64 reference for one sample.
pub fn check(
    head: &FusionHead,
    x: &[Vec<f32>],
    mask: &[u8],
    fused: &[f32],
    weights: &[f32],
) -> (f64, f64) {
    let inputs: Vec<MatRef<'_>> = x
        .iter()
        .zip(&head.modalities)
        .map(|(v, m)| MatRef::from_f32(1, m.width, v).unwrap())
        .collect();
    let b = BatchRef {
        rows: 1,
        inputs,
        mask,
    };
    let r = reference(head, &b);
    (rel_error(fused, &r.fused), rel_error(weights, &r.weights))
}

/// A raw WebSocket client (tests that stall a peer by not polling it).
pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A big-D head (32 KiB results) so a few hundred results fill the socket buffers.
pub fn wide_head() -> std::sync::Arc<fusion_engine::model::FusionHead> {
    head(&[("a", 4)], 8192, 11)
}

/// A raw version 1 binary subscriber of `stream`.
pub async fn raw_subscriber(url: &str, stream: &str) -> Ws {
    let sub = format!(r#"{{"type":"subscribe","stream":"{stream}"}}"#);
    raw_subscriber_with(url, 1, &sub).await
}

/// A raw binary subscriber speaking `version` that sends `subscribe` (JSON text).
pub async fn raw_subscriber_with(url: &str, version: u8, subscribe: &str) -> Ws {
    // A small, fixed receive buffer (no autotuning, which may grow to tens of MiB): a peer that
    // stops reading stalls the server's writer after a known, small amount of data.
    let addr: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(1 << 16).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    ws.send(Message::text(format!(
        r#"{{"type":"hello","version":{version},"results":"binary"}}"#
    )))
    .await
    .unwrap();
    ws.send(Message::text(subscribe.to_string())).await.unwrap();
    loop {
        if let Some(Ok(Message::Text(t))) = ws.next().await {
            if t.contains("\"ack\"") {
                return ws;
            }
        }
    }
}
pub mod frames;
pub mod nats;
