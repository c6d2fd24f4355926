//! A producer connection: sends every modality of its samples (binary F32, F16 or BF16, `last` on the final
//! one) into its own stream, at a target rate or as fast as the server reads (flood), with a
//! fixed class mix; reads its socket for errors and `shed` notices. A producer with a target
//! rate honours `ingest_backpressure` (PROTOCOL 5.1): it pauses while the server says `on` and
//! resumes on `off` (or after [`MAX_PAUSE`]), continuing its schedule from where it paused
//! rather than sending the missed samples in a burst. A flooding producer does not: it is
//! there to overload the server.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::conn::{connect_with, hello, Hello};
use super::frames::{push_key, Frames};
use super::options::LoadgenError;
use super::raw_sink;
use super::stats::{make_key, now_us, parse_key};
use crate::engine::Priority;
use crate::protocol::{encode_produce, FLAG_LAST};
use crate::tensor::DType;

/// One producer's settings.
#[derive(Debug, Clone)]
pub(crate) struct ProducerCfg {
    pub url: String,
    pub stream: String,
    /// Samples per second; `None` = flood.
    pub rate: Option<f64>,
    /// Stop producing at this instant.
    pub until: Instant,
    /// Payload dtype.
    pub dtype: DType,
    /// (modality name, little-endian `dtype` payload), head order.
    pub mods: Arc<Vec<(String, Vec<u8>)>>,
    /// 1: one produce frame per modality (the aligner joins them); N > 1: whole samples in
    /// `samples` frames of up to N samples (one frame per class among the samples due).
    pub samples_per_frame: usize,
    /// The socket's kernel send buffer (`SO_SNDBUF`), bytes; `None`: the kernel's autotuning.
    pub send_buffer: Option<u32>,
}

/// Longest pause for one `ingest_backpressure` `on` without an `off` (a lost `off` must not
/// stop a producer for the rest of the run).
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Bytes of frames tungstenite buffers before writing them without a flush.
const WRITE_BUFFER: usize = 8 << 20;

/// What one producer saw.
#[derive(Debug, Default)]
pub struct ProducerRecord {
    /// Its stream.
    pub stream: String,
    /// Samples sent, per class.
    pub sent: [u64; 3],
    /// `error` messages, by code.
    pub errors: BTreeMap<String, u64>,
    /// `shed` notices.
    pub shed: u64,
    /// Keys of CRITICAL samples sent.
    pub critical_sent: Vec<String>,
    /// Keys of CRITICAL samples with at least one refused modality.
    pub critical_refused: HashSet<String>,
    /// Close code and reason, if the server closed it.
    pub close: Option<(Option<u16>, String)>,
    /// `ingest_backpressure` `on` notices received.
    pub backpressure_on: u64,
    /// Time spent paused by them.
    pub paused: Duration,
}

/// The class of sample `i`: 10% CRITICAL, 30% IMPORTANT, 60% BULK.
pub(crate) fn class_of(i: u64) -> usize {
    match i % 10 {
        0 => 0,
        1..=3 => 1,
        _ => 2,
    }
}

const PRIORITIES: [Priority; 3] = [Priority::Critical, Priority::Important, Priority::Bulk];

