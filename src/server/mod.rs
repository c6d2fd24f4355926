//! The WebSocket streaming server (SPEC sections 4, 5, 7, 8; the wire format is
//! docs/PROTOCOL.md). Laid out as data flows:
//!
//! ```text
//! listener (connection semaphore, auth, 16 MiB frames) ──> conn: read + validate
//!   ──> bounded ingest queue ──> pipeline: aligner ──> batcher ──> Engine::submit
//!   ──> completion: fan-out try-pushes into each subscriber's Outbound (per-class queues)
//!   ──> that connection's one writer task ──> socket (send_timeout, slow-consumer close 1013)
//! ```
//!
//! - [`config`]: [`ServerConfig`], every default in one place (TOML).
//! - [`codec`]: binary frames and error codes; `messages`: JSON control messages.
//! - `listener` (here), `conn`, `aligner`, `pipeline`, `registry`, `outbound`, `writer`,
//!   `http` (`/metrics`, `/healthz`), `metrics`.
//!
//! Shutdown (mini-redis style): a watch signal stops the listener and makes every connection
//! refuse new produce messages; the pipeline fuses what is open and waits for in-flight batches;
//! then each connection's writer drains its queues and closes with 1001; the engine drains last.

mod aligner;
pub mod codec;
pub mod config;
mod conn;
mod http;
mod messages;
mod metrics;
mod outbound;
mod pipeline;
mod pressure;
mod registry;
mod replay;
mod samples;
pub mod serve;
mod writer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub use config::{QueueConfig, ServerConfig};

use self::aligner::IngestMsg;
use self::metrics::ServerMetrics;
use self::outbound::Outbound;
use self::registry::Registry;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// State every task of the server shares.
pub(crate) struct Shared {
    pub cfg: ServerConfig,
    pub head: Arc<FusionHead>,
    pub engine: Arc<Engine>,
    pub registry: Arc<Registry>,
    pub replay: replay::Replay,
    pub ingest: mpsc::Sender<IngestMsg>,
    /// Rows (sample x modality) queued in `samples` frames on the ingest queue: they count
    /// against `ingest_capacity` like as many single produce messages.
    pub ingest_rows: std::sync::atomic::AtomicUsize,
    pub m: Arc<ServerMetrics>,
    pub welcome: serde_json::Value,
    /// Producer flow control (ingest backpressure notices).
    pub pressure: pressure::IngestPressure,
    conns: Mutex<HashMap<u64, Arc<Outbound>>>,
    next_id: AtomicU64,
}

impl Shared {
    /// What waits on the ingest queue, in its capacity's unit: messages plus the rows of the
    /// `samples` frames among them.
    pub fn ingest_queued(&self) -> usize {
        let q = &self.ingest;
        q.max_capacity().saturating_sub(q.capacity())
            + self.ingest_rows.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn writer_cfg(&self) -> writer::WriterConfig {
        let c = &self.cfg;
        writer::WriterConfig {
            send_timeout: c.send_timeout,
            slow_send: c.slow_send,
            slow_sends: c.slow_sends,
            close_linger: c.close_linger,
            heartbeat: c.heartbeat_interval,
        }
    }
}

/// A running server. Dropping it without [`Server::shutdown`] aborts nothing: its tasks run
/// until the runtime ends.
pub struct Server {
    shared: Arc<Shared>,
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    pipeline: JoinHandle<()>,
    permits: Arc<Semaphore>,
}

impl Server {
    /// Binds `cfg.listen` (and `cfg.metrics`) and serves `engine` on the current tokio runtime.
    /// `prometheus` renders `/metrics` (install it before starting the engine).
    pub async fn start(
        cfg: ServerConfig,
        engine: Engine,
        prometheus: Option<PrometheusHandle>,
    ) -> Result<Server> {
        cfg.validate()?;
        let bind_err = |what: &str, a: SocketAddr, e: std::io::Error| {
            Error::Config(format!("cannot listen for {what} on {a}: {e}"))
        };
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| bind_err("WebSocket", cfg.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| bind_err("WebSocket", cfg.listen, e))?;
        let http = match cfg.metrics {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| bind_err("metrics", a, e))?,
            ),
            None => None,
        };
        let metrics_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let engine = Arc::new(engine);
        let head = Arc::clone(engine.head());
        let (tx, rx) = mpsc::channel(cfg.ingest_capacity);
        let (stop, stop_rx) = watch::channel(false);
        let m = Arc::new(ServerMetrics::new());
        let replay = replay::Replay::new(&cfg, Arc::clone(&m));
        let shared = Arc::new(Shared {
            welcome: messages::welcome_base(&cfg, &head, replay.epoch),
            head,
            engine: Arc::clone(&engine),
            registry: Arc::new(Registry::default()),
            replay,
            ingest: tx,
            ingest_rows: std::sync::atomic::AtomicUsize::new(0),
            m,
            pressure: pressure::IngestPressure::new(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            cfg,
        });
        let pipeline = tokio::spawn(pipeline::run(Arc::clone(&shared), rx, stop_rx.clone()));
        let permits = Arc::new(Semaphore::new(shared.cfg.max_connections));
        tokio::spawn(accept_loop(
            Arc::clone(&shared),
            listener,
            Arc::clone(&permits),
            stop_rx.clone(),
        ));
        tokio::spawn(registry::watch_devices(
            Arc::clone(&engine),
            Arc::clone(&shared.registry),
            stop_rx.clone(),
        ));
        if let Some(l) = http {
            tokio::spawn(http::serve(l, prometheus, Arc::downgrade(&engine), stop_rx));
        }
        tracing::info!(%addr, "fusion-engine serving");
        Ok(Server {
            shared,
            addr,
            metrics_addr,
            stop,
            pipeline,
            permits,
        })
    }

