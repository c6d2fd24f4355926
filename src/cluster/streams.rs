//! The JetStream layout both sides agree on (docs/DESIGN.md section 11): the work-queue stream
//! of batches (one subject, hence one durable pull consumer, per priority class), the results
//! stream (whose duplicate window drops a second publish of the same batch id; one durable
//! consumer per gateway id), the stream of results shared between gateways (one subject per
//! fusion stream), and the connection with a clear error naming the URL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::engine::Priority;
use crate::error::{Error, Result};

/// The batches' work-queue stream.
pub const BATCH_STREAM: &str = "FUSION_BATCHES";
/// The results' stream.
pub const RESULT_STREAM: &str = "FUSION_RESULTS";
/// The stream of results shared between gateways, one subject per fusion stream.
pub const SHARED_STREAM: &str = "FUSION_STREAMS";
/// How long NATS keeps a gateway's durable results consumer after it was last used: longer than
/// the results are kept (`DUPLICATE_WINDOW`), so a gateway restarted within that finds it.
pub const GATEWAY_CONSUMER_IDLE: Duration = Duration::from_secs(600);
/// JetStream's duplicate window on both streams: a batch id published twice within it is
/// stored once (docs/DESIGN.md section 11 states what this does and does not cover).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Core NATS subject of the workers' heartbeats, `NAME FINGERPRINT-HEX`: a worker announces its
/// head; the gateway's `/healthz` counts the compatible ones (docs/DESIGN.md section 11).
pub const WORKER_HEARTBEAT: &str = "fusion.workers.heartbeat";
/// Core NATS subject of the gateways' heartbeats, `ID INCARNATION`: a gateway that hears its
/// own id from another incarnation reports it (docs/DESIGN.md section 11, ids must be unique).
pub const GATEWAY_HEARTBEAT: &str = "fusion.gateways.heartbeat";
/// How often a worker (and a gateway) sends its heartbeat; forgotten after three missed.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// The subject of a class's batches: `fusion.batches.critical` etc.
pub fn batch_subject(p: Priority) -> String {
    format!("fusion.batches.{}", class_name(p))
}

/// The results subject of one gateway.
pub fn result_subject(gateway: &str) -> String {
    format!("fusion.results.{gateway}")
}

/// The subject of a fusion stream's shared results: `fusion.streams.` and the first 16 bytes of
/// the SHA-256 of the name in hex (a stream name may hold any character, a subject token may
/// not; the message carries the name, and a reader checks it).
pub fn stream_subject(stream: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(stream.as_bytes());
    let mut s = String::with_capacity(15 + 32);
    s.push_str("fusion.streams.");
    for b in &h[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The durable consumer of one gateway id's results (`fusion-gateway-<id>`).
pub fn gateway_consumer_name(gateway: &str) -> String {
    format!("fusion-gateway-{gateway}")
}

/// The durable pull consumer every worker shares for a class.
pub fn consumer_name(p: Priority) -> String {
    format!("fusion-workers-{}", class_name(p))
}

fn class_name(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "critical",
        Priority::Important => "important",
        Priority::Bulk => "bulk",
    }
}

/// How to reach NATS: `nats://HOST:PORT`, and optionally the CA file that signed the server's
/// TLS certificate (`--nats-tls-ca`: TLS required) and a credentials file (`--nats-creds`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NatsAccess {
    /// `nats://HOST:PORT`.
    pub url: String,
    /// PEM CA certificate(s) trusted for the server's certificate; TLS is then required.
    pub tls_ca: Option<PathBuf>,
    /// NATS credentials file (user JWT and NKey seed).
    pub creds: Option<PathBuf>,
}

impl NatsAccess {
    /// Plain `url`, no TLS, no credentials.
    pub fn plain(url: &str) -> NatsAccess {
        NatsAccess {
            url: url.to_string(),
            ..NatsAccess::default()
        }
    }
}

fn readable(flag: &str, p: &Path) -> Result<()> {
    std::fs::metadata(p)
        .map(|_| ())
        .map_err(|e| Error::Config(format!("{flag} {}: {e}", p.display())))
}

