//! Shared set-up of the engine test binaries (`engine.rs`, `engine_priority.rs`): a watchdog,
//! a small head, an engine config of CPU devices, random batches, submission with retries, and
//! the direct CPU backend's result to compare with.
#![allow(dead_code)]

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;

use fusion_engine::backend::{self, Backend, BackendKind, OpenOptions};
use fusion_engine::batch::{Batch, Outputs};
use fusion_engine::engine::{DeviceSpec, Engine, EngineConfig, Priority, Ticket};
use fusion_engine::error::Error;
use fusion_engine::model::FusionHead;
use fusion_engine::selftest::{random_batch, MaskMode};
use fusion_engine::tensor::DType;

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(RecvTimeoutError::Disconnected) => panic!("the test body panicked (see above)"),
        Err(RecvTimeoutError::Timeout) => {
            panic!("test did not finish within {secs} s (a caller waited forever?)")
        }
    }
}

pub fn small_head() -> Arc<FusionHead> {
    Arc::new(FusionHead::random(
        &[("a".into(), 48), ("b".into(), 24), ("c".into(), 8)],
        32,
        1e-5,
        7,
    ))
}

pub fn config(devices: &str) -> EngineConfig {
    let mut c = EngineConfig::with_devices(DeviceSpec::parse_list(devices).unwrap());
    c.restart_backoff = Duration::from_millis(10);
    c.restart_backoff_max = Duration::from_millis(200);
    c
}

pub fn batches(head: &FusionHead, n: usize, rows: usize, seed: u64) -> Vec<Arc<Batch>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            Arc::new(random_batch(
                head,
                rows,
                DType::F32,
                MaskMode::Random,
                &mut rng,
            ))
        })
        .collect()
}

/// Submits, retrying after `Overloaded`; calls `watch` between submissions.
pub fn submit_all(
    engine: &Engine,
    bs: &[Arc<Batch>],
    mut watch: impl FnMut(&Engine),
) -> Vec<Ticket> {
    let mut out = Vec::with_capacity(bs.len());
    for b in bs {
        loop {
            match engine.submit_shared(Arc::clone(b), Priority::Important) {
                Ok(t) => break out.push(t),
                Err(Error::Overloaded(_)) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("submit: {e}"),
            }
            watch(engine);
        }
        watch(engine);
    }
    out
}

/// The direct CPU backend's result for `b`.
pub fn direct(head: &Arc<FusionHead>, b: &Batch) -> Outputs {
    let mut be = backend::open(
        BackendKind::Cpu,
        9,
        Arc::clone(head),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut out = Outputs::zeros(head, b.rows);
    be.run(&b.view(), out.as_mut()).unwrap();
    out
}

pub fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    assert!(
        (num / den.max(1e-30)).sqrt() <= 1e-5,
        "engine result differs from the direct run"
    );
}
