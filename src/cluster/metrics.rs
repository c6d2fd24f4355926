//! The cluster's metrics (docs/DESIGN.md section 11) through the `metrics` facade: the gateway's
//! appear on `serve`'s `/metrics`, a worker's on its own `--metrics-listen` address, served by
//! the tiny listener here (`GET /metrics`, `GET /healthz`; one request per connection, bounded
//! request size and time, as `src/server/http.rs`).
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `fusion_nats_batches_published_total` | counter | gateway: batches stored in JetStream, by `class` |
//! | `fusion_nats_publish_refused_total` | counter | gateway: batch publishes refused (stream full, NATS away): producers got `overloaded` / `shed` |
//! | `fusion_nats_duplicates_dropped_total` | counter | gateway: result copies dropped, their batch id already delivered |
//! | `fusion_nats_round_trip_seconds` | histogram | gateway: batch publish -> its first result |
//! | `fusion_nats_shared_total` | counter | gateway: per-stream results messages stored in `FUSION_STREAMS` |
//! | `fusion_nats_share_refused_total` | counter | gateway: per-stream shares JetStream did not store (other gateways miss them) |
//! | `fusion_nats_shared_delivered_total` | counter | gateway: rows shared by other gateways fanned out here |
//! | `fusion_nats_shared_dropped_total` | counter | gateway: shared rows dropped (another head or stream) |
//! | `fusion_nats_earlier_results_total` | counter | gateway: rows of its earlier process's batches fanned out |
//! | `fusion_worker_batches_pulled_total` | counter | worker: batches fetched, by `class` |
//! | `fusion_worker_redelivered_total` | counter | worker: fetched batches JetStream had delivered before |
//! | `fusion_worker_refused_total` | counter | worker: batches refused for another head fingerprint |
//! | `fusion_worker_busy_naks_total` | counter | worker: batches handed back, the local engine full |
//! | `fusion_worker_results_published_total` | counter | worker: results stored and their batch acked |
//! | `fusion_worker_publish_seconds` | histogram | worker: results publish -> JetStream's ack (NATS round trip) |

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::engine::Priority;
use crate::error::{Error, Result};

/// The `class` label of a priority class.
pub fn class_label(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "critical",
        Priority::Important => "important",
        Priority::Bulk => "bulk",
    }
}

/// Installs the Prometheus recorder and serves `/metrics` on `addr` until the runtime stops;
/// returns the bound address (port 0 picks one).
pub async fn serve_worker_metrics(addr: SocketAddr) -> Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| Error::Config(format!("metrics recorder: {e}")))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("--metrics-listen {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("--metrics-listen {addr}: {e}")))?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let h = handle.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), one(tcp, &h)).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    Ok(bound)
}

async fn one(mut tcp: TcpStream, prom: &PrometheusHandle) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > 8192 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = match line {
        b"GET /metrics HTTP/1.1" | b"GET /metrics HTTP/1.0" => {
            prom.run_upkeep();
            ("200 OK", prom.render())
        }
        b"GET /healthz HTTP/1.1" | b"GET /healthz HTTP/1.0" => ("200 OK", "ok\n".to_string()),
        _ => ("404 Not Found", "GET /metrics or /healthz\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}