    /// The WebSocket address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `/metrics` address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// Graceful shutdown: stop accepting, fuse what is open, finish in-flight batches, drain
    /// every connection's queues and close them with 1001, then stop the engine.
    pub async fn shutdown(self) {
        let grace = self.shared.cfg.shutdown_grace;
        let _ = self.stop.send(true);
        if self.pipeline.await.is_err() {
            tracing::error!("the pipeline task panicked");
        }
        let conns: Vec<Arc<Outbound>> = self.shared.conns.lock().values().cloned().collect();
        for c in conns {
            c.close_after_drain(1001, "shutdown");
        }
        let max = self.shared.cfg.max_connections as u32;
        let all = tokio::time::timeout(
            grace + self.shared.cfg.close_linger,
            self.permits.acquire_many(max),
        );
        if all.await.is_err() {
            tracing::warn!("shutdown: some connections did not close within the grace period");
        }
        let engine = Arc::clone(&self.shared.engine);
        drop(self.shared);
        // The device watcher and the HTTP task let go of the engine once they see the signal.
        for _ in 0..50 {
            if Arc::strong_count(&engine) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match Arc::try_unwrap(engine) {
            Ok(e) => {
                let failed = tokio::task::spawn_blocking(move || e.shutdown(grace)).await;
                if let Ok(n) = failed {
                    if n > 0 {
                        tracing::warn!("shutdown: {n} batches did not finish");
                    }
                }
            }
            Err(_) => tracing::warn!("shutdown: the engine is still referenced; dropping it"),
        }
    }
}

/// Accepts connections until the stop signal.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let sh = Arc::clone(&shared);
                    let permit = Arc::clone(&permits).try_acquire_owned().ok();
                    tokio::spawn(connection(sh, tcp, peer, permit, stop.clone()));
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Handshake (limit, auth, frame size) then the connection handler.
// The handshake callback's error type is tungstenite's (an HTTP response), not ours.
#[allow(clippy::result_large_err)]
async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let full = permit.is_none();
    let token = shared.cfg.token.clone();
    let refused: Arc<Mutex<Option<&'static str>>> = Arc::default();
    let why = Arc::clone(&refused);
    let check =
        move |req: &Request, resp: Response| -> std::result::Result<Response, ErrorResponse> {
            let deny = |status: u16, reason: &'static str, text: &str| {
                *why.lock() = Some(reason);
                let mut r = ErrorResponse::new(Some(text.to_string()));
                *r.status_mut() = http_status(status);
                Err(r)
            };
            if full {
                return deny(503, "full", "the server is at max_connections; retry later");
            }
            if let Some(t) = &token {
                if !authorized(req, t) {
                    return deny(401, "auth", "missing or wrong bearer token");
                }
            }
            Ok(resp)
        };
    let max = shared.cfg.max_frame_bytes;
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        // Bursts of the writer (writer.rs) fit the buffer: one flush writes them out.
        .write_buffer_size(writer::BURST_BYTES + (32 << 10));
    let hs = tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(ws_cfg));
    let ws = match tokio::time::timeout(Duration::from_secs(10), hs).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let reason = refused.lock().unwrap_or("handshake");
            shared.m.refused(reason);
            tracing::debug!(%peer, "handshake refused ({reason}): {e}");
            return;
        }
        Err(_) => {
            shared.m.refused("handshake");
            return;
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let q = &shared.cfg.send_queue;
    let out = Arc::new(Outbound::new(
        id,
        q,
        shared.cfg.drop_notice_interval,
        shared.cfg.replay_messages,
        Arc::clone(&shared.m),
    ));
    shared.conns.lock().insert(id, Arc::clone(&out));
    shared.m.connections.increment(1.0);
    shared.m.connections_total.increment(1);
    tracing::debug!(%peer, conn = id, "connected");
    conn::handle(Arc::clone(&shared), ws, out, stop).await;
    shared.conns.lock().remove(&id);
    shared.m.connections.decrement(1.0);
    tracing::debug!(%peer, conn = id, "closed");
    drop(permit);
}

fn http_status(code: u16) -> tokio_tungstenite::tungstenite::http::StatusCode {
    tokio_tungstenite::tungstenite::http::StatusCode::from_u16(code)
        .unwrap_or(tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN)
}

/// `Authorization: Bearer T` or `?token=T`, compared in constant time.
fn authorized(req: &Request, token: &str) -> bool {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    [header, query]
        .into_iter()
        .flatten()
        .any(|given| ct_eq(given.trim().as_bytes(), token.as_bytes()))
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Starts the engine for `head` (opening devices blocks, so off the async threads) and serves
/// it with `cfg`.
pub async fn start_with_head(
    cfg: ServerConfig,
    head: Arc<FusionHead>,
    prometheus: Option<PrometheusHandle>,
) -> Result<Server> {
    let ecfg = cfg.engine.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::start(ecfg, head))
        .await
        .map_err(|e| Error::Config(format!("engine start task failed: {e}")))??;
    Server::start(cfg, engine, prometheus).await
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
