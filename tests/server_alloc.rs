//! Heap allocations per sample of the whole server path in steady state (issue 17's counting
//! allocator): `samples` frames in over a real socket, the batcher, the engine on the CPU
//! device, the fan-out and `results` frames out. A global counting allocator counts every
//! allocation made by a thread that is not the client's (the server's runtime workers, the
//! engine's device worker and pool), over many frames after a warm-up, divided by the samples.

mod server_util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use fusion_engine::client::{Client, ConnectOptions};
use fusion_engine::engine::Priority;
use server_util::*;

/// Allocations (and reallocations) made by threads other than the client's.
static SERVER_ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the threads that are not the server's (the test's and the client's).
    static NOT_SERVER: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

fn count() {
    // `try_with`: nothing to count while the thread's locals are being torn down.
    if NOT_SERVER.try_with(|c| !c.get()).unwrap_or(false) {
        SERVER_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts (an atomic and a
// const-initialised thread-local `Cell`, neither of which allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `calls` fuse_batch calls of the same rows: the results received.
async fn run(c: &mut Client, feats: &[(&str, &[f32])], calls: usize) -> usize {
    let mut results = 0;
    for _ in 0..calls {
        let r = c.fuse_batch("alloc", feats, Priority::Important).await;
        results += r.unwrap().len();
    }
    results
}

/// What the server path allocates per sample now, with the client's frames of 256 rows
/// (docs/PERF.md, 2026-12-04 session 11: 0.21). The goal is 0; what is left is per frame and
/// per batch (the frame's parse and keys, the batch's job and result bookkeeping, the fan-out's
/// shared encoding buffers), nothing per sample: one allocation per sample anywhere on the path
/// would put it over 1.
const BOUND: f64 = 0.3;

#[test]
fn steady_state_server_path_allocates_well_under_one_per_sample() {
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
    let client = std::thread::spawn(move || {
        NOT_SERVER.with(|c| c.set(true));
        let crt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        crt.block_on(async move {
            let o = ConnectOptions {
                send_queue: Some([4096; 3]),
                ..ConnectOptions::default()
            };
            let mut c = Client::connect_with_options(&url, &o).await.unwrap();
            // The sizes asked for are granted (under max_send_queue) and echoed.
            let q = &c.welcome().raw["limits"]["send_queue"];
            assert_eq!(
                (q["critical"].as_u64(), q["bulk"].as_u64()),
                (Some(4096), Some(4096))
            );
            let feats: Vec<(&str, &[f32])> = vec![
                ("vision", x[0].as_slice()),
                ("text", x[1].as_slice()),
                ("audio", x[2].as_slice()),
            ];
            // Warm-up: pools, queues, the replay buffer (1024 per stream) and buffers fill.
            assert_eq!(run(&mut c, &feats, 4).await, 4 * n);
            let a0 = SERVER_ALLOCS.load(Ordering::Relaxed);
            let got = run(&mut c, &feats, 10).await;
            let a1 = SERVER_ALLOCS.load(Ordering::Relaxed);
            c.close().await;
            (a1 - a0, got)
        })
    });
    let (allocs, samples) = client.join().unwrap();
    assert_eq!(samples, 10 * n);
    let per = allocs as f64 / samples as f64;
    eprintln!("server path: {allocs} allocations for {samples} samples = {per:.3} per sample");
    assert!(
        per <= BOUND,
        "{per:.3} allocations per sample (bound {BOUND}): something allocates per sample again"
    );
    rt.block_on(server.shutdown());
}