/// Runs one producer until `cfg.until`, then closes and returns what it saw.
pub(crate) async fn run_producer(cfg: ProducerCfg) -> Result<ProducerRecord, LoadgenError> {
    // A burst of due samples goes out in one write, at its flush.
    let ws = connect_with(&cfg.url, None, cfg.send_buffer, Some(WRITE_BUFFER)).await?;
    // Frames go to the socket from their own buffers, unmasked by the all-zero key (no copy
    // and no masking pass: `raw_sink.rs`).
    let (mut tx, rx) = raw_sink::split(ws, WRITE_BUFFER).await;
    hello(&mut tx, 1, Hello::default()).await?;
    let (pressure_tx, mut pressure) = watch::channel(false);
    let reader = tokio::spawn(read_replies(rx, pressure_tx));
    let mut rec = ProducerRecord::default();
    let mut start = Instant::now();
    let mut i: u64 = 0;
    // `samples` frames' payload blocks, `samples_per_frame` rows each, built once: a frame of
    // n samples sends the first n rows (a producer holding its batches in memory does not
    // copy them before encoding).
    let blocks: Vec<Vec<u8>> = if cfg.samples_per_frame > 1 {
        cfg.mods
            .iter()
            .map(|(_, b)| b.repeat(cfg.samples_per_frame))
            .collect()
    } else {
        Vec::new()
    };
    let names: Vec<&str> = cfg.mods.iter().map(|(m, _)| m.as_str()).collect();
    let mut frames = Frames::default();
    while Instant::now() < cfg.until {
        if cfg.rate.is_some() && *pressure.borrow() {
            // Paused by the server: nothing we fed may wait in our buffer meanwhile, and the
            // schedule moves on by the pause instead of catching up in a burst.
            tx.flush().await?;
            let t = Instant::now();
            let until = cfg.until.min(t + MAX_PAUSE);
            let _ = tokio::time::timeout_at(until, pressure.wait_for(|on| !*on)).await;
            let paused = t.elapsed();
            rec.paused += paused;
            start += paused;
            continue;
        }
        if let Some(rate) = cfg.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate.max(0.001));
            if due >= cfg.until {
                break;
            }
            if due > Instant::now() {
                // About to wait: nothing we fed may sit in our buffer meanwhile.
                tx.flush().await?;
                tokio::time::sleep_until(due).await;
            }
        }
        if cfg.samples_per_frame > 1 {
            // Every sample already due (at least this one), up to a frame's worth.
            let n = match cfg.rate {
                None => cfg.samples_per_frame as u64,
                Some(rate) => {
                    let now = Instant::now();
                    let mut n = 1u64;
                    while n < cfg.samples_per_frame as u64 {
                        let due = start + Duration::from_secs_f64((i + n) as f64 / rate.max(0.001));
                        if due > now || due >= cfg.until {
                            break;
                        }
                        n += 1;
                    }
                    n
                }
            };
            let rows = Rows {
                all: &blocks,
                names: &names,
            };
            send_samples(&cfg, &mut tx, &mut rec, rows, &mut frames, i, n).await?;
            // One write per batch of due samples.
            tx.flush().await?;
            i += n;
            continue;
        }
        let class = class_of(i);
        let key = make_key(class, i, now_us());
        for (j, (name, bytes)) in cfg.mods.iter().enumerate() {
            let flags = if j + 1 == cfg.mods.len() {
                FLAG_LAST
            } else {
                0
            };
            let f = encode_produce(
                &cfg.stream,
                &key,
                name,
                cfg.dtype,
                PRIORITIES[class],
                flags,
                0,
                bytes,
            )
            .ok_or_else(|| LoadgenError::Config("stream or key name too long".into()))?;
            tx.feed(Message::binary(f)).await?;
        }
        // Flushed before sleeping (above) and every 16 samples while behind schedule or
        // flooding: one write for many frames instead of one per sample.
        if i % 16 == 15 {
            tx.flush().await?;
        }
        rec.sent[class] += 1;
        if class == 0 {
            rec.critical_sent.push(key);
        }
        i += 1;
    }
    tx.flush().await?;
    // Let the last samples' errors come back before saying goodbye.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tx.send(Message::Close(None)).await;
    let seen = match tokio::time::timeout(Duration::from_secs(10), reader).await {
        Ok(Ok(seen)) => seen,
        _ => Replies::default(),
    };
    rec.errors = seen.errors;
    rec.shed = seen.shed;
    rec.critical_refused = seen.critical_refused;
    rec.close = seen.close;
    rec.backpressure_on = seen.backpressure_on;
    Ok(rec)
}

