//! The backend agreement suite, written once as functions of a backend and expanded per backend
//! by `backend_suite!` (the pattern of candle's `test_device!`).
#![allow(dead_code)]

use std::sync::Arc;

use fusion_engine::backend::{Backend, BackendKind};
use fusion_engine::batch::Outputs;
use fusion_engine::error::Error;
use fusion_engine::model::FusionHead;
use fusion_engine::reference::{reference, rel_error};
use fusion_engine::selftest::{random_batch, run_case, standard_cases, MaskMode};
use fusion_engine::tensor::{DType, HostMat};
use fusion_engine::AnyBackend;
use rand::SeedableRng;

/// Fresh seed per run (printed so a failure can be replayed with FUSION_TEST_SEED).
pub fn seed() -> u64 {
    let s = std::env::var("FUSION_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("seed {s} (replay with FUSION_TEST_SEED={s})");
    s
}

/// Runs the named standard case and asserts it is within tolerance.
pub fn case(b: &mut AnyBackend, name: &str) {
    let c = standard_cases()
        .into_iter()
        .find(|c| c.name == name)
        .expect("case exists");
    let r = run_case(b, &c, seed());
    assert!(
        r.pass,
        "{name} on {}: fused {:e} weights {:e} tol {:e} error {:?}",
        r.device, r.fused_err, r.weights_err, r.tol, r.error
    );
}

/// A random head and batch for shape tests.
pub fn setup(
    widths: &[usize],
    dim: usize,
    rows: usize,
    dtype: DType,
    mask: MaskMode,
    seed: u64,
) -> (Arc<FusionHead>, fusion_engine::Batch) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dims: Vec<(String, usize)> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| (format!("m{i}"), *w))
        .collect();
    let head = Arc::new(FusionHead::random(&dims, dim, 1e-5, seed ^ 0x5eed));
    let batch = random_batch(&head, rows, dtype, mask, &mut rng);
    (head, batch)
}

/// Asserts agreement with the reference for an arbitrary shape.
pub fn agree(
    b: &mut AnyBackend,
    widths: &[usize],
    dim: usize,
    rows: usize,
    dtype: DType,
    mask: MaskMode,
    seed: u64,
) {
    let (head, batch) = setup(widths, dim, rows, dtype, mask, seed);
    b.upload(head.clone()).expect("upload");
    let mut out = Outputs::zeros(&head, rows);
    b.run(&batch.view(), out.as_mut()).expect("run");
    let r = reference(&head, &batch.view());
    let tol = match (dtype, b.info().kind) {
        (DType::F32, BackendKind::Cpu) => 1e-5,
        (DType::F32, _) => 1e-4,
        _ => 1e-2,
    };
    let fe = rel_error(&out.fused, &r.fused);
    let we = rel_error(&out.weights, &r.weights);
    assert!(
        fe <= tol && we <= tol,
        "widths {widths:?} D {dim} B {rows} {dtype} {mask:?}: fused {fe:e} weights {we:e} tol {tol:e}"
    );
    // Absent modalities get exactly zero weight; each row's weights sum to 1.
    let m = head.num_modalities();
    for row in 0..rows {
        let w = &out.weights[row * m..(row + 1) * m];
        for (i, v) in w.iter().enumerate() {
            if batch.mask[row * m + i] == 0 {
                assert_eq!(*v, 0.0, "absent modality {i} of row {row} has weight {v}");
            }
        }
        let s: f32 = w.iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "row {row} weights sum to {s}");
    }
}

/// NaN/Inf in a present row is rejected with the tensor, row and column; in an absent row it is
/// never read.
pub fn non_finite(b: &mut AnyBackend) {
    let (head, mut batch) = setup(&[12, 7], 16, 5, DType::F32, MaskMode::All, 7);
    b.upload(head.clone()).expect("upload");
    let mut v = vec![0f32; 5 * 7];
    fusion_engine::tensor::bytes_to_f32(DType::F32, &batch.inputs[1].bytes, &mut v);
    v[3 * 7 + 4] = f32::NAN;
    batch.inputs[1] = HostMat::from_f32(5, 7, &v);
    let mut out = Outputs::zeros(&head, 5);
    match b.run(&batch.view(), out.as_mut()) {
        Err(Error::InputNonFinite { name, row, col }) => {
            assert_eq!((name.as_str(), row, col), ("m1", 3, 4))
        }
        other => panic!("expected InputNonFinite, got {other:?}"),
    }
    // Inf too, in f16.
    let (head16, mut b16) = setup(&[9], 8, 3, DType::F16, MaskMode::All, 8);
    b.upload(head16.clone()).expect("upload");
    let mut raw = b16.inputs[0].bytes.to_vec();
    let inf = half::f16::INFINITY.to_bits().to_le_bytes();
    raw[2 * 18 + 2..2 * 18 + 4].copy_from_slice(&inf);
    b16.inputs[0].bytes = raw.into();
    let mut out16 = Outputs::zeros(&head16, 3);
    assert!(matches!(
        b.run(&b16.view(), out16.as_mut()),
        Err(Error::InputNonFinite { row: 2, col: 1, .. })
    ));
    // The same NaN in an absent row is fine and does not leak into the result.
    b.upload(head.clone()).expect("upload");
    batch.mask[3 * 2 + 1] = 0;
    b.run(&batch.view(), out.as_mut())
        .expect("absent NaN is not read");
    assert!(out.fused.iter().all(|v| v.is_finite()));
    let r = reference(&head, &batch.view());
    assert!(rel_error(&out.fused, &r.fused) < 1e-4);
    assert_eq!(out.weights[3 * 2 + 1], 0.0);
}

