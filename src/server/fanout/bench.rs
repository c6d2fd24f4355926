//! A fixed fan-out for the bench and the allocation tests (benches/fanout.rs,
//! tests/fanout_alloc.rs): batches of one stream's results through the fan-out of a batch
//! ([`deliver_results`], what `fan_out` runs), to N subscribers, whose queues are then drained
//! as their writers drain them ([`Framer`], bursts of `BURST_MESSAGES` / `BURST_BYTES`).
//! Not part of the API: hidden from the docs, no stability promise.

use std::sync::Arc;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;

use super::deliver::{deliver_results, Meta};
use super::outbound::{Next, Outbound};
use super::registry::Registry;
use super::replay::Replay;
use super::writer::{Framer, BURST_BYTES, BURST_MESSAGES};
use crate::engine::Priority;
use crate::protocol::VERSION_2;
use crate::server::config::ServerConfig;
use crate::server::ingest::keys::RunKeys;
use crate::server::metrics::ServerMetrics;

/// Fused width of the bench's results (the embedded head's).
const DIM: usize = 512;
/// Modalities of the bench's results.
const MODALITIES: usize = 3;

/// How the bench's subscribers take their results (`hello`, PROTOCOL 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchResults {
    /// JSON results.
    Json,
    /// Binary version 1, one result per frame.
    V1,
    /// Binary version 2, one result per frame.
    V2,
    /// Binary version 2, `results` frames (PROTOCOL 4.5).
    V2Frames,
}

/// Batches of IMPORTANT results (kept for replay) of stream `bench`, fanned out to
/// subscribers that each first got their index's number of results of a stream of their own
/// (so that their per-connection seqs differ).
#[doc(hidden)]
pub struct FanoutBench {
    registry: Registry,
    replay: Replay,
    subs: Vec<Arc<Outbound>>,
    framers: Vec<Framer>,
    metas: Vec<Meta>,
    fused: Vec<f32>,
    weights: Vec<f32>,
}

impl FanoutBench {
    /// `subscribers` connections taking results `how`; batches of `results` results.
    pub fn new(subscribers: usize, results: usize, how: BenchResults) -> FanoutBench {
        let cfg = ServerConfig::default();
        let m = Arc::new(ServerMetrics::new());
        let registry = Registry::default();
        let replay = Replay::new(&cfg, Arc::clone(&m));
        let stream: Arc<str> = Arc::from("bench");
        let mut subs = Vec::new();
        for i in 0..subscribers {
            let o = Arc::new(Outbound::new(
                i as u64,
                &cfg.send_queue,
                Duration::from_millis(100),
                cfg.replay_messages,
                Arc::clone(&m),
            ));
            match how {
                BenchResults::Json => o.set_encoding(false, VERSION_2),
                BenchResults::V1 => o.set_encoding(true, 1),
                BenchResults::V2 | BenchResults::V2Frames => o.set_encoding(true, VERSION_2),
            }
            o.set_batch_results(how == BenchResults::V2Frames);
            subs.push(o);
        }
        let meta = |stream: &Arc<str>, j: usize| Meta {
            stream: Arc::clone(stream),
            keys: RunKeys::Own(format!("frame-{j:06}")),
            priority: Priority::Important,
            mask: vec![1; MODALITIES].into(),
            producers: Arc::new([]),
        };
        let fused: Vec<f32> = (0..results * DIM).map(|x| x as f32 * 0.25).collect();
        let weights: Vec<f32> = (0..results * MODALITIES).map(|x| x as f32).collect();
        // Each subscriber's own stream first: subscriber i's seqs start at i + 1 on `bench`.
        for (i, o) in subs.iter().enumerate() {
            let own: Arc<str> = Arc::from(format!("own-{i}"));
            registry.subscribe(&own, o);
            let metas: Vec<Meta> = (0..i).map(|j| meta(&own, j)).collect();
            deliver_results(
                &replay,
                &registry,
                &metas,
                &fused,
                &weights,
                (DIM, MODALITIES),
            );
        }
        for o in &subs {
            registry.subscribe(&stream, o);
        }
        let metas = (0..results).map(|j| meta(&stream, j)).collect();
        let framers = subs.iter().map(|_| Framer::default()).collect();
        let mut b = FanoutBench {
            registry,
            replay,
            subs,
            framers,
            metas,
            fused,
            weights,
        };
        b.drain_each(|_, _| {});
        b
    }

    /// Fans one batch out to every subscriber's queues.
    pub fn deliver(&mut self) {
        let dims = (DIM, MODALITIES);
        deliver_results(
            &self.replay,
            &self.registry,
            &self.metas,
            &self.fused,
            &self.weights,
            dims,
        );
    }

    /// Drains every subscriber's queues as its writer would; returns the bytes of the
    /// WebSocket messages made.
    pub fn drain(&mut self) -> usize {
        let mut bytes = 0;
        self.drain_each(|_, m| bytes += m.len());
        bytes
    }

    /// Drains every subscriber's queues as its writer would: each subscriber's binary
    /// messages (text ones as their UTF-8 bytes), in order.
    pub fn drain_messages(&mut self) -> Vec<Vec<Vec<u8>>> {
        let mut out = vec![Vec::new(); self.subs.len()];
        self.drain_each(|i, m| {
            if let Some(v) = out.get_mut(i) {
                v.push(m.into_data().to_vec());
            }
        });
        out
    }

    fn drain_each(&mut self, mut sink: impl FnMut(usize, Message)) {
        for (i, (o, f)) in self.subs.iter().zip(&mut self.framers).enumerate() {
            let (mut n, mut bytes) = (0, 0);
            f.begin(o);
            while let Next::Send(it) = o.next() {
                bytes += it.msg.len();
                for m in f.push(it).into_iter().flatten() {
                    n += 1;
                    sink(i, m);
                }
                if n >= BURST_MESSAGES || bytes >= BURST_BYTES {
                    (n, bytes) = (0, 0);
                    if let Some(m) = f.finish() {
                        sink(i, m);
                    }
                    f.begin(o);
                }
            }
            if let Some(m) = f.finish() {
                sink(i, m);
            }
        }
    }
}
