//! The agreement suite on the CUDA backend (skipped, with the reason printed, where no GPU is
//! usable), plus the no-GPU behaviour of the CLI: `devices` names CUDA's reason, `fuse --backend
//! cuda` fails cleanly, and the NVRTC compile check of the kernels passes wherever libnvrtc is
//! found (required when FUSION_REQUIRE_NVRTC=1, as in CI).

mod common;

use std::process::Command;
use std::sync::Arc;

use fusion_engine::backend::{self, BackendKind, OpenOptions};
use fusion_engine::model::FusionHead;
use fusion_engine::selftest::{random_batch, MaskMode};
use fusion_engine::tensor::DType;
use rand::SeedableRng;

/// The first usable CUDA device, or None with the reason printed.
fn open_cuda() -> Option<fusion_engine::AnyBackend> {
    let entries = backend::discover_kind(BackendKind::Cuda);
    let Some(dev) = entries.iter().find_map(|e| e.device.clone()) else {
        let why: Vec<String> = entries
            .iter()
            .filter_map(|e| e.unavailable.clone())
            .collect();
        eprintln!("skipping: no usable CUDA device ({})", why.join("; "));
        return None;
    };
    let head = Arc::new(FusionHead::random(&[("x".into(), 4)], 4, 1e-5, 0));
    Some(
        backend::open(BackendKind::Cuda, dev.index, head, &OpenOptions::default())
            .expect("a discovered CUDA device opens"),
    )
}

backend_suite!(open_cuda());

fn gpu_present() -> bool {
    backend::discover_kind(BackendKind::Cuda)
        .iter()
        .any(|e| e.device.is_some())
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
}

