//! Criterion bench of request/response through the server over loopback: the Rust client's
//! `fuse_batch` of B samples (embedded head, all three modalities, f32) against an in-process
//! server on the CPU device, with results one per frame or several to a frame
//! (`batch_results`, PROTOCOL 4.5). Client, server and device share this host's cores.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fusion_engine::client::Client;
use fusion_engine::engine::Priority;
use fusion_engine::model::FusionHead;
use fusion_engine::server::{start_with_head, ServerConfig};
use rand::{Rng, SeedableRng};

fn fuse_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let head = Arc::new(FusionHead::embedded());
    let cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().expect("an address"),
        ..ServerConfig::default()
    };
    let server = rt
        .block_on(start_with_head(cfg, Arc::clone(&head), None))
        .expect("the server starts");
    let url = format!("ws://{}/", server.local_addr());
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut g = c.benchmark_group("fuse_batch");
    g.sample_size(10);
    for b in [1024usize, 8192] {
        let feats: Vec<(String, Vec<f32>)> = head
            .modalities
            .iter()
            .map(|m| {
                let x = (0..b * m.width)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                (m.name.clone(), x)
            })
            .collect();
        let refs: Vec<(&str, &[f32])> = feats
            .iter()
            .map(|(n, x)| (n.as_str(), x.as_slice()))
            .collect();
        g.throughput(Throughput::Elements(b as u64));
        for (name, batch) in [("one_per_frame", false), ("results_frames", true)] {
            let mut client = rt
                .block_on(Client::connect_opts(&url, None, true, batch))
                .expect("a client");
            g.bench_with_input(BenchmarkId::new(name, b), &b, |bench, _| {
                bench.iter(|| {
                    rt.block_on(client.fuse_batch("bench", &refs, Priority::Important))
                        .expect("results")
                })
            });
            rt.block_on(client.close());
        }
    }
    g.finish();
    rt.block_on(server.shutdown());
}

criterion_group!(benches, fuse_batch);
criterion_main!(benches);
