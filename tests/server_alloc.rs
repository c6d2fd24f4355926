//! Heap allocations per sample of the whole server path in steady state (issue 17's counting
//! allocator): `samples` frames in over a real socket, the batcher, the engine on the CPU
//! device, the fan-out and `results` frames out. A global counting allocator counts every
//! allocation made by a thread that is not the client's (the server's runtime workers, the
//! engine's device worker and pool), over many frames after a warm-up: per sample, and per
//! extra sample (frames of 256 rows against as many of 128).

mod counting;
mod server_util;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use counting::Counting;
use fusion_engine::client::{Client, ConnectOptions};
use fusion_engine::engine::Priority;
use server_util::*;

/// Allocations (and reallocations) made by threads other than the client's.
static SERVER_ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the threads that are not the server's (the test's and the client's).
    static NOT_SERVER: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    // `try_with`: nothing to count while the thread's locals are being torn down.
    if NOT_SERVER.try_with(|c| !c.get()).unwrap_or(false) {
        SERVER_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting(count);

/// `calls` fuse_batch calls of the same rows: the results received.
async fn run(c: &mut Client, feats: &[(&str, &[f32])], calls: usize) -> usize {
    let mut results = 0;
    for _ in 0..calls {
        let r = c.fuse_batch("alloc", feats, Priority::Important).await;
        results += r.unwrap().len();
    }
    results
}

/// What the server path allocates per sample in total, with the client's frames of 256 rows
/// (docs/PERF.md, 2026-12-04 session 11: 0.21): what is left is per frame and per batch (the
/// frame's parse and keys, the batch's job and result bookkeeping, the fan-out's shared encoding
/// buffers), nothing per sample: one allocation per sample anywhere on the path would put it
/// over 1.
const BOUND: f64 = 0.3;

/// Allocations per extra sample at most: the same number of frames (and batches, each frame a
/// batch of its own) of 256 rows against 128 rows. 0.0003-0.0022 (3 to 23 allocations over
/// 10,240 more samples, either way: docs/PERF.md session 13); the slack is for the runtime's own
/// bookkeeping (timers, wakers, pools still growing). Session 12's fan-out, which allocated a
/// buffer and a shared header per 16 KiB of results, measured 0.015 here (D = 8) and 0.28 with
/// D = 512.
const MARGINAL_BOUND: f64 = 0.005;

/// One phase of the test: a client whose frames have `rows_per_frame` rows (a quarter of its
/// window, which its send queue sets: `fuse_batch`), `calls` calls of 8 frames each after a
/// warm-up. Returns (server allocations, samples).
fn phase(url: &str, x: &[Vec<f32>], rows_per_frame: usize, calls: usize) -> (u64, usize) {
    let url = url.to_string();
    let x = x.to_vec();
    let client = std::thread::spawn(move || {
        NOT_SERVER.with(|c| c.set(true));
        let crt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        crt.block_on(async move {
            // Window = 90% of the send queue (at most 1024), frames a quarter of it.
            let q = (rows_per_frame * 4 * 10).div_ceil(9);
            let o = ConnectOptions {
                send_queue: Some([q; 3]),
                ..ConnectOptions::default()
            };
            let mut c = Client::connect_with_options(&url, &o).await.unwrap();
            // The size asked for is granted (under max_send_queue) and echoed.
            let granted = &c.welcome().raw["limits"]["send_queue"]["important"];
            assert_eq!(granted.as_u64(), Some(q as u64));
            // 8 frames per call.
            let n = rows_per_frame * 8;
            let feats: Vec<(&str, &[f32])> = ["vision", "text", "audio"]
                .iter()
                .zip(&x)
                .map(|(m, v)| (*m, &v[..n * v.len() / 2048]))
                .collect();
            // Warm-up: pools, queues, the replay buffer (1024 per stream) and buffers fill.
            assert_eq!(run(&mut c, &feats, 4).await, 4 * n);
            let a0 = SERVER_ALLOCS.load(Ordering::Relaxed);
            let got = run(&mut c, &feats, calls).await;
            let a1 = SERVER_ALLOCS.load(Ordering::Relaxed);
            c.close().await;
            (a1 - a0, got)
        })
    });
    client.join().unwrap()
}

#[test]
fn steady_state_server_path_allocates_per_frame_never_per_sample() {
    NOT_SERVER.with(|c| c.set(true));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The embedded head's input widths (7,680 B of f32 features a sample), a small D.
    let h = head(&[("vision", 1024), ("text", 768), ("audio", 128)], 8, 3);
    let (server, url) = rt.block_on(start(h.clone(), config()));
    let n = 2048;
    let x: Vec<Vec<f32>> = h
        .modalities
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (0..n)
                .flat_map(|r| features(m.width, (r * 3 + i) as u64))
                .collect()
        })
        .collect();
    let calls = 10;
    let (big, big_n) = phase(&url, &x, 256, calls);
    let (small, small_n) = phase(&url, &x, 128, calls);
    assert_eq!((big_n, small_n), (calls * 8 * 256, calls * 8 * 128));
    let per = big as f64 / big_n as f64;
    let frames = (calls * 8) as f64;
    let marginal = (big as f64 - small as f64) / (big_n - small_n) as f64;
    eprintln!(
        "server path, {frames} frames each: {big} allocations for {big_n} samples ({per:.3} per \
         sample, {:.1} per frame), {small} for {small_n} ({:.1} per frame): {marginal:.4} per \
         extra sample",
        big as f64 / frames,
        small as f64 / frames
    );
    assert!(
        per <= BOUND,
        "{per:.3} allocations per sample (bound {BOUND}): something allocates per sample again"
    );
    assert!(
        marginal <= MARGINAL_BOUND,
        "{marginal:.4} allocations per extra sample (bound {MARGINAL_BOUND}): frames of 256 rows \
         cost {big} allocations, the same number of frames of 128 rows {small}"
    );
    rt.block_on(server.shutdown());
}