/// Connects (one attempt, then reconnects forever in the background) and opens JetStream; an
/// unreachable server is an error naming the URL, an unreadable file one naming the file.
pub async fn connect(a: &NatsAccess) -> Result<(async_nats::Client, jetstream::Context)> {
    let url = &a.url;
    let mut opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
    if let Some(ca) = &a.tls_ca {
        readable("--nats-tls-ca", ca)?;
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some(creds) = &a.creds {
        readable("--nats-creds", creds)?;
        opts = opts
            .credentials_file(creds)
            .await
            .map_err(|e| Error::Config(format!("--nats-creds {}: {e}", creds.display())))?;
    }
    let client = opts
        .connect(url)
        .await
        .map_err(|e| Error::Config(format!("cannot connect to NATS at {url}: {e}")))?;
    let js = jetstream::new(client.clone());
    Ok((client, js))
}

/// Creates the three streams when they do not exist yet (an existing stream is used as it is).
pub async fn ensure_streams(
    js: &jetstream::Context,
    max_bytes: i64,
) -> Result<jetstream::stream::Stream> {
    let batches = get_or_create(
        js,
        stream::Config {
            name: BATCH_STREAM.into(),
            subjects: vec!["fusion.batches.*".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_bytes,
            discard: stream::DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        },
        "creating the batch stream",
    )
    .await?;
    get_or_create(
        js,
        stream::Config {
            name: RESULT_STREAM.into(),
            subjects: vec!["fusion.results.>".into()],
            storage: stream::StorageType::File,
            max_age: DUPLICATE_WINDOW,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        },
        "creating the result stream",
    )
    .await?;
    get_or_create(
        js,
        stream::Config {
            name: SHARED_STREAM.into(),
            subjects: vec!["fusion.streams.>".into()],
            storage: stream::StorageType::File,
            max_age: DUPLICATE_WINDOW,
            max_bytes,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        },
        "creating the shared results stream",
    )
    .await?;
    Ok(batches)
}

/// The stream `config` names, created when missing. A gateway and a worker that start together
/// both find it missing and both create it, sized differently (a gateway's `max_bytes`, a
/// worker's 1 GiB); NATS refuses the second create ("stream name already in use with a
/// different configuration", 10058, or "subjects overlap with an existing stream", 10065: a CI
/// run's worker exited on it), so a failed create looks the stream up once more and uses the
/// one the other side made, as an existing stream is used.
async fn get_or_create(
    js: &jetstream::Context,
    config: stream::Config,
    what: &str,
) -> Result<jetstream::stream::Stream> {
    let name = config.name.clone();
    match js.get_or_create_stream(config).await {
        Ok(s) => Ok(s),
        Err(e) => js.get_stream(&name).await.map_err(|_| nats_err(what, e)),
    }
}

/// The class's shared durable pull consumer (created by the first worker).
pub async fn class_consumer(
    batches: &jetstream::stream::Stream,
    p: Priority,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> Result<consumer::PullConsumer> {
    let name = consumer_name(p);
    batches
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: batch_subject(p),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait,
                max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats_err("creating a consumer", e))
}

/// One gateway id's durable results consumer: created at the gateway's first start with
/// `DeliverPolicy::New`, found again by a restart with the same id (which then reads what the
/// earlier process had not acked); removed by NATS after [`GATEWAY_CONSUMER_IDLE`] unused.
pub async fn gateway_consumer(
    js: &jetstream::Context,
    gateway: &str,
    ack_wait: Duration,
) -> Result<consumer::PullConsumer> {
    let name = gateway_consumer_name(gateway);
    let results = js
        .get_stream(RESULT_STREAM)
        .await
        .map_err(|e| nats_err("opening the result stream", e))?;
    results
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: result_subject(gateway),
                deliver_policy: consumer::DeliverPolicy::New,
                // Acking a result acks every earlier one: the inbox acks the last it
                // handled every 20 ms or 256 results (docs/DESIGN.md section 11).
                ack_policy: consumer::AckPolicy::All,
                ack_wait,
                max_ack_pending: 100_000,
                inactive_threshold: GATEWAY_CONSUMER_IDLE,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats_err("creating the gateway's results consumer", e))
}

/// A NATS failure as the engine's retryable error (producers see `overloaded`).
pub fn nats_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Overloaded(format!("NATS: {what}: {e}"))
}
