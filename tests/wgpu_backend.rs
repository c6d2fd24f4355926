//! The agreement suite on the wgpu backend (lavapipe in CI), plus wgpu-specific cases: sizes that
//! do not divide the GEMM tile, both tile shapes, batches split into chunks, f16 kept in f16 on
//! the device, masks, and the fallback when no Vulkan driver is installed.
//!
//! Without an adapter the device tests are skipped with a printed reason, unless
//! `FUSION_REQUIRE_WGPU=1` (CI) makes that a failure.
#![cfg(feature = "wgpu")]

mod common;
mod wgpu_util;

use std::process::Command;
use std::sync::Arc;

use fusion_engine::backend::wgpu::Tile;
use fusion_engine::backend::Backend;
use fusion_engine::batch::Outputs;
use fusion_engine::model::FusionHead;
use fusion_engine::reference::{reference, rel_error};
use fusion_engine::selftest::MaskMode;
use fusion_engine::tensor::DType;
use fusion_engine::AnyBackend;
use wgpu_util::{open_raw, run};

fn open_wgpu() -> Option<AnyBackend> {
    let mut b = open_raw()?;
    let head = Arc::new(FusionHead::random(&[("x".into(), 4)], 4, 1e-5, 0));
    b.upload(head).expect("upload");
    Some(AnyBackend::Wgpu(b))
}

backend_suite!(open_wgpu());

#[test]
fn sizes_not_dividing_the_tile_on_both_tiles() {
    let Some(b) = open_raw() else { return };
    let mut b = AnyBackend::Wgpu(b);
    let seed = common::seed();
    let shapes: &[(&[usize], usize, usize)] = &[
        (&[1], 1, 1),
        (&[3, 17], 7, 5),
        (&[65, 1, 130], 65, 63),
        (&[129, 31], 129, 65),
        (&[17, 200], 257, 129),
        (&[15], 300, 2),
    ];
    for tile in [Tile::Small, Tile::Large] {
        if let AnyBackend::Wgpu(w) = &mut b {
            w.set_tile(Some(tile));
        }
        for (i, (widths, dim, rows)) in shapes.iter().enumerate() {
            let s = seed.wrapping_add(i as u64);
            common::agree(&mut b, widths, *dim, *rows, DType::F32, MaskMode::Random, s);
        }
    }
}

#[test]
fn large_tile_is_chosen_for_big_batches() {
    // 600 rows x D = 256 picks the 128 x 128 tile on its own.
    let Some(b) = open_raw() else { return };
    let mut b = AnyBackend::Wgpu(b);
    common::agree(
        &mut b,
        &[40, 9],
        256,
        600,
        DType::F32,
        MaskMode::Random,
        common::seed(),
    );
}

#[test]
fn split_batches_match_unsplit_bit_for_bit() {
    let Some(mut b) = open_raw() else { return };
    b.set_tile(Some(Tile::Small));
    let seed = common::seed();
    let (head, batch) = common::setup(&[33, 70, 5], 48, 101, DType::F32, MaskMode::Random, seed);
    let whole = run(&mut b, &head, &batch);
    for cap in [1usize, 7, 64, 100] {
        b.set_max_chunk_rows(cap);
        let split = run(&mut b, &head, &batch);
        assert_eq!(split, whole, "chunks of {cap} rows differ from one chunk");
    }
    let r = reference(&head, &batch.view());
    assert!(rel_error(&whole.fused, &r.fused) < 1e-4);
    assert!(rel_error(&whole.weights, &r.weights) < 1e-4);
    // Through the suite's checks too, with the default tile choice.
    b.set_tile(None);
    b.set_max_chunk_rows(13);
    let mut any = AnyBackend::Wgpu(b);
    common::agree(
        &mut any,
        &[20, 9],
        24,
        77,
        DType::BF16,
        MaskMode::Random,
        seed,
    );
}

