//! The WebSocket streaming server (docs/DESIGN.md sections 4, 5, 7, 8; the wire format is
//! docs/PROTOCOL.md, spoken through [`crate::protocol`]). Laid out as data flows:
//!
//! ```text
//! listener (connection semaphore, auth, 16 MiB frames) ──> conn: read + validate
//!   ──> ingest/: bounded queue ──> pipeline task: aligner ──> batcher ──> Engine::submit
//!   ──> fanout/: deliver (stream seq, replay buffer) ──> each subscriber's Outbound
//!   ──> that connection's one writer task ──> socket (send_timeout, slow-consumer close 1013)
//! ```
//!
//! - [`config`]: [`ServerConfig`], every default in one place (TOML).
//! - `listener`: accept, handshake, auth; `tls`: wss:// (rustls); `split`: the socket's halves
//!   after the upgrade; `conn`: the per-connection reader (its own WebSocket frame reader,
//!   `conn/frames.rs`; validation).
//! - `ingest/`: queue (its row accounting), aligner, batcher, pressure (producer flow control),
//!   pipeline (the task that runs them).
//! - `fanout/`: deliver, replay, registry (subscriptions), outbound (per-class queues, drops,
//!   resume), writer.
//! - `http` (`/metrics`, `/healthz`, `/` the status page, `/status.json`: `status`), `metrics`
//!   (and `readings`: the values the status page reads back); [`serve`]: the `serve` command.
//! - `shared`: the state every task shares; this file: [`Server`] (start, shutdown).
//!
//! Shutdown (mini-redis style): a watch signal stops the listener and makes every connection
//! refuse new produce messages; the pipeline fuses what is open and waits for in-flight batches;
//! then each connection's writer drains its queues and closes with 1001; the engine drains last.

pub mod config;
mod conn;
mod fanout;
mod http;
mod ingest;
mod listener;
mod metrics;
mod readings;
pub mod serve;
mod shared;
mod split;
mod status;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

pub use config::{QueueConfig, ServerConfig};
#[doc(hidden)]
pub use conn::bench::IngestBench;
#[doc(hidden)]
pub use fanout::bench::{BenchResults, FanoutBench};

use self::fanout::outbound::Outbound;
use self::fanout::registry::Registry;
use self::fanout::replay;
use self::ingest::{pressure, queue::IngestQueue};
use self::metrics::ServerMetrics;
pub(crate) use self::shared::Shared;
use crate::cluster::gateway::Gateway;
use crate::cluster::wire::max_batch_rows;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::model::FusionHead;
use crate::protocol::notices;

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
        Self::start_with(cfg, engine, prometheus, None).await
    }

    /// [`Server::start`] with the batches dispatched to NATS through `nats` when given
    /// (`serve --nats`, docs/DESIGN.md section 11); `engine` then only backs the status pages.
    pub async fn start_with(
        cfg: ServerConfig,
        engine: Engine,
        prometheus: Option<PrometheusHandle>,
        nats: Option<Arc<Gateway>>,
    ) -> Result<Server> {
        cfg.validate()?;
        let tls = tls::acceptor(&cfg)?;
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
        let (ingest, rx) = IngestQueue::new(cfg.ingest_capacity);
        let (stop, stop_rx) = watch::channel(false);
        let m = Arc::new(ServerMetrics::new());
        let replay = replay::Replay::new(&cfg, Arc::clone(&m));
        let shared = Arc::new(Shared {
            welcome: notices::welcome_base(&cfg.limits(), &head, replay.epoch),
            head,
            engine: Arc::clone(&engine),
            nats,
            registry: Arc::new(Registry::default()),
            replay,
            ingest,
            m,
            pressure: pressure::IngestPressure::new(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            cfg,
        });
        if let Some(gw) = &shared.nats {
            // Results from other gateways and from this id's earlier process (section 11).
            let sink = fanout::remote::RemoteSink(Arc::downgrade(&shared));
            gw.attach(Arc::new(sink));
        }
        let pipeline = tokio::spawn(ingest::pipeline::run_pipeline(
            Arc::clone(&shared),
            rx,
            stop_rx.clone(),
        ));
        let permits = Arc::new(Semaphore::new(shared.cfg.max_connections));
        tokio::spawn(listener::accept_loop(
            Arc::clone(&shared),
            listener,
            Arc::clone(&permits),
            tls,
            stop_rx.clone(),
        ));
        tokio::spawn(fanout::registry::watch_devices(
            Arc::clone(&engine),
            Arc::clone(&shared.registry),
            stop_rx.clone(),
        ));
        if let Some(l) = http {
            tokio::spawn(http::serve(l, prometheus, Arc::downgrade(&shared), stop_rx));
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

    /// The NATS gateway's id under `serve --nats` (docs/DESIGN.md section 11).
    pub fn gateway_id(&self) -> Option<String> {
        self.shared.nats.as_ref().map(|g| g.id().to_string())
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

/// Starts the engine for `head` (opening devices blocks, so off the async threads) and serves
/// it with `cfg`.
pub async fn start_with_head(
    cfg: ServerConfig,
    head: Arc<FusionHead>,
    prometheus: Option<PrometheusHandle>,
) -> Result<Server> {
    start_gateway(cfg, head, prometheus, None).await
}

/// [`start_with_head`] dispatching batches to NATS through `nats` when given.
pub async fn start_gateway(
    mut cfg: ServerConfig,
    head: Arc<FusionHead>,
    prometheus: Option<PrometheusHandle>,
    nats: Option<Arc<Gateway>>,
) -> Result<Server> {
    if let Some(g) = &nats {
        // A batch larger than the NATS server's max_payload would be refused on every publish
        // (and its producers told `overloaded` again and again): batches are capped to fit
        // (docs/DESIGN.md section 11).
        let widths: Vec<usize> = head.modalities.iter().map(|m| m.width).collect();
        let fit = max_batch_rows(g.max_payload(), &widths, cfg.max_name_bytes);
        if cfg.max_batch > fit {
            tracing::warn!(
                max_batch = cfg.max_batch,
                fit,
                max_payload = g.max_payload(),
                "max_batch lowered: a batch must fit the NATS server's max_payload"
            );
            cfg.max_batch = fit;
        }
    }
    let ecfg = cfg.engine.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::start(ecfg, head))
        .await
        .map_err(|e| Error::Runtime(format!("engine start task failed: {e}")))??;
    Server::start_with(cfg, engine, prometheus, nats).await
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
