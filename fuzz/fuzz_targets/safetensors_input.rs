//! The safetensors input paths: the features-file reader of `fuse` (`io::read_input`, against a
//! tiny head and the embedded head) and the model loader (`FusionHead::from_bytes` with its
//! validation). The first input byte picks the path (fuzz_common). Successful reads are checked:
//! shapes agree with the head, the batch validates, and writing it back reads back the same.

#![no_main]

use std::sync::LazyLock;

use fusion_engine::io::{read_input, write_input_bytes};
use fusion_engine::{DType, FusionHead};
use fuzz_common::{tiny_head, INPUT_EMBEDDED, INPUT_MODES, INPUT_TINY};
use libfuzzer_sys::fuzz_target;

static TINY: LazyLock<FusionHead> = LazyLock::new(tiny_head);
static EMBEDDED: LazyLock<FusionHead> = LazyLock::new(FusionHead::embedded);

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % INPUT_MODES {
        INPUT_TINY => features(body, &TINY, true),
        INPUT_EMBEDDED => features(body, &EMBEDDED, false),
        _ => model(body),
    }
});

fn features(b: &[u8], head: &FusionHead, run_reference: bool) {
    let batch = match read_input(b, head, "fuzz") {
        Ok(batch) => batch,
        Err(e) => {
            assert!(!e.to_string().is_empty() && !e.code().is_empty());
            return;
        }
    };
    let m = head.num_modalities();
    assert!(batch.rows > 0);
    assert_eq!(batch.inputs.len(), m);
    for (x, md) in batch.inputs.iter().zip(&head.modalities) {
        assert_eq!((x.rows, x.cols), (batch.rows, md.width));
        assert_eq!(x.bytes.len(), x.rows * x.cols * x.dtype.size());
    }
    assert_eq!(batch.mask.len(), batch.rows * m);
    assert!(batch.mask.iter().all(|&v| v <= 1));
    batch.view().validate(head).expect("a read batch validates");
    let written = write_input_bytes(head, &batch, true).expect("a read batch serialises");
    let again = read_input(&written, head, "rewritten").expect("a written batch reads back");
    assert_eq!(again, batch, "read(write(batch)) == batch");
    if run_reference {
        // The batch is fit for the head: the float64 reference gives finite outputs and
        // attention weights that sum to 1 over the present modalities (0 for absent ones).
        let r = fusion_engine::reference::reference(head, &batch.view());
        assert!(r.fused.iter().all(|v| v.is_finite()));
        for (row, a) in r.weights.chunks_exact(m).enumerate() {
            let sum: f64 = a.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "row {row}: weights sum to {sum}");
            for (i, w) in a.iter().enumerate() {
                assert!(w.is_finite() && (*w == 0.0 || batch.mask[row * m + i] == 1));
            }
        }
    }
}

fn model(b: &[u8]) {
    let h = match FusionHead::from_bytes(b, "fuzz") {
        Ok(h) => h,
        Err(e) => {
            assert!(!e.to_string().is_empty() && !e.code().is_empty());
            return;
        }
    };
    let d = h.dim;
    assert!(d > 0 && h.num_modalities() > 0);
    assert!(h.eps.is_finite() && h.eps > 0.0);
    assert_eq!(h.proj_weight.len(), h.num_modalities());
    assert_eq!(h.proj_bias.len(), h.num_modalities());
    for (i, md) in h.modalities.iter().enumerate() {
        assert!(md.width > 0 && !md.name.is_empty());
        assert_eq!(h.modality_index(&md.name), Some(i), "names are unique");
        assert_eq!(h.proj_weight[i].len(), d * md.width);
        assert_eq!(h.proj_bias[i].len(), d);
    }
    for v in [&h.gate, &h.norm_weight, &h.norm_bias] {
        assert_eq!(v.len(), d);
    }
    let all =
        h.proj_weight
            .iter()
            .chain(&h.proj_bias)
            .chain([&h.gate, &h.norm_weight, &h.norm_bias]);
    for v in all.clone() {
        assert!(v.iter().all(|x| x.is_finite()), "parameters are finite");
    }
    // Saving as F32 is exact whatever the stored dtypes were: the head loads back the same.
    let bytes = h
        .to_safetensors(DType::F32)
        .expect("a loaded head serialises");
    let g = FusionHead::from_bytes(&bytes, "saved").expect("a saved head loads back");
    assert_eq!(g.modalities, h.modalities);
    assert_eq!((g.dim, g.eps), (h.dim, h.eps));
    let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let g_all =
        g.proj_weight
            .iter()
            .chain(&g.proj_bias)
            .chain([&g.gate, &g.norm_weight, &g.norm_bias]);
    for (a, b) in all.zip(g_all) {
        assert_eq!(bits(a), bits(b), "save(load(file)) loads back bit for bit");
    }
}