/// What a producer's `samples` frames are built from.
#[derive(Clone, Copy)]
struct Rows<'a> {
    /// Per modality, `samples_per_frame` rows: a frame of n samples sends the first n.
    all: &'a [Vec<u8>],
    /// The modalities' names, head order.
    names: &'a [&'a str],
}

/// Samples `i..i + n` as one `samples` frame per class present among them, built by `frames`
/// (a kept frame of the same class and count with its keys rewritten, or one encoded into a
/// kept buffer).
async fn send_samples<S>(
    cfg: &ProducerCfg,
    tx: &mut S,
    rec: &mut ProducerRecord,
    rows: Rows<'_>,
    frames: &mut Frames,
    i: u64,
    n: u64,
) -> Result<(), LoadgenError>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let t = now_us();
    let mut counts = [0usize; 3];
    for k in i..i + n {
        counts[class_of(k)] += 1;
    }
    for (class, count) in counts.into_iter().enumerate() {
        if count == 0 {
            continue;
        }
        let blocks: Vec<&[u8]> = rows
            .all
            .iter()
            .zip(cfg.mods.iter())
            .map(|(all, (_, one))| all.get(..one.len() * count).unwrap_or_default())
            .collect();
        let mut ks = (i..i + n).filter(|&k| class_of(k) == class);
        let key = |v: &mut Vec<u8>| {
            if let Some(k) = ks.next() {
                push_key(v, class, k, t);
            }
        };
        let head = (cfg.stream.as_str(), cfg.dtype, PRIORITIES[class], false, 0);
        let f = frames
            .samples(head, count, key, rows.names, &blocks)
            .ok_or_else(|| LoadgenError::Config("stream or key name too long".into()))?;
        tx.feed(Message::Binary(f)).await?;
        rec.sent[class] += count as u64;
        if class == 0 {
            let critical = (i..i + n).filter(|&k| class_of(k) == 0);
            rec.critical_sent
                .extend(critical.map(|k| make_key(0, k, t)));
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Replies {
    errors: BTreeMap<String, u64>,
    shed: u64,
    critical_refused: HashSet<String>,
    close: Option<(Option<u16>, String)>,
    backpressure_on: u64,
}

/// Reads the producer's socket: errors, `shed` notices, and `ingest_backpressure` into
/// `pressure` (true while `on`).
async fn read_replies(
    mut rx: tokio_tungstenite::WebSocketStream<raw_sink::ReadOnly>,
    pressure: watch::Sender<bool>,
) -> Replies {
    let mut r = Replies::default();
    while let Some(m) = rx.next().await {
        match m {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                let refused = if v["type"] == "error" {
                    let code = v["code"].as_str().unwrap_or("?").to_string();
                    *r.errors.entry(code).or_default() += 1;
                    true
                } else if v["type"] == "notice" && v["kind"] == "shed" {
                    r.shed += 1;
                    true
                } else if v["type"] == "notice" && v["kind"] == "ingest_backpressure" {
                    let on = v["state"] == "on";
                    r.backpressure_on += u64::from(on);
                    pressure.send_replace(on);
                    false
                } else {
                    false
                };
                if refused {
                    let keys = v["keys"].as_array().cloned().unwrap_or_default();
                    let single = v["key"].as_str().map(|k| serde_json::json!(k));
                    for k in keys.iter().chain(single.iter()).filter_map(|k| k.as_str()) {
                        if parse_key(k).is_some_and(|(c, _)| c == 0) {
                            r.critical_refused.insert(k.to_string());
                        }
                    }
                }
            }
            Ok(Message::Close(f)) => {
                r.close = f.map(|f| (Some(u16::from(f.code)), f.reason.to_string()));
                break;
            }
            Ok(_) => {}
            Err(e) => {
                r.close = Some((None, e.to_string()));
                break;
            }
        }
    }
    r
}