#[test]
fn f16_inputs_stay_f16_on_the_device() {
    let Some(mut b) = open_raw() else { return };
    if !b.f16_storage() {
        eprintln!("adapter has no SHADER_F16: only the host-widened path is tested");
    }
    let seed = common::seed();
    let (head, batch) = common::setup(&[300, 45, 7], 96, 50, DType::F16, MaskMode::Random, seed);
    let dev = run(&mut b, &head, &batch);
    b.set_f16_storage(false);
    assert!(!b.f16_storage());
    let host = run(&mut b, &head, &batch);
    let r = reference(&head, &batch.view());
    for (name, out) in [("f16 storage", &dev), ("host widened", &host)] {
        let fe = rel_error(&out.fused, &r.fused);
        let we = rel_error(&out.weights, &r.weights);
        // The inputs are exact in f32 on both paths, so both are as good as f32.
        assert!(
            fe < 1e-4 && we < 1e-4,
            "{name}: fused {fe:e} weights {we:e}"
        );
    }
    b.set_f16_storage(true);
    let mut any = AnyBackend::Wgpu(b);
    common::agree(&mut any, &[1, 2, 3], 5, 9, DType::F16, MaskMode::All, seed);
    common::agree(
        &mut any,
        &[1024, 128],
        64,
        33,
        DType::F16,
        MaskMode::Random,
        seed + 1,
    );
}

#[test]
fn every_mask_pattern() {
    let Some(b) = open_raw() else { return };
    let mut b = AnyBackend::Wgpu(b);
    let seed = common::seed();
    let widths = [21, 8, 40, 3];
    for (i, mask) in [
        MaskMode::All,
        MaskMode::Random,
        MaskMode::Only(0),
        MaskMode::Only(1),
        MaskMode::Only(2),
        MaskMode::Only(3),
    ]
    .into_iter()
    .enumerate()
    {
        common::agree(&mut b, &widths, 33, 19, DType::F32, mask, seed + i as u64);
    }
}

#[test]
fn projections_only_runs_and_results_stay_right_after() {
    let Some(mut b) = open_raw() else { return };
    let seed = common::seed();
    let (head, batch) = common::setup(&[64, 16], 32, 40, DType::F32, MaskMode::All, seed);
    let before = run(&mut b, &head, &batch);
    assert!(b.run_projections_only(&batch.view()).expect("projections"));
    let mut after = Outputs::zeros(&head, batch.rows);
    b.run(&batch.view(), after.as_mut()).expect("run");
    assert_eq!(before, after);
}

/// A long-lived process reopens its device (an engine restarting a worker): 24 opens in one
/// process, each running right. On NVIDIA's driver a fresh wgpu instance per open stopped
/// finding the GPU after about 14 (docs/PERF.md, sessions 5 and 6); the instance is now shared.
#[test]
fn many_reopens_in_one_process_keep_working() {
    let seed = common::seed();
    let (head, batch) = common::setup(&[24, 8], 16, 9, DType::F32, MaskMode::All, seed);
    let want = reference(&head, &batch.view());
    for i in 0..24 {
        let Some(mut b) = open_raw() else { return };
        let out = run(&mut b, &head, &batch);
        let err = rel_error(&out.fused, &want.fused);
        assert!(err < 1e-4, "open {i}: fused rel error {err}");
        drop(b);
    }
}

// ---- No Vulkan driver: the CLI degrades cleanly. ----

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
        .args(args)
        .env("VK_DRIVER_FILES", "/nonexistent")
        .env("VK_ICD_FILENAMES", "/nonexistent")
        .env("WGPU_BACKEND", "vulkan")
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs")
}

