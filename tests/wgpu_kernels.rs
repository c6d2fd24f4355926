//! The wgpu kernels one by one (issue 19): every kernel variant and tile shape at every tile
//! edge, chunked and masked, against the float64 reference; the staging ring (no buffers
//! created in steady state), GPU timestamps, and naga validation of every shader variant.
//!
//! Without an adapter the device tests are skipped with a printed reason, unless
//! `FUSION_REQUIRE_WGPU=1` (CI) makes that a failure.
#![cfg(feature = "wgpu")]

mod common;
mod wgpu_util;

use std::process::Command;
use std::sync::Arc;

use fusion_engine::backend::wgpu::{shader_sources, KernelChoice, Path, Tile, WgpuBackend};
use fusion_engine::backend::Backend;
use fusion_engine::batch::Outputs;
use fusion_engine::model::FusionHead;
use fusion_engine::reference::{reference, rel_error};
use fusion_engine::selftest::MaskMode;
use fusion_engine::tensor::DType;
use wgpu_util::{open_raw, run};

/// Runs `batch` on `b` and checks it against the f64 reference within `tol`.
fn check(
    b: &mut WgpuBackend,
    head: &Arc<FusionHead>,
    batch: &fusion_engine::Batch,
    tol: f64,
    what: &str,
) {
    let out = run(b, head, batch);
    let r = reference(head, &batch.view());
    let fe = rel_error(&out.fused, &r.fused);
    let we = rel_error(&out.weights, &r.weights);
    assert!(
        fe <= tol && we <= tol,
        "{what}: fused {fe:e} weights {we:e} (tolerance {tol:e})"
    );
}

/// The tolerance of a path: f32 weights keep the f32 tolerance of docs/DESIGN.md 2.4 for f32
/// inputs, the f16 paths (f16 weights and inputs) 1e-2.
fn tol(path: Path, dt: DType) -> f64 {
    match (path, dt) {
        (Path::TiledF32, DType::F32) => 1e-4,
        _ => 1e-2,
    }
}

/// Every kernel path the adapter runs (f32 tiled, f16 tiled, coop-matrix) x every tile shape,
/// at sizes on each side of every tile edge (B, d_m and D = 1, tile - 1, tile + 1; K across the
/// 16-wide padding), with absent modalities, on fresh random inputs.
#[test]
fn every_kernel_and_tile_at_every_tile_edge() {
    let Some(mut b) = open_raw() else { return };
    let seed = common::seed();
    let shapes: &[(&[usize], usize, usize)] = &[
        (&[1], 1, 1),
        (&[15, 17, 1], 63, 65),
        (&[16, 33], 65, 63),
        (&[31, 8], 127, 129),
        (&[129, 3], 129, 127),
        (&[64, 65], 128, 130),
        (&[7, 300], 33, 257),
    ];
    let mut seen = Vec::new();
    for choice in [KernelChoice::F32, KernelChoice::F16, KernelChoice::Coop] {
        let path = b.set_kernel(choice);
        if seen.contains(&path) {
            eprintln!(
                "{choice:?} falls back to {path:?} here: {:?}",
                b.fallback_reason()
            );
            continue;
        }
        seen.push(path);
        let tiles: &[Option<Tile>] = if path == Path::Coop {
            &[None]
        } else {
            &[Some(Tile::Small), Some(Tile::Large)]
        };
        for &tile in tiles {
            b.set_tile(tile);
            for (i, (widths, dim, rows)) in shapes.iter().enumerate() {
                for dt in [DType::F32, DType::F16] {
                    let s = seed.wrapping_add(i as u64 * 2 + dt.size() as u64);
                    let (head, batch) = common::setup(widths, *dim, *rows, dt, MaskMode::Random, s);
                    let what = format!("{path:?} {tile:?} {dt} widths {widths:?} D {dim} B {rows}");
                    check(&mut b, &head, &batch, tol(path, dt), &what);
                }
            }
        }
    }
    b.set_kernel(KernelChoice::Auto);
    assert_eq!(b.path(), Path::TiledF32);
}

/// Chunked batches and every mask pattern on each path: chunks of 1, 7 and 64 rows through the
/// three-slot staging ring give the same results as one chunk, bit for bit.
#[test]
fn every_kernel_chunked_and_masked() {
    let Some(mut b) = open_raw() else { return };
    let seed = common::seed();
    for choice in [KernelChoice::F32, KernelChoice::F16, KernelChoice::Coop] {
        let path = b.set_kernel(choice);
        let (head, batch) =
            common::setup(&[33, 70, 5], 48, 101, DType::F32, MaskMode::Random, seed);
        b.set_max_chunk_rows(usize::MAX);
        let whole = run(&mut b, &head, &batch);
        for cap in [1usize, 7, 64] {
            b.set_max_chunk_rows(cap);
            let split = run(&mut b, &head, &batch);
            assert_eq!(
                split, whole,
                "{path:?}: chunks of {cap} rows differ from one chunk"
            );
        }
        check(
            &mut b,
            &head,
            &batch,
            tol(path, DType::F32),
            &format!("{path:?} chunked"),
        );
        b.set_max_chunk_rows(5);
        for (i, mask) in [MaskMode::All, MaskMode::Only(0), MaskMode::Only(2)]
            .into_iter()
            .enumerate()
        {
            let (head, batch) =
                common::setup(&[21, 8, 40], 33, 19, DType::F16, mask, seed + i as u64);
            check(
                &mut b,
                &head,
                &batch,
                tol(path, DType::F16),
                &format!("{path:?} {mask:?}"),
            );
        }
        b.set_max_chunk_rows(usize::MAX);
    }
}