/// `selftest --backend cuda` with `var=value`: whether it passed, and its stdout and stderr.
fn selftest_cuda(var: &str, value: &str) -> (bool, String) {
    let out = bin()
        .args(["selftest", "--backend", "cuda"])
        .env(var, value)
        .output()
        .expect("run selftest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `run_projections_only` is offered and agrees in shape handling with `run`.
#[test]
fn projections_only_is_offered() {
    use fusion_engine::Backend;
    let Some(mut b) = open_cuda() else { return };
    let (head, batch) = common::setup(&[64, 32], 48, 300, DType::F16, MaskMode::Random, 3);
    b.upload(head).expect("upload");
    assert!(b.run_projections_only(&batch.view()).expect("projections"));
}

/// A batch far larger than one chunk goes through the double-buffered pipeline intact.
#[test]
fn many_chunks() {
    let Some(mut b) = open_cuda() else { return };
    for (dt, seed) in [(DType::F32, 21u64), (DType::BF16, 22)] {
        common::agree(
            &mut b,
            &[1024, 768, 128],
            512,
            12_000, // f32: 92 MB of input, 3 chunks of <= 32 MiB; bf16: 2 chunks
            dt,
            MaskMode::Random,
            seed,
        );
    }
}

#[test]
fn devices_names_cuda_or_its_reason() {
    let out = bin().arg("devices").output().expect("run devices");
    assert!(out.status.success(), "devices failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let cuda: Vec<&str> = text.lines().filter(|l| l.starts_with("cuda")).collect();
    assert!(!cuda.is_empty(), "no cuda line in:\n{text}");
    if gpu_present() {
        assert!(cuda.iter().any(|l| l.starts_with("cuda:0")), "{text}");
    } else {
        let line = cuda[0];
        let reason = line
            .split("unavailable:")
            .nth(1)
            .map(str::trim)
            .unwrap_or("");
        assert!(!reason.is_empty(), "cuda line without a reason: {line}");
        eprintln!("devices says: {line}");
    }
}

#[test]
fn fuse_on_cuda_without_gpu_fails_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = FusionHead::embedded();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let batch = random_batch(&head, 8, DType::F32, MaskMode::Random, &mut rng);
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let bytes = fusion_engine::io::write_input_bytes(&head, &batch, true).expect("serialise");
    std::fs::write(&input, bytes).expect("write input");
    let out = bin()
        .args(["fuse", "--backend", "cuda", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .expect("run fuse");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if gpu_present() {
        assert!(out.status.success(), "fuse on a GPU failed: {stderr}");
        assert!(output.exists());
        return;
    }
    assert!(
        !out.status.success(),
        "fuse --backend cuda succeeded without a GPU"
    );
    assert!(
        stderr.contains("error: backend cuda unavailable:"),
        "unclear message: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!output.exists(), "an output was written on error");
}

#[test]
fn kernels_compile_with_nvrtc() {
    let out = bin()
        .args(["selftest", "--backend", "cuda", "--compile-only"])
        .output()
        .expect("run selftest --compile-only");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let required = std::env::var("FUSION_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    if !out.status.success() && stderr.contains("libnvrtc.so not found") && !required {
        eprintln!("skipping: {}", stderr.trim());
        return;
    }
    assert!(
        out.status.success(),
        "compile check failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("fusion_epilogue_f32"), "{stdout}");
    assert!(stdout.contains("compute_90"), "{stdout}");
    eprintln!("{stdout}");
}

#[test]
fn compile_only_rejects_other_backends_and_bad_include() {
    let out = bin()
        .args(["selftest", "--backend", "cpu", "--compile-only"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--backend cuda"));
    let out = bin()
        .args([
            "selftest",
            "--backend",
            "cuda",
            "--compile-only",
            "--include",
            "/nonexistent/dir",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a folder"));
}

/// Non-finite values are caught on the device (NaN attention weights), not by a host scan: a
/// finite input whose projection overflows f32 is refused as an overflow, like on the CPU.
#[test]
fn projection_overflow_is_an_error_not_a_non_finite_result() {
    use fusion_engine::Backend;
    let Some(mut b) = open_cuda() else { return };
    let (head, mut batch) = common::setup(&[16, 8], 12, 6, DType::F32, MaskMode::All, 3);
    b.upload(head.clone()).expect("upload");
    let mut v = vec![0f32; 6 * 16];
    fusion_engine::tensor::bytes_to_f32(DType::F32, &batch.inputs[0].bytes, &mut v);
    v[4 * 16..5 * 16].fill(3e38);
    batch.inputs[0] = fusion_engine::tensor::HostMat::from_f32(6, 16, &v);
    let mut out = fusion_engine::Outputs::zeros(&head, 6);
    match b.run(&batch.view(), out.as_mut()) {
        Err(fusion_engine::Error::InputOverflow { row: 4 }) => {}
        other => panic!("expected InputOverflow at row 4, got {other:?}"),
    }
}

/// A NaN deep inside a batch of many chunks is reported with its modality, row and column;
/// the same batch without it agrees with the reference afterwards.
#[test]
fn non_finite_found_in_a_later_chunk() {
    use fusion_engine::Backend;
    let Some(mut b) = open_cuda() else { return };
    let rows = 20_000;
    let (head, batch) = common::setup(&[300, 200], 64, rows, DType::F32, MaskMode::All, 11);
    b.upload(head.clone()).expect("upload");
    let mut bad = batch.clone();
    let mut v = vec![0f32; rows * 200];
    fusion_engine::tensor::bytes_to_f32(DType::F32, &bad.inputs[1].bytes, &mut v);
    v[17_123 * 200 + 77] = f32::NAN;
    bad.inputs[1] = fusion_engine::tensor::HostMat::from_f32(rows, 200, &v);
    let mut out = fusion_engine::Outputs::zeros(&head, rows);
    match b.run(&bad.view(), out.as_mut()) {
        Err(fusion_engine::Error::InputNonFinite { name, row, col }) => {
            assert_eq!((name.as_str(), row, col), ("m1", 17_123, 77))
        }
        other => panic!("expected InputNonFinite at m1 row 17123, got {other:?}"),
    }
    b.run(&batch.view(), out.as_mut()).expect("clean batch");
    let r = fusion_engine::reference::reference(&head, &batch.view());
    assert!(fusion_engine::reference::rel_error(&out.fused, &r.fused) < 1e-4);
}

/// The opt-in warp-per-row epilogues (`FUSION_CUDA_EPILOGUE=warp`, one element a load, and
/// `vec`, 16 bytes a load) pass the whole selftest (every case against the float64 reference) on
/// a GPU, and are the kernels that ran (bench's `epilogue_kernel` on the default head, D = 512);
/// skipped without one.
#[test]
fn warp_per_row_epilogues_pass_selftest() {
    if !gpu_present() {
        eprintln!("skipping: no usable CUDA device");
        return;
    }
    for (kind, prefix) in [
        ("warp", "fusion_epilogue_warp16_"),
        ("vec", "fusion_epilogue_vec16_"),
    ] {
        let (ok, text) = selftest_cuda("FUSION_CUDA_EPILOGUE", kind);
        assert!(ok, "{kind}: {text}");
        for dtype in ["f32", "f16"] {
            let out = bin()
                .args([
                    "bench",
                    "--backend",
                    "cuda",
                    "--batch",
                    "256",
                    "--iters",
                    "2",
                ])
                .args(["--dtype", dtype, "--json"])
                .env("FUSION_CUDA_EPILOGUE", kind)
                .output()
                .expect("run bench");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let want = format!("\"epilogue_kernel\":\"{prefix}{dtype}\"");
            assert!(
                out.status.success() && stdout.contains(&want),
                "{kind}, {dtype}: no {want} in\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Half inputs get half projections, f32 inputs f32 ones (docs/DESIGN.md section 2.5), and both
/// agree with the reference; skipped without a GPU. (`FUSION_CUDA_H` is not set by the tests.)
#[test]
fn half_h_is_chosen_by_input_dtype() {
    use fusion_engine::Backend;
    let Some(mut b) = open_cuda() else { return };
    if std::env::var("FUSION_CUDA_H").is_ok() {
        eprintln!("skipping: FUSION_CUDA_H is set");
        return;
    }
    for (dtype, half, tol) in [
        (DType::F32, 0, 1e-4),
        (DType::F16, 1, 1e-2),
        (DType::BF16, 1, 1e-2),
    ] {
        let (head, batch) = common::setup(&[96, 40], 80, 300, dtype, MaskMode::Random, 5);
        b.upload(head.clone()).expect("upload");
        let _ = b.take_run_stats();
        let mut out = fusion_engine::Outputs::zeros(&head, 300);
        b.run(&batch.view(), out.as_mut()).expect("run");
        let st = b.take_run_stats().expect("cuda keeps run stats");
        assert_eq!(
            (st.runs, st.half_h_runs, st.h_f32_reruns),
            (1, half, 0),
            "{dtype:?}"
        );
        let r = fusion_engine::reference::reference(&head, &batch.view());
        let (ef, ew) = (
            fusion_engine::reference::rel_error(&out.fused, &r.fused),
            fusion_engine::reference::rel_error(&out.weights, &r.weights),
        );
        assert!(
            ef <= tol && ew <= tol,
            "{dtype:?}: fused {ef:e} weights {ew:e}"
        );
    }
}

/// f16 inputs whose projection exceeds f16's 65504 (finite in f32): the half-h run sees the
/// overflow (NaN weights on the device), the batch is recomputed with f32 h, and the result
/// agrees with the reference; skipped without a GPU.
#[test]
fn half_h_overflow_is_recomputed_in_f32() {
    use fusion_engine::Backend;
    let Some(mut b) = open_cuda() else { return };
    if std::env::var("FUSION_CUDA_H").is_ok() {
        eprintln!("skipping: FUSION_CUDA_H is set");
        return;
    }
    let (rows, k) = (6, 16);
    let (head, mut batch) = common::setup(&[k, 8], 12, rows, DType::F16, MaskMode::All, 3);
    // Row 4 of m0: 60000 * sign(W[0, c]), so h[0] = 60000 * sum |W[0, c]| (about 1.2e5).
    let mut v = vec![0f32; rows * k];
    fusion_engine::tensor::bytes_to_f32(DType::F16, &batch.inputs[0].bytes, &mut v);
    for c in 0..k {
        v[4 * k + c] = 60000f32.copysign(head.proj_weight[0][c]);
    }
    let h0: f32 = (0..k).map(|c| head.proj_weight[0][c] * v[4 * k + c]).sum();
    assert!(
        h0 > 70000.0,
        "the test's projection must overflow f16: {h0}"
    );
    batch.inputs[0] = fusion_engine::tensor::HostMat::from_f32_as(DType::F16, rows, k, &v);
    b.upload(head.clone()).expect("upload");
    let _ = b.take_run_stats();
    let mut out = fusion_engine::Outputs::zeros(&head, rows);
    b.run(&batch.view(), out.as_mut())
        .expect("recomputed with f32 h");
    let st = b.take_run_stats().expect("cuda keeps run stats");
    assert_eq!((st.runs, st.half_h_runs, st.h_f32_reruns), (2, 1, 1));
    let r = fusion_engine::reference::reference(&head, &batch.view());
    let (ef, ew) = (
        fusion_engine::reference::rel_error(&out.fused, &r.fused),
        fusion_engine::reference::rel_error(&out.weights, &r.weights),
    );
    assert!(ef <= 1e-2 && ew <= 1e-2, "fused {ef:e} weights {ew:e}");
    // A NaN input is still named after the rerun.
    let mut bad = batch.clone();
    v[2 * k + 5] = f32::NAN;
    bad.inputs[0] = fusion_engine::tensor::HostMat::from_f32_as(DType::F16, rows, k, &v);
    match b.run(&bad.view(), out.as_mut()) {
        Err(fusion_engine::Error::InputNonFinite { name, row, col }) => {
            assert_eq!((name.as_str(), row, col), ("m0", 2, 5))
        }
        other => panic!("expected InputNonFinite at m0 row 2 col 5, got {other:?}"),
    }
}

/// The f32-h path for half inputs (`FUSION_CUDA_H=f32`, kept for comparison) passes the whole
/// selftest, and a wrong value is a clear error; skipped without a GPU.
#[test]
fn half_h_forced_f32_passes_selftest() {
    if !gpu_present() {
        eprintln!("skipping: no usable CUDA device");
        return;
    }
    let (ok, text) = selftest_cuda("FUSION_CUDA_H", "f32");
    assert!(ok, "{text}");
    let (ok, text) = selftest_cuda("FUSION_CUDA_H", "f8");
    assert!(!ok && text.contains("FUSION_CUDA_H=f8"), "{text}");
}
