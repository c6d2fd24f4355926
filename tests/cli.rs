//! The `fusion-engine` binary end to end on temp files: `fuse` results against the float64
//! reference on heads and inputs it has never seen, every input error (named tensor, row,
//! expectation, no output written), and `devices`, `selftest`, `bench`, and a short `loadgen`
//! run (JSON report + SVG).

use std::path::Path;
use std::process::{Command, Output};

use fusion_engine::batch::Batch;
use fusion_engine::io::write_input_bytes;
use fusion_engine::model::FusionHead;
use fusion_engine::reference::{reference, rel_error};
use fusion_engine::selftest::{random_batch, MaskMode};
use fusion_engine::tensor::serialize_raw;
use fusion_engine::tensor::{DType, HostMat};
use rand::SeedableRng;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fusion-engine"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(5)
}

/// Reads `fused` and `weights` from a result file.
fn read_output(path: &Path, rows: usize, dim: usize, m: usize) -> (Vec<f32>, Vec<f32>) {
    let bytes = std::fs::read(path).expect("output exists");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid output");
    let get = |name: &str, shape: [usize; 2]| {
        let t = st.tensor(name).expect("tensor present");
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        assert_eq!(t.shape(), shape);
        let mut v = vec![0f32; shape[0] * shape[1]];
        fusion_engine::tensor::bytes_to_f32(DType::F32, t.data(), &mut v);
        v
    };
    (get("fused", [rows, dim]), get("weights", [rows, m]))
}

fn fuse_and_check(
    head: &FusionHead,
    model: Option<&Path>,
    batch: &Batch,
    with_mask: bool,
    tol: f64,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    std::fs::write(
        &input,
        write_input_bytes(head, batch, with_mask).expect("input"),
    )
    .expect("write");
    let mut args = vec![
        "fuse",
        "--backend",
        "cpu",
        "--input",
        p(&input),
        "--output",
        p(&output),
    ];
    if let Some(m) = model {
        args.extend(["--model", p(m)]);
    }
    let o = run(&args);
    assert!(o.status.success(), "fuse failed: {}", stderr(&o));
    let (fused, weights) = read_output(&output, batch.rows, head.dim, head.num_modalities());
    let r = reference(head, &batch.view());
    let (fe, we) = (rel_error(&fused, &r.fused), rel_error(&weights, &r.weights));
    assert!(
        fe <= tol && we <= tol,
        "fused {fe:e} weights {we:e} tol {tol:e}"
    );
}

#[test]
fn fuse_embedded_head_matches_reference() {
    let head = FusionHead::embedded();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let batch = random_batch(&head, 37, DType::F32, MaskMode::All, &mut rng);
    fuse_and_check(&head, None, &batch, false, 1e-5);
}

#[test]
fn fuse_unseen_models_dtypes_and_masks() {
    let s = seed();
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            vec![
                ("a".to_string(), 33),
                ("b".to_string(), 130),
                ("c".to_string(), 7),
            ],
            45,
            0.3,
            DType::F32,
            DType::F32,
            19,
            1e-5,
        ),
        (
            vec![("img".to_string(), 200), ("txt".to_string(), 64)],
            96,
            1e-6,
            DType::F16,
            DType::F16,
            50,
            1e-2,
        ),
        (
            vec![("x".to_string(), 17)],
            9,
            1e-3,
            DType::BF16,
            DType::F32,
            3,
            1e-2,
        ),
        (
            vec![
                ("p".to_string(), 3),
                ("q".to_string(), 5),
                ("r".to_string(), 8),
                ("s".to_string(), 2),
            ],
            4,
            1e-5,
            DType::F32,
            DType::BF16,
            300,
            1e-2,
        ),
    ];
    for (i, (dims, d, eps, input_dt, weight_dt, rows, tol)) in cases.into_iter().enumerate() {
        let head = FusionHead::random(&dims, d, eps, s + i as u64).rounded_to(weight_dt);
        let model = dir.path().join(format!("m{i}.safetensors"));
        std::fs::write(&model, head.to_safetensors(weight_dt).expect("model")).expect("write");
        let mut rng = rand::rngs::StdRng::seed_from_u64(s ^ i as u64);
        let batch = random_batch(&head, rows, input_dt, MaskMode::Random, &mut rng);
        fuse_and_check(&head, Some(&model), &batch, true, tol);
    }
}

/// Runs `fuse` on a hand-made input file and returns stderr, asserting failure and no output.
fn fuse_fails(tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let bytes = serialize_raw(
        tensors
            .iter()
            .map(|(n, d, s, b)| (*n, *d, s.as_slice(), b.as_slice())),
        None,
    )
    .expect("serialise");
    std::fs::write(&input, bytes).expect("write");
    let o = run(&[
        "fuse",
        "--input",
        p(&input),
        "--output",
        p(&output),
        "--backend",
        "cpu",
    ]);
    assert!(!o.status.success(), "fuse should fail");
    assert!(!output.exists(), "no output may be written on error");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(leftovers.len(), 1, "only the input remains");
    stderr(&o)
}

fn f32t(
    name: &'static str,
    rows: usize,
    cols: usize,
    v: f32,
) -> (&'static str, safetensors::Dtype, Vec<usize>, Vec<u8>) {
    let m = HostMat::from_f32(rows, cols, &vec![v; rows * cols]);
    (
        name,
        safetensors::Dtype::F32,
        vec![rows, cols],
        m.bytes.into_owned(),
    )
}

