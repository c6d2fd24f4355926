//! [`ServerConfig`]: every server default of docs/DESIGN.md (sections 4, 5 and 7; listed in section 10.1) in one place, read
//! from TOML. The engine's settings live in its `[engine]` table ([`EngineConfig`]).
//!
//! ```toml
//! listen = "127.0.0.1:7878"
//! metrics = "127.0.0.1:9898"
//! align_timeout = "50ms"
//! [engine]
//! devices = ["cpu"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::config::dur;
use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::protocol::notices::Limits;

/// The validation message for a half-configured TLS (docs/DESIGN.md section 7).
pub(crate) const TLS_BOTH_OR_NEITHER: &str =
    "server: tls_cert and tls_key go together (give both, or neither for plain ws://)";

/// Capacities of one connection's send queues (messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// CRITICAL results. Default 400 (at least one whole batch: a batch's results are queued
    /// at once, and a CRITICAL result that does not fit closes the connection).
    pub critical: usize,
    /// IMPORTANT results. Default 300 (at least one whole batch).
    pub important: usize,
    /// BULK results. Default 300 (the three data classes: 1000 in all).
    pub bulk: usize,
    /// CONTROL messages. Default 100.
    pub control: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            critical: 400,
            important: 300,
            bulk: 300,
            control: 100,
        }
    }
}

impl QueueConfig {
    /// Data capacity: the three data classes together.
    pub fn data(&self) -> usize {
        self.critical + self.important + self.bulk
    }
}

