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
}
