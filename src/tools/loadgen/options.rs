//! A load run's [`Options`] and its failures ([`LoadgenError`]).

use std::time::Duration;

use crate::tensor::DType;

/// Load generator failures.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// Bad options.
    #[error("config: {0}")]
    Config(String),
    /// A connection could not be opened or broke while setting up.
    #[error("connect: {0}")]
    Connect(String),
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    /// The in-process server failed to start.
    #[error("server: {0}")]
    Server(#[from] crate::error::Error),
    /// `/metrics` could not be read.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The plot could not be written.
    #[error("plot: {0}")]
    Plot(String),
    /// A task did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Options of one run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Server URL; `None` = start one in-process on 127.0.0.1:0 with the plan's devices.
    pub url: Option<String>,
    /// `host:port` of the server's `/metrics` (in-process: its own).
    pub metrics: Option<String>,
    /// How long producers produce.
    pub duration: Duration,
    /// Server RSS bound checked by the report, MiB.
    pub max_rss_mb: f64,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Write the SVG plot here.
    pub plot: Option<std::path::PathBuf>,
    /// Scrape interval.
    pub scrape_every: Duration,
    /// Wire dtype of the producers' payloads.
    pub dtype: DType,
    /// 1: one produce frame per modality; N > 1: `samples` frames of up to N whole samples.
    pub samples_per_frame: usize,
    /// Subscribers ask for several results per frame (`batch_results`, PROTOCOL 4.5).
    pub batch_results: bool,
    /// Subscribers ask for send queues of this many results per class (`hello`'s `send_queue`).
    pub send_queue: Option<usize>,
    /// Each producer's kernel send buffer (`SO_SNDBUF`), bytes; `None`: the kernel's autotuning.
    pub producer_send_buffer: Option<u32>,
}

/// The producers' default kernel send buffer: 512 KiB (Linux doubles it), so that under
/// overload a producer's frames wait unbuilt in the producer, not timestamped in a 4 MiB socket
/// buffer (docs/PERF.md, session 16).
pub const PRODUCER_SEND_BUFFER: u32 = 512 << 10;

impl Default for Options {
    fn default() -> Self {
        Options {
            url: None,
            metrics: None,
            duration: Duration::from_secs(10),
            max_rss_mb: 1024.0,
            progress: false,
            plot: None,
            scrape_every: Duration::from_millis(100),
            dtype: DType::F32,
            samples_per_frame: 1,
            batch_results: false,
            send_queue: None,
            producer_send_buffer: Some(PRODUCER_SEND_BUFFER),
        }
    }
}