/// Server settings; [`Default`] holds the defaults of docs/DESIGN.md section 10.1.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// WebSocket listen address. Default 127.0.0.1:7878.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` and `/healthz` address; none = no HTTP endpoint.
    pub metrics: Option<SocketAddr>,
    /// Bearer token required at the handshake; none = no auth.
    pub token: Option<String>,
    /// Fusion head file; none = the embedded head.
    pub model: Option<PathBuf>,
    /// TLS certificate chain (PEM) for `wss://`; with `tls_key`, or neither for plain `ws://`
    /// (docs/DESIGN.md section 7).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Concurrent connections. Default 1024.
    pub max_connections: usize,
    /// Distinct streams one connection may produce into or subscribe to. Default 256.
    pub max_streams_per_connection: usize,
    /// Longest stream name or sample key, bytes. Default 256.
    pub max_name_bytes: usize,
    /// Largest WebSocket message or frame, bytes. Default 16 MiB.
    pub max_frame_bytes: usize,
    /// Each connection's kernel receive buffer, bytes (`SO_RCVBUF`; Linux doubles it); 0 = the
    /// kernel's autotuning (up to 32 MiB a connection on Debian). What waits there is ahead of
    /// every priority class and of the ingest fill (docs/DESIGN.md section 5.6); it also caps a
    /// connection's bytes in flight per round trip (raise it for producers across a WAN).
    /// Default 512 KiB.
    pub recv_buffer: usize,
    /// Open (incomplete) samples in the aligner, all streams together. Default 100,000.
    pub max_open_samples: usize,
    /// A sample is fused with what arrived this long after its first modality. Default 50 ms.
    #[serde(with = "dur")]
    pub align_timeout: Duration,
    /// Fewest modalities a timed-out sample needs to be fused. Default 1.
    pub min_modalities: usize,
    /// Largest batch. Default 256.
    pub max_batch: usize,
    /// A batch leaves this long after its first sample at the latest. Default 2 ms.
    #[serde(with = "dur")]
    pub max_batch_delay: Duration,
    /// Produce messages waiting for the aligner (all connections). Default 16384.
    pub ingest_capacity: usize,
    /// How long a non-BULK produce waits for room in a full ingest queue before it is
    /// refused as overloaded. Default 100 ms.
    #[serde(with = "dur")]
    pub ingest_wait: Duration,
    /// Per-connection send queues.
    pub send_queue: QueueConfig,
    /// The largest CRITICAL, IMPORTANT or BULK send queue a connection may ask for in its
    /// `hello` (PROTOCOL 2: `send_queue`). Default 16384 results.
    pub max_send_queue: usize,
    /// One send past this closes the connection (1013). Default 5 s.
    #[serde(with = "dur")]
    pub send_timeout: Duration,
    /// A send slower than this counts towards SLOW_CONSUMER. Default 500 ms.
    #[serde(with = "dur")]
    pub slow_send: Duration,
    /// That many slow sends in a row close the connection (1013). Default 5.
    pub slow_sends: u32,
    /// How long the server keeps trying to deliver its close frame to a stuck peer. Default 2 s.
    #[serde(with = "dur")]
    pub close_linger: Duration,
    /// CONTROL heartbeat interval. Default 15 s.
    #[serde(with = "dur")]
    pub heartbeat_interval: Duration,
    /// Shortest interval between two `dropped` notices on one connection. Default 100 ms.
    #[serde(with = "dur")]
    pub drop_notice_interval: Duration,
    /// Shutdown: how long in-flight samples and send queues may drain. Default 5 s.
    #[serde(with = "dur")]
    pub shutdown_grace: Duration,
    /// Replay buffer: CRITICAL and IMPORTANT results kept per stream for resuming
    /// subscribers (0 = no replay). Default 1024.
    pub replay_messages: usize,
    /// Replay buffer: a result older than this is no longer replayed. Default 30 s.
    #[serde(with = "dur")]
    pub replay_age: Duration,
    /// Replay buffer: bytes of results kept, all streams together (the oldest go first).
    /// Default 64 MiB.
    pub replay_max_bytes: usize,
    /// The engine (devices, routing, health).
    pub engine: EngineConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            metrics: None,
            token: None,
            model: None,
            tls_cert: None,
            tls_key: None,
            max_connections: 1024,
            max_streams_per_connection: 256,
            max_name_bytes: 256,
            max_frame_bytes: 16 << 20,
            recv_buffer: 512 << 10,
            max_open_samples: 100_000,
            align_timeout: Duration::from_millis(50),
            min_modalities: 1,
            max_batch: 256,
            max_batch_delay: Duration::from_millis(2),
            ingest_capacity: 16384,
            ingest_wait: Duration::from_millis(100),
            send_queue: QueueConfig::default(),
            max_send_queue: 16384,
            send_timeout: Duration::from_secs(5),
            slow_send: Duration::from_millis(500),
            slow_sends: 5,
            close_linger: Duration::from_secs(2),
            heartbeat_interval: Duration::from_secs(15),
            drop_notice_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
            replay_messages: 1024,
            replay_age: Duration::from_secs(30),
            replay_max_bytes: 64 << 20,
            engine: EngineConfig::default(),
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file; missing fields take their defaults.
    pub fn load(path: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> std::result::Result<ServerConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The config as TOML (every field, defaults included).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Config(format!("cannot write the config: {e}")))
    }

    /// The limits announced in every `welcome` (docs/PROTOCOL.md section 3).
    pub fn limits(&self) -> Limits {
        let q = &self.send_queue;
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_name_bytes: self.max_name_bytes,
            max_streams_per_connection: self.max_streams_per_connection,
            max_open_samples: self.max_open_samples,
            align_timeout: self.align_timeout,
            min_modalities: self.min_modalities,
            max_batch: self.max_batch,
            max_batch_delay: self.max_batch_delay,
            send_queue: [q.control, q.critical, q.important, q.bulk],
            max_send_queue: self.max_send_queue,
            send_timeout: self.send_timeout,
            heartbeat_interval: self.heartbeat_interval,
            replay_messages: self.replay_messages,
            replay_age: self.replay_age,
        }
    }

    /// Checks the numbers (the engine's too).
    pub fn validate(&self) -> Result<()> {
        let bad = |s: &str| Err(Error::Config(format!("server: {s}")));
        let q = &self.send_queue;
        if q.critical == 0 || q.important == 0 || q.bulk == 0 || q.control == 0 {
            return bad("send_queue capacities must be at least 1");
        }
        if self.max_send_queue < q.critical.max(q.important).max(q.bulk) {
            return bad("max_send_queue must be at least every send_queue capacity");
        }
        if self.max_connections == 0 || self.max_streams_per_connection == 0 {
            return bad("max_connections and max_streams_per_connection must be at least 1");
        }
        if self.max_batch == 0 || self.max_open_samples == 0 || self.ingest_capacity == 0 {
            return bad("max_batch, max_open_samples and ingest_capacity must be at least 1");
        }
        if q.critical.min(q.important) < self.max_batch {
            tracing::warn!(
                critical = q.critical,
                important = q.important,
                max_batch = self.max_batch,
                "send_queue.critical or .important holds less than one batch: one batch of that \
                 class can close (CRITICAL) or drop results for (IMPORTANT) a subscriber that \
                 keeps up"
            );
        }
        if self.max_frame_bytes < 1024 || self.max_name_bytes == 0 {
            return bad("max_frame_bytes must be at least 1024 and max_name_bytes at least 1");
        }
        if self.recv_buffer != 0 && self.recv_buffer < 4096 {
            return bad("recv_buffer must be 0 (the kernel's autotuning) or at least 4096 bytes");
        }
        if self.send_timeout.is_zero() || self.slow_sends == 0 {
            return bad("send_timeout must be positive and slow_sends at least 1");
        }
        if self.heartbeat_interval.is_zero() || self.drop_notice_interval.is_zero() {
            return bad("heartbeat_interval and drop_notice_interval must be positive");
        }
        if self.replay_messages > 0 && (self.replay_age.is_zero() || self.replay_max_bytes == 0) {
            return bad("replay_age and replay_max_bytes must be positive (or replay_messages 0)");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::Config(TLS_BOTH_OR_NEITHER.to_string()));
        }
        if self.token.as_deref() == Some("") {
            return bad("token must not be empty");
        }
        self.engine.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_roundtrip_and_partial() {
        let c = ServerConfig::default();
        let t = c.to_toml().unwrap();
        assert_eq!(ServerConfig::from_toml(&t).unwrap(), c);
        let p = ServerConfig::from_toml(
            "align_timeout = \"20ms\"\n[send_queue]\nbulk = 10\n[engine]\ndevices = [\"cpu\"]\n",
        )
        .unwrap();
        assert_eq!(p.align_timeout, Duration::from_millis(20));
        assert_eq!(p.send_queue.bulk, 10);
        assert_eq!(p.send_queue.critical, 400);
        assert_eq!(
            (p.replay_messages, p.replay_age),
            (1024, Duration::from_secs(30))
        );
        assert_eq!(p.engine.devices.len(), 1);
        assert!(ServerConfig::from_toml("nope = 1").is_err());
        c.validate().unwrap();
        assert_eq!(c.recv_buffer, 512 << 10);
        let small = ServerConfig::from_toml("recv_buffer = 100\n").unwrap();
        let e = small.validate().unwrap_err().to_string();
        assert!(e.contains("recv_buffer"), "{e}");
        ServerConfig::from_toml("recv_buffer = 0\n")
            .unwrap()
            .validate()
            .unwrap();
    }

    #[test]
    fn tls_files_go_together() {
        let t = ServerConfig::from_toml("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n").unwrap();
        assert_eq!(t.tls_cert.as_deref(), Some(Path::new("c.pem")));
        assert_eq!(t.tls_key.as_deref(), Some(Path::new("k.pem")));
        t.validate().unwrap();
        assert_eq!(ServerConfig::from_toml(&t.to_toml().unwrap()).unwrap(), t);
        let half = ServerConfig::from_toml("tls_key = \"k.pem\"\n").unwrap();
        let e = half.validate().unwrap_err().to_string();
        assert!(e.contains("tls_cert and tls_key"), "{e}");
    }
}
