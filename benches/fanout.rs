//! Criterion bench of the fan-out of one batch (docs/DESIGN.md section 5): 256 IMPORTANT
//! results of one stream to 1 and 4 subscribers, then those subscribers' queues drained as
//! their writers drain them (the messages made, not sent). docs/PERF.md has the numbers.
//!
//! `FANOUT_ROUNDS=N` runs N rounds of each case without criterion (for `valgrind
//! --tool=callgrind`, whose instruction counts do not depend on what else the host runs) and
//! prints the heap allocations per result of each case (a counting global allocator);
//! `FANOUT_CASE=v2:4` (name:subscribers) runs that case alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BenchmarkId, Criterion, Throughput};
use fusion_engine::server::{BenchResults, FanoutBench};

/// Counts allocations (and reallocations) of the whole process.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RESULTS: usize = 256;

const CASES: [(&str, BenchResults); 3] = [
    ("v2", BenchResults::V2),
    ("v2_frames", BenchResults::V2Frames),
    ("json", BenchResults::Json),
];

fn fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("fan_out_256");
    g.throughput(Throughput::Elements(RESULTS as u64));
    for (name, how) in CASES {
        for subs in [1usize, 4] {
            let mut b = FanoutBench::new(subs, RESULTS, how);
            g.bench_function(
                BenchmarkId::new(format!("{name}_deliver_drain"), subs),
                |x| {
                    x.iter(|| {
                        b.deliver();
                        b.drain()
                    })
                },
            );
        }
    }
    g.finish();
}

/// `rounds` rounds of every case (or of the one named `only`, e.g. `v2:4`) after two warm-up
/// rounds each; prints allocations per result.
fn fixed_rounds(rounds: u64, only: Option<&str>) {
    for (name, how) in CASES {
        for subs in [1usize, 4] {
            if only.is_some_and(|o| o != format!("{name}:{subs}")) {
                continue;
            }
            let mut b = FanoutBench::new(subs, RESULTS, how);
            for _ in 0..2 {
                b.deliver();
                b.drain();
            }
            let a0 = ALLOCS.load(Ordering::Relaxed);
            let mut bytes = 0;
            for _ in 0..rounds {
                b.deliver();
                bytes += b.drain();
            }
            let a = ALLOCS.load(Ordering::Relaxed) - a0;
            let per = a as f64 / (rounds.max(1) * RESULTS as u64) as f64;
            println!(
                "{name} subscribers={subs} rounds={rounds} bytes={bytes} allocs/result={per:.3}"
            );
        }
    }
}

fn main() {
    if let Some(n) = std::env::var("FANOUT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        fixed_rounds(n, std::env::var("FANOUT_CASE").ok().as_deref());
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    fan_out(&mut c);
    c.final_summary();
}