#[test]
fn without_a_vulkan_driver_devices_says_why_and_auto_falls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = FusionHead::embedded();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(common::seed());
    let batch =
        fusion_engine::selftest::random_batch(&head, 3, DType::F32, MaskMode::All, &mut rng);
    let input = dir.path().join("in.safetensors");
    std::fs::write(
        &input,
        fusion_engine::io::write_input_bytes(&head, &batch, false).expect("serialise"),
    )
    .expect("write input");
    let input = input.to_str().expect("utf-8 path");

    let out = cli(&["devices"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "devices failed: {out:?}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("wgpu"))
        .unwrap_or_else(|| panic!("no wgpu line in:\n{stdout}"));
    assert!(
        line.contains("unavailable") && line.contains("no wgpu adapter found"),
        "{line}"
    );
    assert!(line.contains("VK_DRIVER_FILES=/nonexistent"), "{line}");
    assert!(stdout.lines().any(|l| l.starts_with("cpu:0")), "{stdout}");

    let wgpu_out = dir.path().join("wgpu.safetensors");
    let out = cli(&[
        "fuse",
        "--backend",
        "wgpu",
        "--input",
        input,
        "--output",
        wgpu_out.to_str().expect("utf-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "fuse --backend wgpu succeeded without a driver"
    );
    assert!(
        stderr.contains("backend wgpu unavailable") && stderr.contains("no wgpu adapter found"),
        "{stderr}"
    );
    assert!(!wgpu_out.exists(), "an output was written on error");

    let auto_out = dir.path().join("auto.safetensors");
    let out = cli(&[
        "fuse",
        "--backend",
        "auto",
        "--input",
        input,
        "--output",
        auto_out.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "fuse --backend auto failed: {out:?}");
    assert!(auto_out.exists());
    // Without Vulkan, `auto` takes the next backend: CUDA where a GPU is (seen on the H200
    // host), else the CPU; never wgpu.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        (stderr.contains("on cpu:0") || stderr.contains("on cuda:")) && !stderr.contains("wgpu:"),
        "{stderr}"
    );
}

/// `fuse --backend wgpu` on a model file and inputs it has never seen, f32 and f16.
#[test]
fn fuse_cli_on_wgpu_matches_reference() {
    if open_raw().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = common::seed();
    let cases = [
        (DType::F32, DType::F32, 1e-4),
        (DType::F16, DType::F16, 1e-2),
        (DType::BF16, DType::F32, 1e-2),
    ];
    for (i, (wdt, xdt, tol)) in cases.into_iter().enumerate() {
        let dims = [("rgb".to_string(), 77), ("txt".to_string(), 130)];
        let head = FusionHead::random(&dims, 72, 1e-5, seed.wrapping_add(i as u64));
        let model = dir.path().join(format!("model{i}.safetensors"));
        std::fs::write(&model, head.to_safetensors(wdt).expect("model bytes")).expect("write");
        // The head exactly as the binary will load it (weights rounded to their stored dtype).
        let head = FusionHead::load(&model).expect("load model");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ i as u64);
        let batch =
            fusion_engine::selftest::random_batch(&head, 45, xdt, MaskMode::Random, &mut rng);
        let input = dir.path().join(format!("in{i}.safetensors"));
        let output = dir.path().join(format!("out{i}.safetensors"));
        std::fs::write(
            &input,
            fusion_engine::io::write_input_bytes(&head, &batch, true).expect("input bytes"),
        )
        .expect("write");
        let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();
        let o = Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
            .args(["fuse", "--backend", "wgpu", "--model", &path(&model)])
            .args(["--input", &path(&input), "--output", &path(&output)])
            .output()
            .expect("the binary runs");
        assert!(
            o.status.success(),
            "fuse failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let bytes = std::fs::read(&output).expect("output written");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid output");
        let get = |name: &str| {
            let t = st.tensor(name).expect("tensor present");
            let mut v = vec![0f32; t.data().len() / 4];
            fusion_engine::tensor::bytes_to_f32(DType::F32, t.data(), &mut v);
            v
        };
        let r = reference(&head, &batch.view());
        let fe = rel_error(&get("fused"), &r.fused);
        let we = rel_error(&get("weights"), &r.weights);
        assert!(
            fe <= tol && we <= tol,
            "weights {wdt}, inputs {xdt}: fused {fe:e} weights {we:e}"
        );
    }
}
