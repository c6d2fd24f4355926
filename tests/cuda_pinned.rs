//! CUDA uploads straight from page-locked batch memory (docs/DESIGN.md section 6.7): on a GPU,
//! matrices in locked memory are copied directly (the run's `h2d_direct_bytes` says how much)
//! and the results still agree with the reference, chunk by chunk, with some matrices direct and
//! others staged; results are written straight into locked outputs (`d2h_direct_bytes`), with
//! `fused` and `weights` decided apart; the engine's recycled (locked) input and output buffers
//! agree too; `bench --pinned` reports the direct paths. Without a GPU, the tests that need one are skipped with the reason printed,
//! and `bench --backend cuda --pinned` fails cleanly.

mod common;

use std::process::Command;

use fusion_engine::backend::host_lock::{registry, HostPageLock};
use fusion_engine::backend::{self, BackendKind, OpenOptions};
use fusion_engine::batch::{Batch, Outputs};
use fusion_engine::engine::{DeviceSpec, Engine, EngineConfig, Priority};
use fusion_engine::reference::{reference, rel_error};
use fusion_engine::selftest::MaskMode;
use fusion_engine::tensor::{DType, HostMat};
use fusion_engine::Backend;

/// Whether a CUDA device is usable; if not, prints `what` with the reason.
fn gpu_present(what: &str) -> bool {
    let entries = backend::discover_kind(BackendKind::Cuda);
    if entries.iter().any(|e| e.device.is_some()) {
        return true;
    }
    let why: Vec<String> = entries
        .iter()
        .filter_map(|e| e.unavailable.clone())
        .collect();
    eprintln!("{what}: no usable CUDA device ({})", why.join("; "));
    false
}

/// Locks `v` with `lock` and records it, for as long as this lives.
struct Locked<'a> {
    lock: &'a dyn HostPageLock,
    range: (usize, usize),
}