#[test]
fn fuse_input_errors_name_tensor_row_and_expectation() {
    let ok = || {
        vec![
            f32t("vision", 4, 1024, 0.1),
            f32t("text", 4, 768, 0.2),
            f32t("audio", 4, 128, 0.3),
        ]
    };

    let mut t = ok();
    t[1] = f32t("text", 4, 767, 0.2);
    let e = fuse_fails(&t);
    assert!(
        e.contains("\"text\"") && e.contains("[4, 767]") && e.contains("expected [4, 768]"),
        "{e}"
    );

    let mut t = ok();
    t.remove(2);
    let e = fuse_fails(&t);
    assert!(
        e.contains("missing tensor \"audio\"") && e.contains("[4, 128]"),
        "{e}"
    );

    let mut t = ok();
    t.push(f32t("depth", 4, 16, 0.0));
    let e = fuse_fails(&t);
    assert!(e.contains("unknown tensor \"depth\""), "{e}");

    let mut t = ok();
    t[0] = f32t("vision", 5, 1024, 0.1);
    let e = fuse_fails(&t);
    assert!(e.contains("\"text\"") || e.contains("\"vision\""), "{e}");

    let mut t = ok();
    let mut mask = vec![1u8; 12];
    mask[6..9].fill(0);
    t.push(("mask", safetensors::Dtype::U8, vec![4, 3], mask));
    let e = fuse_fails(&t);
    assert!(
        e.contains("\"mask\" row 2") && e.contains("no modality"),
        "{e}"
    );

    let mut t = ok();
    t.push(("mask", safetensors::Dtype::U8, vec![4, 2], vec![1; 8]));
    let e = fuse_fails(&t);
    assert!(
        e.contains("\"mask\"") && e.contains("expected [4, 3]"),
        "{e}"
    );

    let mut t = ok();
    let mut v = vec![0.5f32; 4 * 768];
    v[2 * 768 + 10] = f32::INFINITY;
    t[1] = (
        "text",
        safetensors::Dtype::F32,
        vec![4, 768],
        HostMat::from_f32(4, 768, &v).bytes.into_owned(),
    );
    let e = fuse_fails(&t);
    assert!(
        e.contains("\"text\" row 2") && e.contains("column 10"),
        "{e}"
    );

    let mut t = ok();
    t[2] = (
        "audio",
        safetensors::Dtype::I64,
        vec![4, 128],
        vec![0; 4 * 128 * 8],
    );
    let e = fuse_fails(&t);
    assert!(e.contains("\"audio\"") && e.contains("I64"), "{e}");

    let e = fuse_fails(&[]);
    assert!(e.contains("missing tensor \"vision\""), "{e}");
}

#[test]
fn fuse_rejects_bad_files_and_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").expect("write");
    let out = dir.path().join("out.safetensors");
    let o = run(&["fuse", "--input", p(&junk), "--output", p(&out)]);
    assert!(!o.status.success() && stderr(&o).contains("not a valid safetensors file"));
    let o = run(&[
        "fuse",
        "--model",
        p(&junk),
        "--input",
        p(&junk),
        "--output",
        p(&out),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("junk.safetensors"));
    let o = run(&[
        "fuse",
        "--input",
        "/nonexistent/in.safetensors",
        "--output",
        p(&out),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/in.safetensors"));
    let o = run(&[
        "fuse",
        "--backend",
        "tpu",
        "--input",
        p(&junk),
        "--output",
        p(&out),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("unknown backend"));
    assert!(!out.exists());
}

#[test]
fn devices_selftest_and_bench() {
    let o = run(&["devices"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("cpu:0"));

    let o = run(&["devices", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["kind"] == "cpu")));

    let o = run(&["selftest", "--backend", "cpu"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 failed"));

    let o = run(&[
        "bench",
        "--backend",
        "cpu",
        "--batch",
        "1,8",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--dtype",
        "f32,bf16",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 4);
    for l in &lines {
        for key in [
            "backend",
            "device",
            "batch",
            "dtype",
            "ms_per_batch",
            "samples_per_s",
            "gflops",
        ] {
            assert!(!l[key].is_null(), "missing {key} in {l}");
        }
        assert_eq!(l["backend"], "cpu");
        assert!(l["ms_per_batch"].as_f64().is_some_and(|v| v > 0.0));
    }
    assert_eq!(lines[3]["batch"], 8);
    assert_eq!(lines[3]["dtype"], "bf16");
}

#[test]
fn loadgen_steady_reports_json_and_writes_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("steady.svg");
    let o = run(&[
        "loadgen",
        "--scenario",
        "steady",
        "--duration",
        "1",
        "--rate",
        "100",
        "--json",
        "--plot",
        p(&svg),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(r["scenario"], "steady");
    let sent = &r["samples_sent"];
    // 10% CRITICAL, 30% IMPORTANT, 60% BULK of about 100 samples.
    let total: u64 = ["critical", "important", "bulk"]
        .iter()
        .map(|c| sent[c].as_u64().unwrap())
        .sum();
    assert!((50..=110).contains(&total), "{sent}");
    assert!(
        r["latency_ms"]["critical"]["p50"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert_eq!(r["gaps_seen"], r["drops_announced"]);
    assert_eq!(r["gaps_unannounced"], 0);
    assert_eq!(r["critical_lost_without_close"], 0);
    assert!(r["server_peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("p99 latency per class"));
    let bad = run(&["loadgen", "--scenario", "nope"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("unknown scenario"),
        "{}",
        stderr(&bad)
    );
}
