//! The state every task of the server shares: the configuration, the head and engine, the
//! subscription registry and replay buffer, the ingest queue, metrics, producer flow control
//! and the open connections' send queues.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::Mutex;

use super::config::ServerConfig;
use super::fanout::outbound::Outbound;
use super::fanout::registry::Registry;
use super::fanout::{replay, writer};
use super::ingest::{pressure, queue::IngestQueue};
use super::metrics::ServerMetrics;
use crate::cluster::gateway::Gateway;
use crate::engine::Engine;
use crate::model::FusionHead;

/// State every task of the server shares.
pub(crate) struct Shared {
    pub cfg: ServerConfig,
    pub head: Arc<FusionHead>,
    pub engine: Arc<Engine>,
    /// `serve --nats`: batches go to JetStream through this gateway instead of `engine`
    /// (docs/DESIGN.md section 11); None: the local engine, as without the flag.
    pub nats: Option<Arc<Gateway>>,
    pub registry: Arc<Registry>,
    pub replay: replay::Replay,
    /// Connection readers to the pipeline task.
    pub ingest: IngestQueue,
    pub m: Arc<ServerMetrics>,
    pub welcome: serde_json::Value,
    /// Producer flow control (ingest backpressure notices).
    pub pressure: pressure::IngestPressure,
    pub(crate) conns: Mutex<HashMap<u64, Arc<Outbound>>>,
    pub(crate) next_id: AtomicU64,
}

impl Shared {
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
