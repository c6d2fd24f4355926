//! `fusion-engine serve`: config file + command-line overrides, the Prometheus recorder, the
//! engine, the server, and a graceful stop on Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;

use super::{shutdown_signal, start_gateway, ServerConfig};
use crate::cluster::fingerprint::hex;
use crate::cluster::gateway::{Gateway, GatewayConfig};
use crate::cluster::identity::{default_id, validate_id};
use crate::engine::DeviceSpec;
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// Serve the head over WebSocket (docs/PROTOCOL.md) until Ctrl-C / SIGTERM. With no flags:
/// the embedded head on the best GPU found, else the CPU, on 127.0.0.1:7878.
///
/// The command-line options of `serve`; each one, when given, overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeOptions {
    /// Config file (TOML; every field optional, see --print-config for all defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Fusion head (.safetensors); the embedded default head when omitted.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// WebSocket listen address [default: 127.0.0.1:7878].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Prometheus /metrics and /healthz address, e.g. 127.0.0.1:9898.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Require `Authorization: Bearer TOKEN` at the handshake.
    #[arg(long)]
    pub token: Option<String>,
    /// TLS certificate chain (PEM): serve `wss://` (with --tls-key).
    #[arg(long, value_name = "CERT.pem")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of --tls-cert.
    #[arg(long, value_name = "KEY.pem")]
    pub tls_key: Option<PathBuf>,
    /// Devices, e.g. `cpu`, `cuda:0,cpu` (default: every usable GPU, else the CPU).
    #[arg(long)]
    pub devices: Option<String>,
    /// Run as a gateway: batches go to NATS JetStream (nats://HOST:PORT, `nats-server -js`)
    /// and `fusion-engine worker`s run them (docs/DESIGN.md section 11).
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// PEM CA certificate of the NATS server's TLS certificate (TLS is then required).
    #[arg(long, value_name = "CA.pem", requires = "nats")]
    pub nats_tls_ca: Option<PathBuf>,
    /// NATS credentials file (`.creds`: user JWT and NKey seed).
    #[arg(long, value_name = "FILE", requires = "nats")]
    pub nats_creds: Option<PathBuf>,
    /// This gateway's stable id (A-Z a-z 0-9 _ -): its results subject and durable consumer.
    /// Restarted with the same id, it fans out the results of the batches it had in flight.
    /// Every gateway on one NATS needs its own [default: gw-<host name>-<listen port>].
    #[arg(long, value_name = "NAME", requires = "nats")]
    pub gateway_id: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The effective config.
pub fn effective_config(o: &ServeOptions) -> Result<ServerConfig> {
    let mut cfg = match &o.config {
        Some(p) => ServerConfig::load(p)?,
        None => ServerConfig::default(),
    };
    if o.model.is_some() {
        cfg.model = o.model.clone();
    }
    if let Some(a) = o.listen {
        cfg.listen = a;
    }
    if o.metrics.is_some() {
        cfg.metrics = o.metrics;
    }
    if o.token.is_some() {
        cfg.token = o.token.clone();
    }
    if o.tls_cert.is_some() {
        cfg.tls_cert = o.tls_cert.clone();
    }
    if o.tls_key.is_some() {
        cfg.tls_key = o.tls_key.clone();
    }
    if let Some(d) = &o.devices {
        cfg.engine.devices = DeviceSpec::parse_list(d)?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Runs the server until Ctrl-C / SIGTERM, then shuts it down gracefully.
pub fn serve_until_signal(o: ServeOptions) -> Result<()> {
    let cfg = effective_config(&o)?;
    if o.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    // Bad TLS files fail here, before any device opens (docs/DESIGN.md section 7).
    super::tls::acceptor(&cfg)?;
    let gateway_id = o
        .gateway_id
        .clone()
        .unwrap_or_else(|| default_id(cfg.listen));
    validate_id(&gateway_id)?;
    let rt = runtime("fusion-server")?;
    rt.block_on(async move {
        let prom = match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("metrics recorder not installed: {e}");
                None
            }
        };
        let head = Arc::new(FusionHead::load_or_embedded(cfg.model.as_deref())?);
        let token = cfg.token.is_some();
        let scheme = if cfg.tls_cert.is_some() { "wss" } else { "ws" };
        // NATS before the devices: an unreachable URL exits non-zero naming it (section 11).
        let nats = match &o.nats {
            Some(url) => {
                let mut gc = GatewayConfig::new(url);
                gc.nats.tls_ca = o.nats_tls_ca.clone();
                gc.nats.creds = o.nats_creds.clone();
                gc.id = Some(gateway_id);
                Some(Arc::new(Gateway::connect(&gc, &head).await?))
            }
            None => None,
        };
        // The gateway announces its head's fingerprint; workers must have the same (section 11).
        let announce = nats.as_ref().map(|g| hex(g.fingerprint()));
        let server = start_gateway(cfg, Arc::clone(&head), prom, nats).await?;
        let devices = match (&o.nats, announce) {
            (Some(url), Some(fp)) => {
                let id = server.gateway_id().unwrap_or_default();
                format!("batches on NATS {url} as gateway {id}, head fingerprint {fp}")
            }
            _ => server.engine().device_names().join(", "),
        };
        eprintln!(
            "fusion-engine serving {} ({} modalities, D={}) on {scheme}://{} with {devices}{}",
            head.source,
            head.num_modalities(),
            head.dim,
            server.local_addr(),
            if token {
                " (bearer token required)"
            } else {
                ""
            }
        );
        if let Some(m) = server.metrics_addr() {
            eprintln!("metrics: http://{m}/metrics, health: http://{m}/healthz");
        }
        shutdown_signal().await;
        eprintln!("shutting down: draining in-flight samples");
        server.shutdown().await;
        Ok(())
    })
}

/// A multi-threaded tokio runtime whose threads are called `thread_name` (for `serve` and the
/// tools).
pub fn runtime(thread_name: &str) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(thread_name)
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start the async runtime: {e}")))
}
