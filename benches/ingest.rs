//! Criterion bench of the ingest check of one `samples` frame (docs/DESIGN.md section 4): the
//! connection's parse, names and widths, each block scanned for NaN/Inf and copied into a pooled
//! buffer (`copy`, as with CUDA) or kept in the frame (`in_frame`, CPU and wgpu engines), the
//! keys; 256 samples of the embedded head's modalities (7,680 B of f32, 3,840 B of f16 each).
//! docs/PERF.md has the numbers.
//!
//! `INGEST_ROUNDS=N` runs N rounds of each case (after 2 warm-up rounds) without criterion, for
//! `valgrind --tool=callgrind`, whose instruction counts do not depend on what else the host
//! runs; `INGEST_CASE=f16` runs that case alone.

use criterion::{BenchmarkId, Criterion, Throughput};
use fusion_engine::server::IngestBench;
use fusion_engine::tensor::DType;

const ROWS: usize = 256;

const CASES: [(&str, DType); 2] = [("f32", DType::F32), ("f16", DType::F16)];

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest_256");
    g.throughput(Throughput::Elements(ROWS as u64));
    for (name, dtype) in CASES {
        for (how, in_frame) in [("copy", false), ("in_frame", true)] {
            let mut b = IngestBench::new(ROWS, dtype).in_frame(in_frame);
            assert_eq!(b.run(), ROWS, "the bench frame is accepted");
            g.bench_function(BenchmarkId::new(format!("parse_check_{how}"), name), |x| {
                x.iter(|| b.run())
            });
        }
    }
    g.finish();
}

fn main() {
    if let Ok(n) = std::env::var("INGEST_ROUNDS") {
        let rounds: usize = n.parse().unwrap_or(0);
        let only = std::env::var("INGEST_CASE").ok();
        for (name, dtype) in CASES {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let mut b = IngestBench::new(ROWS, dtype);
            let mut rows = 0;
            for _ in 0..2 + rounds {
                rows += b.run();
            }
            assert_eq!(rows, (2 + rounds) * ROWS, "{name}: every frame accepted");
            println!("{name}: {rounds} rounds of {ROWS} samples");
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    ingest(&mut c);
    c.final_summary();
}