/// Steady state creates no buffer: after the first batch of a size, further batches (whole
/// or chunked through the ring, any path) create no buffer or query set.
#[test]
fn steady_state_creates_no_buffers() {
    let Some(mut b) = open_raw() else { return };
    let seed = common::seed();
    let (head, batch) = common::setup(&[40, 9], 64, 300, DType::F32, MaskMode::Random, seed);
    b.set_max_chunk_rows(64);
    let first = run(&mut b, &head, &batch);
    let created = b.buffers_created();
    assert!(created > 0);
    for _ in 0..4 {
        let mut out = Outputs::zeros(&head, batch.rows);
        b.run(&batch.view(), out.as_mut()).expect("run");
        assert_eq!(out, first);
        let small = batch.view().slice(0, 10);
        let mut out = Outputs::zeros(&head, 10);
        b.run(&small, out.as_mut()).expect("run");
        assert!(b.run_projections_only(&batch.view()).expect("projections"));
    }
    assert_eq!(
        b.buffers_created(),
        created,
        "a steady-state batch created buffers"
    );
}

/// With TIMESTAMP_QUERY (lavapipe has it) the whole-head runs report device times of the GEMM
/// and the epilogue passes, as `bench --backend wgpu` prints them.
#[test]
fn timestamps_time_the_gemm_and_the_epilogue() {
    let Some(mut b) = open_raw() else { return };
    let (head, batch) = common::setup(
        &[64, 32],
        64,
        200,
        DType::F32,
        MaskMode::All,
        common::seed(),
    );
    b.set_max_chunk_rows(64);
    let _ = run(&mut b, &head, &batch);
    let _ = b.take_run_stats();
    for _ in 0..3 {
        let mut out = Outputs::zeros(&head, batch.rows);
        b.run(&batch.view(), out.as_mut()).expect("run");
    }
    let stats = b.take_run_stats();
    if !b.timestamps() {
        assert!(stats.is_none());
        eprintln!("adapter has no TIMESTAMP_QUERY: no device times");
        return;
    }
    let s = stats.expect("stats with timestamps");
    assert_eq!(s.runs, 3);
    assert!(s.gemm_ms > 0.0 && s.epilogue_ms > 0.0, "{s:?}");
    assert!(s.host_stage_ms > 0.0 && s.host_wait_ms >= 0.0, "{s:?}");
    assert!(b.take_run_stats().is_none(), "stats are reset by take");
}

/// Every WGSL variant (tiled f32 / f16-input / f16, both tiles, the cooperative-matrix kernel,
/// the epilogue) passes naga's parser and validator, whatever the adapter supports.
#[test]
fn every_shader_variant_passes_naga_validation() {
    use wgpu::naga;
    let sources = shader_sources();
    assert!(sources.iter().any(|(l, _)| l.contains("coop")));
    for (label, src) in sources {
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(&src)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{label}: {}", e.emit_to_string(&src)));
    }
}

/// The `devices` line says which path and tile each wgpu adapter uses, following the
/// environment; a bad value is reported, not a crash.
#[test]
fn devices_line_names_the_path() {
    if open_raw().is_none() {
        return;
    }
    let line = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
            .arg("devices")
            .envs(env.iter().copied())
            .output()
            .expect("the binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        stdout
            .lines()
            .find(|l| l.starts_with("wgpu:"))
            .unwrap_or_else(|| panic!("no wgpu line in:\n{stdout}"))
            .to_string()
    };
    let l = line(&[]);
    assert!(
        l.contains("path tiled f32") && l.contains("64x64x16"),
        "{l}"
    );
    let l = line(&[("FUSION_WGPU_TILE", "large")]);
    assert!(l.contains("tile 128x128x8/8x8 (FUSION_WGPU_TILE)"), "{l}");
    let l = line(&[("FUSION_WGPU_KERNEL", "f16")]);
    assert!(
        l.contains("path tiled f16") || l.contains("no SHADER_F16"),
        "{l}"
    );
    let l = line(&[("FUSION_WGPU_KERNEL", "coop")]);
    assert!(
        l.contains("path coop-matrix f16") || l.contains("instead"),
        "{l}"
    );
    let l = line(&[("FUSION_WGPU_KERNEL", "fast")]);
    assert!(l.contains("invalid environment"), "{l}");
}
