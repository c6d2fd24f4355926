//! A deliberately tiny HTTP/1.1 endpoint on its own address: `GET /metrics` (Prometheus text)
//! and `GET /healthz` (200 when at least one device is healthy, else 503). One request per
//! connection, bounded request size and time; anything else is 404 / 400.

use std::sync::Weak;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::engine::{DeviceState, Engine};

const MAX_REQUEST: usize = 8192;

/// Serves until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    prometheus: Option<PrometheusHandle>,
    engine: Weak<Engine>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => {
                    let p = prometheus.clone();
                    let e = engine.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), one(tcp, p, e)).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

async fn one(
    mut tcp: TcpStream,
    prometheus: Option<PrometheusHandle>,
    engine: Weak<Engine>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return respond(&mut tcp, 400, "text/plain", "bad request\n").await;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut tcp, 405, "text/plain", "only GET\n").await;
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            let body = match &prometheus {
                Some(p) => {
                    super::metrics::record_process_memory();
                    p.run_upkeep();
                    p.render()
                }
                None => "# metrics recorder not installed\n".to_string(),
            };
            respond(&mut tcp, 200, "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => {
            let healthy = engine.upgrade().map(|e| {
                e.stats()
                    .devices
                    .iter()
                    .filter(|d| d.ready && d.state == DeviceState::Healthy)
                    .count()
            });
            match healthy {
                Some(n) if n > 0 => {
                    respond(
                        &mut tcp,
                        200,
                        "text/plain",
                        &format!("ok {n} healthy devices\n"),
                    )
                    .await
                }
                _ => respond(&mut tcp, 503, "text/plain", "no healthy device\n").await,
            }
        }
        _ => {
            respond(
                &mut tcp,
                404,
                "text/plain",
                "not found (GET /metrics or /healthz)\n",
            )
            .await
        }
    }
}

async fn respond(tcp: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.shutdown().await
}
