//! The agreement suite on the CPU backend, plus property tests over shapes and masks.

mod common;

use std::sync::Arc;

use fusion_engine::backend::{self, BackendKind, OpenOptions};
use fusion_engine::model::FusionHead;
use fusion_engine::selftest::MaskMode;
use fusion_engine::tensor::DType;
use proptest::prelude::*;

fn open_cpu(threads: Option<usize>) -> fusion_engine::AnyBackend {
    let head = Arc::new(FusionHead::random(&[("x".into(), 4)], 4, 1e-5, 0));
    backend::open(
        BackendKind::Cpu,
        0,
        head,
        &OpenOptions {
            threads,
            ..Default::default()
        },
    )
    .expect("the cpu backend always opens")
}

backend_suite!(Some(open_cpu(None)));

fn mask_strategy() -> impl Strategy<Value = MaskMode> {
    prop_oneof![
        Just(MaskMode::All),
        Just(MaskMode::Random),
        (0usize..4).prop_map(MaskMode::Only)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random widths, D, B, masks, dtypes and thread counts all agree with the f64 reference.
    #[test]
    fn agrees_with_reference(
        widths in prop::collection::vec(1usize..200, 1..5),
        dim in 1usize..150,
        rows in 1usize..300,
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        mask in mask_strategy(),
        threads in 1usize..4,
        seed in any::<u64>(),
    ) {
        let mut b = open_cpu(Some(threads));
        common::agree(&mut b, &widths, dim, rows, dtype, mask, seed);
    }

    /// Heads of D <= 16 take the narrow projection kernel (AVX-512F; the GEMM elsewhere), 17
    /// the GEMM again: the same reference either way, odd widths and row counts included.
    #[test]
    fn narrow_heads_agree_with_reference(
        widths in prop::collection::vec(1usize..300, 1..4),
        dim in 1usize..=17,
        rows in 1usize..70,
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        mask in mask_strategy(),
        seed in any::<u64>(),
    ) {
        let mut b = open_cpu(Some(1));
        common::agree(&mut b, &widths, dim, rows, dtype, mask, seed);
    }
}

/// Finite inputs whose projection overflows f32 are refused, never returned as Inf/NaN.
#[test]
fn projection_overflow_is_an_error_not_a_non_finite_result() {
    let mut b = open_cpu(None);
    let (head, mut batch) = common::setup(&[16, 8], 12, 6, DType::F32, MaskMode::All, 3);
    fusion_engine::Backend::upload(&mut b, head.clone()).expect("upload");
    let mut v = vec![0f32; 6 * 16];
    fusion_engine::tensor::bytes_to_f32(DType::F32, &batch.inputs[0].bytes, &mut v);
    v[4 * 16..5 * 16].fill(3e38);
    batch.inputs[0] = fusion_engine::tensor::HostMat::from_f32(6, 16, &v);
    let mut out = fusion_engine::Outputs::zeros(&head, 6);
    match fusion_engine::Backend::run(&mut b, &batch.view(), out.as_mut()) {
        Err(fusion_engine::Error::InputOverflow { row: 4 }) => {}
        other => panic!("expected InputOverflow at row 4, got {other:?}"),
    }
}

/// More threads than row blocks: each block's GEMM runs in parallel inside the pool, so a
/// waiting thread may pick up another block's task. Panicked with "RefCell already borrowed"
/// on a 16-core GPU host (the per-thread scratch was held across the parallel GEMM).
#[test]
fn nested_parallel_gemms_share_threads_safely() {
    for (rows, dtype) in [(100, DType::F16), (100, DType::F32), (45, DType::BF16)] {
        let mut b = open_cpu(Some(16));
        common::agree(
            &mut b,
            &[1024, 768, 128],
            512,
            rows,
            dtype,
            MaskMode::Random,
            rows as u64,
        );
    }
}

/// A batch too small to be worth the pool (the D = 8 head's widths, 500 rows: two row blocks,
/// the last one partial) runs its blocks one after another on the calling thread; one just
/// over the threshold (600 rows) goes to the pool. Both agree with the reference in every dtype.
#[test]
fn small_batches_on_the_calling_thread_and_larger_ones_on_the_pool_agree() {
    for rows in [500, 600] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut b = open_cpu(Some(4));
            common::agree(
                &mut b,
                &[1024, 768, 128],
                8,
                rows,
                dtype,
                MaskMode::Random,
                rows as u64 + 7,
            );
        }
    }
}