impl<'a> Locked<'a> {
    fn new(lock: &'a dyn HostPageLock, v: &[u8]) -> Locked<'a> {
        let range = (v.as_ptr() as usize, v.len());
        assert!(
            registry().insert(range.0, range.1),
            "range already recorded"
        );
        assert!(lock.lock(range.0, range.1), "cuMemHostRegister failed");
        Locked { lock, range }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        registry().remove(self.range.0);
        self.lock.unlock(self.range.0, self.range.1);
    }
}

/// A batch far larger than one chunk, with one matrix in locked memory and the others
/// pageable: that matrix is copied directly in every chunk, the results agree.
#[test]
fn a_locked_matrix_is_copied_directly_and_the_results_agree() {
    if !gpu_present("skipping") {
        return;
    }
    for (dt, seed) in [(DType::F32, 31u64), (DType::F16, 32)] {
        let rows = 12_000; // f32: 3 chunks, the last one partial
        let (head, batch) = common::setup(&[1024, 768, 128], 512, rows, dt, MaskMode::Random, seed);
        let mut b = backend::open(BackendKind::Cuda, 0, head.clone(), &OpenOptions::default())
            .expect("cuda opens");
        let lock = b.page_lock().expect("the cuda backend page-locks");
        let mut out = Outputs::zeros(&head, rows);
        let _ = b.take_run_stats();
        let direct = {
            let _held = Locked::new(&*lock, &batch.inputs[1].bytes);
            b.run(&batch.view(), out.as_mut()).expect("run");
            b.take_run_stats().expect("cuda keeps stats")
        };
        let want = reference(&head, &batch.view());
        let tol = if dt == DType::F32 { 1e-4 } else { 1e-2 };
        let (fe, we) = (
            rel_error(&out.fused, &want.fused),
            rel_error(&out.weights, &want.weights),
        );
        assert!(fe <= tol && we <= tol, "{dt}: fused {fe:e} weights {we:e}");
        // Each run copied exactly the locked matrix directly (a half overflow rerun would copy
        // it twice, in f32 staging the second time: not for these inputs).
        assert_eq!(direct.runs, 1, "{direct:?}");
        assert_eq!(
            direct.h2d_direct_bytes,
            batch.inputs[1].bytes.len() as u64,
            "{direct:?}"
        );
        // Unlocked again: everything staged.
        b.run(&batch.view(), out.as_mut()).expect("run");
        let staged = b.take_run_stats().expect("stats");
        assert_eq!(staged.h2d_direct_bytes, 0, "{staged:?}");
    }
}

/// A batch of several chunks with its outputs' `fused`, `weights`, both or neither in locked
/// memory: the locked regions are written directly (every row of them), the rest staged and
/// drained, and the results agree either way.
#[test]
fn locked_outputs_are_written_directly_and_the_results_agree() {
    if !gpu_present("skipping") {
        return;
    }
    let (rows, d, m) = (12_000, 512, 3);
    let (head, batch) = common::setup(&[1024, 768, 128], d, rows, DType::F32, MaskMode::Random, 33);
    let mut b = backend::open(BackendKind::Cuda, 0, head.clone(), &OpenOptions::default())
        .expect("cuda opens");
    let lock = b.page_lock().expect("the cuda backend page-locks");
    let want = reference(&head, &batch.view());
    let _ = b.take_run_stats();
    let (fb, wb) = ((rows * d * 4) as u64, (rows * m * 4) as u64);
    for (lock_fused, lock_weights) in [(true, false), (false, true), (true, true), (false, false)] {
        let mut out = Outputs::zeros(&head, rows);
        let stats = {
            let _f = lock_fused.then(|| Locked::new(&*lock, bytemuck::cast_slice(&out.fused)));
            let _w = lock_weights.then(|| Locked::new(&*lock, bytemuck::cast_slice(&out.weights)));
            b.run(&batch.view(), out.as_mut()).expect("run");
            b.take_run_stats().expect("cuda keeps stats")
        };
        let what = format!("fused locked {lock_fused}, weights locked {lock_weights}");
        let (fe, we) = (
            rel_error(&out.fused, &want.fused),
            rel_error(&out.weights, &want.weights),
        );
        assert!(
            fe <= 1e-4 && we <= 1e-4,
            "{what}: fused {fe:e} weights {we:e}"
        );
        let direct = if lock_fused { fb } else { 0 } + if lock_weights { wb } else { 0 };
        assert_eq!(stats.d2h_direct_bytes, direct, "{what}: {stats:?}");
        assert!(stats.d2h_bytes >= fb + wb, "{what}: {stats:?}");
    }
}

/// `src` copied into buffers from the engine's pool.
fn pooled(engine: &Engine, src: &Batch) -> Batch {
    let copy = |bytes: &[u8]| {
        let mut v = engine.batch_buffer(bytes.len());
        v.extend_from_slice(bytes);
        v
    };
    Batch {
        rows: src.rows,
        inputs: src
            .inputs
            .iter()
            .map(|m| HostMat {
                dtype: m.dtype,
                rows: m.rows,
                cols: m.cols,
                bytes: copy(&m.bytes).into(),
            })
            .collect(),
        mask: copy(&src.mask),
    }
}

/// Batches in the engine's buffers: the first ones in fresh (pageable) buffers, the later ones
/// in buffers the pool locked when they came back, their results in recycled outputs locked
/// the same way; every result agrees with the reference.
#[test]
fn engine_batches_in_recycled_locked_buffers_agree() {
    if !gpu_present("skipping") {
        return;
    }
    let (head, src) = common::setup(&[256, 128], 128, 4096, DType::F16, MaskMode::Random, 41);
    let engine = Engine::start(
        EngineConfig::with_devices(DeviceSpec::parse_list("cuda:0").expect("spec")),
        head.clone(),
    )
    .expect("engine starts");
    let want = reference(&head, &src.view());
    for round in 0..6 {
        let batch = pooled(&engine, &src);
        let locked = batch
            .inputs
            .iter()
            .filter(|m| registry().contains(m.bytes.as_ptr() as usize, m.bytes.len()))
            .count();
        eprintln!(
            "round {round}: {locked} of {} matrices locked",
            batch.inputs.len()
        );
        if round >= 2 {
            assert_eq!(locked, batch.inputs.len(), "recycled buffers are locked");
        }
        let r = engine
            .submit(batch, Priority::Important)
            .expect("submit")
            .wait()
            .expect("result");
        let fe = rel_error(&r.outputs.fused, &want.fused);
        assert!(fe <= 1e-2, "round {round}: fused {fe:e}");
        // Recycled outputs are locked on their first return (fused: 2 MiB; weights: 32 KiB,
        // under the lock threshold), so later results land in locked memory.
        let fused = &r.outputs.fused;
        let locked_out = registry().contains(fused.as_ptr() as usize, fused.len() * 4);
        if round >= 2 {
            assert!(
                locked_out,
                "round {round}: recycled fused output not locked"
            );
        }
        engine.recycle(r.outputs);
        // The buffers come back when the engine drops the batch, just after the result.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `bench --backend cuda --pinned`: without a driver a clean error (like the pageable bench);
/// on a GPU one JSON line per dtype saying the inputs were pinned and copied directly.
#[test]
fn bench_pinned_reports_direct_copies_or_fails_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
        .args([
            "bench",
            "--backend",
            "cuda",
            "--pinned",
            "--batch",
            "2048",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--dtype",
            "f16,f32",
            "--json",
        ])
        .output()
        .expect("run bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    if !gpu_present("checking the clean failure") {
        assert!(
            !out.status.success(),
            "bench --pinned succeeded without a GPU"
        );
        assert!(
            stderr.contains("error: backend cuda unavailable:"),
            "unclear message: {stderr}"
        );
        return;
    }
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["inputs"], "pinned", "{l}");
        let share = l["h2d_direct_share"].as_f64().expect("stage times");
        // Everything but the mask (2 bytes a row against KBs of matrices) goes direct.
        assert!(share > 0.95, "{l}");
        // Both outputs are locked: every result byte goes direct.
        let d2h = l["d2h_direct_share"].as_f64().expect("stage times");
        assert!((d2h - 1.0).abs() < 1e-12, "{l}");
    }
}
