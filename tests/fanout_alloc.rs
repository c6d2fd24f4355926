//! The fan-out of a batch (docs/DESIGN.md section 5) through the doc-hidden
//! `fusion_engine::server::FanoutBench` (the server's own fan-out and writer framing): heap
//! allocations per result in steady state, counted by a per-thread counting allocator, and what
//! several subscribers of one stream receive (the same payload, each its own seqs).

mod counting;

use std::cell::Cell;

use counting::Counting;
use fusion_engine::protocol::{decode_result, split_results};
use fusion_engine::server::{BenchResults, FanoutBench};

// Allocations (and reallocations) are counted per thread, the one that makes them, so that
// tests running in parallel do not count each other's.
thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: nothing to count while the thread's locals are being torn down.
    let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
}

#[global_allocator]
static GLOBAL: Counting = Counting(count);

fn allocs() -> u64 {
    ALLOCS.with(|a| a.get())
}

/// Allocations per result of fanning out and draining (as the writers do) `rounds` batches of
/// `results`, after a warm-up that fills the replay buffer (1024 per stream) and the buffers.
fn allocs_per_result(subs: usize, how: BenchResults, results: usize, rounds: u64) -> f64 {
    let mut b = FanoutBench::new(subs, results, how);
    for _ in 0..(1024 / results + 2) {
        b.deliver();
        b.drain();
    }
    let a0 = allocs();
    for _ in 0..rounds {
        b.deliver();
        b.drain();
    }
    (allocs() - a0) as f64 / (rounds * results as u64) as f64
}

/// The bound this fan-out achieves (docs/PERF.md, 2026-12-04 session 13: 0.052-0.067): consecutive
/// binary results of one stream and class in a batch are encoded into one chunk of up to 16 KiB
/// that they share, from a pool that hands a chunk out again once its results are gone (none
/// per result, none per chunk in steady state); what is left is per batch (grouping by stream,
/// the lists of encodings), and the pool growing by a chunk when the oldest ones are still held:
/// 0.05-0.07 per result of a 200-result batch; nothing per subscriber:
/// queues hold references and the writers reuse their buffers. (Session 11: 0.29, the chunk
/// and the `bytes` crate's shared header per 16 KiB; before: two per result.)
const BINARY_BOUND: f64 = 0.08;

/// Version 1 sessions take an encoding of their own (no stream seq), made once per result for
/// all of them, two allocations more; the version 2 one is still made for the replay buffer.
const V1_BOUND: f64 = 2.08;

#[test]
fn steady_state_fan_out_allocates_per_run_of_results_not_per_result_whatever_the_subscribers() {
    // 200 results: under 70% of the 300-slot IMPORTANT queue, so no backpressure notice (a
    // JSON message each, on and off per batch per subscriber) is counted here.
    for how in [BenchResults::V2, BenchResults::V2Frames, BenchResults::V1] {
        let bound = match how {
            BenchResults::V1 => V1_BOUND,
            _ => BINARY_BOUND,
        };
        for subs in [1, 4] {
            let per = allocs_per_result(subs, how, 200, 8);
            assert!(
                per <= bound,
                "{how:?} with {subs} subscribers: {per} allocations per result"
            );
        }
    }
}

#[test]
fn full_batches_add_only_the_backpressure_notices_per_subscriber() {
    // 256 results fill the 300-slot queue past 70%: each subscriber gets a `backpressure` on
    // and off notice per batch (docs/DESIGN.md 5.2), a few allocations each, per batch.
    for subs in [1, 4] {
        let per = allocs_per_result(subs, BenchResults::V2, 256, 8);
        let bound = BINARY_BOUND + 0.15 * subs as f64;
        assert!(
            per <= bound,
            "{subs} subscribers: {per} allocations per result"
        );
    }
}

/// The payload of a binary result with its seq zeroed, and that seq.
fn without_seq(frame: &[u8]) -> (Vec<u8>, u64) {
    let seq = decode_result(frame).map_or(0, |d| d.seq);
    let mut v = frame.to_vec();
    v[16..24].fill(0);
    (v, seq)
}

#[test]
fn four_subscribers_get_the_same_results_each_with_its_own_seqs() {
    for how in [BenchResults::V2, BenchResults::V2Frames, BenchResults::V1] {
        // Subscriber i got i results of a stream of its own first: its seqs here start at i+1.
        let mut b = FanoutBench::new(4, 8, how);
        b.deliver();
        b.deliver();
        let got = b.drain_messages();
        assert_eq!(got.len(), 4);
        let mut first: Option<Vec<Vec<u8>>> = None;
        for (i, msgs) in got.iter().enumerate() {
            let records: Vec<&[u8]> = match how {
                BenchResults::V2Frames => msgs
                    .iter()
                    .flat_map(|m| split_results(m).expect("a results frame"))
                    .collect(),
                _ => msgs.iter().map(|m| &m[..]).collect(),
            };
            assert_eq!(records.len(), 16, "{how:?} subscriber {i}");
            let mut payloads = Vec::new();
            for (j, r) in records.iter().enumerate() {
                let d = decode_result(r).expect("a result");
                let (payload, seq) = without_seq(r);
                assert_eq!(seq, (i + 1 + j) as u64, "{how:?} subscriber {i} result {j}");
                let want_sseq = if how == BenchResults::V1 {
                    0
                } else {
                    j as u64 + 1
                };
                assert_eq!(d.stream_seq, want_sseq);
                assert!(!d.replayed);
                assert_eq!(d.key, format!("frame-{:06}", j % 8));
                payloads.push(payload);
            }
            match &first {
                None => first = Some(payloads),
                Some(f) => assert_eq!(f, &payloads, "{how:?} subscriber {i}"),
            }
        }
    }
}

#[test]
fn json_subscribers_get_the_same_results_each_with_its_own_seqs() {
    let mut b = FanoutBench::new(3, 4, BenchResults::Json);
    b.deliver();
    let got = b.drain_messages();
    let mut first: Option<Vec<serde_json::Value>> = None;
    for (i, msgs) in got.iter().enumerate() {
        let mut vals = Vec::new();
        for (j, m) in msgs.iter().enumerate() {
            let mut v: serde_json::Value = serde_json::from_slice(m).expect("JSON");
            assert_eq!(v["seq"], (i + 1 + j) as u64);
            assert_eq!(v["stream_seq"], j as u64 + 1);
            v["seq"] = 0.into();
            vals.push(v);
        }
        assert_eq!(vals.len(), 4);
        match &first {
            None => first = Some(vals),
            Some(f) => assert_eq!(f, &vals),
        }
    }
}
