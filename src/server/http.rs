//! A deliberately tiny HTTP/1.1 endpoint on its own address (docs/DESIGN.md section 8,
//! docs/PROTOCOL.md section 9): `GET /metrics` (Prometheus text), `GET /healthz` (200 when at
//! least one device is healthy, else 503; under `serve --nats`: a worker with the gateway's head
//! is alive, docs/DESIGN.md section 11), `GET /` (the live status page) and
//! `GET /status.json` (what the page draws; `status.rs`). One request per connection, bounded
//! request size and time; an unknown path is 404, another method on a known path 405, a
//! malformed or oversized request 400.

use std::borrow::Cow;
use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::shared::Shared;
use super::status::{Status, PAGE};
use crate::engine::DeviceState;

const MAX_REQUEST: usize = 8192;
const PATHS: &str = "GET /, /status.json, /metrics or /healthz";

/// What every request task shares.
struct Ctx {
    prometheus: Option<PrometheusHandle>,
    /// Weak, so that shutdown finds the engine referenced once (docs/DESIGN.md section 7).
    shared: Weak<Shared>,
    status: Status,
}

/// A response: status code, content type, body.
type Reply = (u16, &'static str, Cow<'static, str>);

/// Serves until `stop` fires.
pub(crate) async fn serve(
    listener: TcpListener,
    prometheus: Option<PrometheusHandle>,
    shared: Weak<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let samples = shared.upgrade().map_or(0, |s| s.m.samples.get());
    let ctx = Arc::new(Ctx {
        prometheus,
        shared,
        status: Status::new(samples),
    });
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => {
                    let c = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), one(tcp, &c)).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            _ = stop.changed() => return,
        }
    }
}

async fn one(mut tcp: TcpStream, ctx: &Ctx) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            let r = (400, "text/plain", "bad request\n".into());
            return respond(&mut tcp, r, false).await;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let Some((method, path)) = request_line(&buf) else {
        let r = (400, "text/plain", "bad request line\n".into());
        return respond(&mut tcp, r, false).await;
    };
    let head_only = method == "HEAD";
    let known = matches!(path, "/" | "/status.json" | "/metrics" | "/healthz");
    let reply = if !known {
        (404, "text/plain", format!("not found ({PATHS})\n").into())
    } else if method != "GET" {
        (405, "text/plain", "only GET\n".into())
    } else {
        route(ctx, path)
    };
    respond(&mut tcp, reply, head_only).await
}

/// The method and the path (query string removed) of `METHOD SP target SP HTTP/x.y`.
fn request_line(buf: &[u8]) -> Option<(&str, &str)> {
    let line = buf.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/") || method.is_empty() {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

/// The answer to a GET of a known path.
fn route(ctx: &Ctx, path: &str) -> Reply {
    match path {
        "/" => (200, "text/html; charset=utf-8", PAGE.into()),
        "/status.json" => match ctx.shared.upgrade() {
            Some(sh) => {
                let body = ctx.status.json(&sh).to_string();
                (200, "application/json", body.into())
            }
            None => (503, "text/plain", "shutting down\n".into()),
        },
        "/metrics" => {
            let body = match &ctx.prometheus {
                Some(p) => {
                    super::metrics::record_process_memory();
                    p.run_upkeep();
                    p.render()
                }
                None => "# metrics recorder not installed\n".to_string(),
            };
            (200, "text/plain; version=0.0.4", body.into())
        }
        _ => {
            // `serve --nats`: the workers run the batches; healthy while one has this head.
            if let Some(gw) = ctx.shared.upgrade().and_then(|s| s.nats.clone()) {
                let (ok, body) = gw.health();
                return (if ok { 200 } else { 503 }, "text/plain", body.into());
            }
            let healthy = ctx.shared.upgrade().map(|s| {
                s.engine
                    .stats()
                    .devices
                    .iter()
                    .filter(|d| d.ready && d.state == DeviceState::Healthy)
                    .count()
            });
            match healthy {
                Some(n) if n > 0 => (
                    200,
                    "text/plain",
                    format!("ok {n} healthy devices\n").into(),
                ),
                _ => (503, "text/plain", "no healthy device\n".into()),
            }
        }
    }
}

/// Writes the response (no body for HEAD) and closes.
async fn respond(tcp: &mut TcpStream, reply: Reply, head_only: bool) -> std::io::Result<()> {
    let (status, ctype, body) = reply;
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    if !head_only {
        tcp.write_all(body.as_bytes()).await?;
    }
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::request_line;

    #[test]
    fn request_lines() {
        fn ok(s: &str) -> Option<(&str, &str)> {
            request_line(s.as_bytes())
        }
        assert_eq!(
            ok("GET /status.json?x=1 HTTP/1.1\r\n\r\n"),
            Some(("GET", "/status.json"))
        );
        assert_eq!(ok("HEAD / HTTP/1.0\r\n\r\n"), Some(("HEAD", "/")));
        for bad in [
            "GET /\r\n\r\n",
            "GET / FTP/1\r\n",
            " / HTTP/1.1\r\n",
            "GET / HTTP/1.1 x\r\n",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
        assert_eq!(request_line(b"\xff\xfe / HTTP/1.1\r\n\r\n"), None);
    }
}
