//! Criterion benches of the whole fusion head and its projections alone, per backend and batch
//! size (B = 1, 64, 1024, 8192), embedded head shape, f32 inputs. GPU backends are included when
//! a hardware device is present; their `run` returns only after the outputs are on the host, so
//! timings are device-synchronised.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fusion_engine::backend::{self, Backend, BackendKind, OpenOptions};
use fusion_engine::batch::Outputs;
use fusion_engine::model::FusionHead;
use fusion_engine::selftest::{random_batch, MaskMode};
use fusion_engine::tensor::DType;
use rand::SeedableRng;

fn devices() -> Vec<fusion_engine::AnyBackend> {
    let head = Arc::new(FusionHead::embedded());
    let mut out = Vec::new();
    for e in backend::discover() {
        if let Some(d) = e.device {
            // Software adapters (lavapipe) are for correctness only: never benchmarked.
            if d.accelerator || d.kind == BackendKind::Cpu {
                match backend::open(d.kind, d.index, head.clone(), &OpenOptions::default()) {
                    Ok(b) => out.push(b),
                    Err(err) => eprintln!("skipping {}: {err}", d.id()),
                }
            }
        } else if let Some(r) = e.unavailable {
            eprintln!("skipping {}: {r}", e.kind);
        }
    }
    out
}

fn bench_head(c: &mut Criterion) {
    let head = FusionHead::embedded();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for mut be in devices() {
        let name = be.info().kind.name();
        let mut g = c.benchmark_group(format!("head/{name}"));
        g.sample_size(10);
        for rows in [1usize, 64, 1024, 8192] {
            let batch = random_batch(&head, rows, DType::F32, MaskMode::All, &mut rng);
            let mut out = Outputs::zeros(&head, rows);
            g.throughput(Throughput::Elements(rows as u64));
            g.bench_with_input(BenchmarkId::new("whole", rows), &rows, |b, _| {
                b.iter(|| {
                    be.run(&batch.view(), out.as_mut())
                        .map_err(|e| e.to_string())
                })
            });
            g.bench_with_input(BenchmarkId::new("projections", rows), &rows, |b, _| {
                b.iter(|| {
                    be.run_projections_only(&batch.view())
                        .map_err(|e| e.to_string())
                })
            });
        }
        g.finish();
    }
}

/// The host's input check that the wgpu backend and `fuse` run before a batch (shapes, mask,
/// NaN/Inf in every present value), embedded head, B = 8192.
fn bench_validate(c: &mut Criterion) {
    let head = FusionHead::embedded();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut g = c.benchmark_group("validate");
    g.sample_size(20);
    for dtype in [DType::F32, DType::F16] {
        let rows = 8192;
        let batch = random_batch(&head, rows, dtype, MaskMode::All, &mut rng);
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(BenchmarkId::new(dtype.to_string(), rows), &rows, |b, _| {
            b.iter(|| batch.view().validate(&head).map_err(|e| e.to_string()))
        });
    }
    g.finish();
}

/// The ingest path's copy + NaN/Inf scan of one `samples` frame block (docs/DESIGN.md section
/// 4.1): 256 rows of the embedded head's vision width, f32 and f16, into a reused buffer.
fn bench_copy_finite(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy_finite");
    for dtype in [DType::F32, DType::F16] {
        let n = 256 * 1024;
        let src: Vec<u8> = (0..n * dtype.size()).map(|i| (i % 61) as u8).collect();
        let mut dst = Vec::with_capacity(src.len());
        g.throughput(Throughput::Bytes(src.len() as u64));
        g.bench_with_input(BenchmarkId::new(dtype.to_string(), n), &n, |b, _| {
            b.iter(|| {
                dst.clear();
                fusion_engine::tensor::copy_finite(dtype, &src, &mut dst)
            })
        });
        g.bench_with_input(BenchmarkId::new(format!("scan-{dtype}"), n), &n, |b, _| {
            b.iter(|| fusion_engine::tensor::find_non_finite_bytes(dtype, &src))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_head, bench_validate, bench_copy_finite);
criterion_main!(benches);