/// Rows with no modality, mask values other than 0/1, wrong widths, empty batches and wrong
/// output sizes are typed errors.
pub fn bad_inputs(b: &mut AnyBackend) {
    let (head, batch) = setup(&[10, 6, 3], 12, 4, DType::F32, MaskMode::All, 9);
    b.upload(head.clone()).expect("upload");
    let mut out = Outputs::zeros(&head, 4);

    let mut nomod = batch.clone();
    nomod.mask[2 * 3..3 * 3].fill(0);
    assert!(matches!(
        b.run(&nomod.view(), out.as_mut()),
        Err(Error::NoModality { row: 2 })
    ));

    let mut badmask = batch.clone();
    badmask.mask[5] = 7;
    assert!(matches!(
        b.run(&badmask.view(), out.as_mut()),
        Err(Error::BadMask {
            row: 1,
            col: 2,
            value: 7
        })
    ));

    let mut wide = batch.clone();
    wide.inputs[1] = HostMat::from_f32(4, 7, &[0.5; 28]);
    match b.run(&wide.view(), out.as_mut()) {
        Err(Error::InputShape {
            name,
            expected,
            actual,
        }) => {
            assert_eq!(name, "m1");
            assert_eq!(expected, "[4, 6]");
            assert_eq!(actual, "[4, 7]");
        }
        other => panic!("expected InputShape, got {other:?}"),
    }

    let empty = fusion_engine::Batch {
        rows: 0,
        inputs: head
            .modalities
            .iter()
            .map(|m| HostMat::from_f32(0, m.width, &[]))
            .collect(),
        mask: vec![],
    };
    let mut out0 = Outputs::zeros(&head, 0);
    assert!(matches!(
        b.run(&empty.view(), out0.as_mut()),
        Err(Error::EmptyBatch)
    ));

    let mut small = Outputs::zeros(&head, 3);
    assert!(matches!(
        b.run(&batch.view(), small.as_mut()),
        Err(Error::OutputSize { name: "fused", .. })
    ));
}

/// Uploading a second head replaces the first; the result follows the new head.
pub fn reupload(b: &mut AnyBackend) {
    for s in [11u64, 12] {
        agree(b, &[20, 9], 24, 6, DType::F32, MaskMode::Random, s);
    }
}

/// Expands the suite for one backend. `$open` evaluates to `Option<AnyBackend>` (None: skip).
#[macro_export]
macro_rules! backend_suite {
    ($open:expr) => {
        fn backend() -> Option<fusion_engine::AnyBackend> {
            $open
        }

        macro_rules! with_backend {
            ($b:ident => $body:expr) => {{
                let Some(mut $b) = backend() else { return };
                $body
            }};
        }

        #[test]
        fn default_shape() {
            with_backend!(b => common::case(&mut b, "default-shape"))
        }
        #[test]
        fn odd_sizes_masked() {
            with_backend!(b => common::case(&mut b, "odd-sizes-masked"))
        }
        #[test]
        fn batch_1() {
            with_backend!(b => common::case(&mut b, "batch-1"))
        }
        #[test]
        fn one_modality() {
            with_backend!(b => common::case(&mut b, "one-modality"))
        }
        #[test]
        fn all_but_one_absent() {
            with_backend!(b => common::case(&mut b, "all-but-one-absent"))
        }
        #[test]
        fn large_eps() {
            with_backend!(b => common::case(&mut b, "large-eps"))
        }
        #[test]
        fn f16_inputs() {
            with_backend!(b => common::case(&mut b, "f16-inputs"))
        }
        #[test]
        fn bf16_inputs() {
            with_backend!(b => common::case(&mut b, "bf16-inputs"))
        }
        #[test]
        fn f16_weights() {
            with_backend!(b => common::case(&mut b, "f16-weights"))
        }
        #[test]
        fn bf16_weights() {
            with_backend!(b => common::case(&mut b, "bf16-weights"))
        }
        #[test]
        fn big_batch() {
            with_backend!(b => common::case(&mut b, "big-batch"))
        }
        #[test]
        fn non_finite_inputs() {
            with_backend!(b => common::non_finite(&mut b))
        }
        #[test]
        fn bad_inputs() {
            with_backend!(b => common::bad_inputs(&mut b))
        }
        #[test]
        fn reupload() {
            with_backend!(b => common::reupload(&mut b))
        }
    };
}
