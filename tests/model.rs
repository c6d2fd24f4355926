//! Model loading: every inconsistency is a typed error naming the tensor and the shapes;
//! metadata (`modalities`, `eps`) is honoured; F16/BF16 weights load.

use fusion_engine::error::Error;
use fusion_engine::model::{FusionHead, DEFAULT_EPS};
use fusion_engine::tensor::serialize_raw;
use fusion_engine::tensor::DType;
use std::collections::HashMap;

type T = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

fn head() -> FusionHead {
    FusionHead::random(&[("vision".into(), 6), ("text".into(), 4)], 5, 1e-5, 3)
}

/// The head's tensors as an editable list (F32), plus its metadata.
fn tensors(h: &FusionHead) -> (Vec<T>, HashMap<String, String>) {
    let bytes = h.to_safetensors(DType::F32).expect("serialise");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("meta");
    let mut v: Vec<T> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    (v, meta.metadata().clone().unwrap_or_default())
}

fn build(ts: &[T], meta: Option<HashMap<String, String>>) -> Vec<u8> {
    serialize_raw(
        ts.iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice())),
        meta,
    )
    .expect("serialise")
}

fn load(ts: &[T], meta: Option<HashMap<String, String>>) -> Result<FusionHead, Error> {
    FusionHead::from_bytes(&build(ts, meta), "test.safetensors")
}

#[test]
fn round_trip_keeps_everything() {
    let h = head();
    let (ts, meta) = tensors(&h);
    let back = load(&ts, Some(meta)).expect("loads");
    assert_eq!(back.modalities, h.modalities);
    assert_eq!(back.dim, 5);
    assert_eq!(back.proj_weight, h.proj_weight);
    assert_eq!(back.gate, h.gate);
    assert_eq!(back.norm_bias, h.norm_bias);
    assert!((back.eps - 1e-5).abs() < 1e-12);
}

#[test]
fn missing_tensor_is_named() {
    let (mut ts, meta) = tensors(&head());
    ts.retain(|t| t.0 != "norm.bias");
    match load(&ts, Some(meta)) {
        Err(Error::ModelMissingTensor { name, expected }) => {
            assert_eq!(name, "norm.bias");
            assert_eq!(expected, "[5]");
        }
        other => panic!("expected ModelMissingTensor, got {other:?}"),
    }
}

#[test]
fn wrong_shapes_are_named_with_expected_and_actual() {
    let (ts, meta) = tensors(&head());
    let mut bad = ts.clone();
    let b = bad
        .iter_mut()
        .find(|t| t.0 == "proj.text.bias")
        .expect("exists");
    b.2 = vec![6];
    b.3 = vec![0u8; 24];
    let err = load(&bad, Some(meta.clone())).expect_err("rejected");
    let msg = err.to_string();
    assert!(matches!(err, Error::ModelShape { .. }), "{err:?}");
    assert!(
        msg.contains("\"proj.text.bias\"") && msg.contains("[6]") && msg.contains("[5]"),
        "{msg}"
    );

    let mut bad = ts.clone();
    let w = bad
        .iter_mut()
        .find(|t| t.0 == "proj.vision.weight")
        .expect("exists");
    w.2 = vec![6, 5]; // transposed: [d_m, D] instead of [D, d_m]
    let msg = load(&bad, Some(meta.clone()))
        .expect_err("rejected")
        .to_string();
    assert!(
        msg.contains("\"proj.vision.weight\"") && msg.contains("[6, 5]") && msg.contains("[5, ?]"),
        "{msg}"
    );

    let mut bad = ts;
    let g = bad
        .iter_mut()
        .find(|t| t.0 == "gate.weight")
        .expect("exists");
    g.2 = vec![5];
    let msg = load(&bad, Some(meta)).expect_err("rejected").to_string();
    assert!(
        msg.contains("\"gate.weight\"") && msg.contains("[1, ?]"),
        "{msg}"
    );
}

#[test]
fn bad_dtype_unexpected_tensor_and_non_finite() {
    let (ts, meta) = tensors(&head());
    let mut bad = ts.clone();
    bad.iter_mut()
        .find(|t| t.0 == "norm.weight")
        .expect("exists")
        .1 = safetensors::Dtype::I32;
    assert!(
        matches!(load(&bad, Some(meta.clone())), Err(Error::ModelDtype { name, .. }) if name == "norm.weight")
    );

    let mut bad = ts.clone();
    bad.push((
        "classifier.weight".into(),
        safetensors::Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    assert!(
        matches!(load(&bad, Some(meta.clone())), Err(Error::ModelUnexpectedTensor { name, .. }) if name == "classifier.weight")
    );

    let mut bad = ts.clone();
    bad.push((
        "proj.a.b.weight".into(),
        safetensors::Dtype::F32,
        vec![1],
        vec![0; 4],
    ));
    assert!(matches!(
        load(&bad, Some(meta.clone())),
        Err(Error::ModelUnexpectedTensor { .. })
    ));

    let mut bad = ts;
    let g = bad
        .iter_mut()
        .find(|t| t.0 == "gate.weight")
        .expect("exists");
    g.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(
        matches!(load(&bad, Some(meta)), Err(Error::ModelNonFinite { name, index: 2 }) if name == "gate.weight")
    );
}

#[test]
fn metadata_modalities_order_and_consistency() {
    let h = head();
    let (ts, mut meta) = tensors(&h);
    // Order comes from the metadata, not the file.
    meta.insert("modalities".into(), "text,vision".into());
    let back = load(&ts, Some(meta.clone())).expect("loads");
    assert_eq!(back.modalities[0].name, "text");
    assert_eq!(back.modalities[0].width, 4);
    // Without metadata: sorted lexicographically.
    let back = load(&ts, None).expect("loads");
    assert_eq!(back.modalities[0].name, "text");
    assert!((back.eps - DEFAULT_EPS).abs() < 1e-15);
    // A listed modality without tensors.
    meta.insert("modalities".into(), "text,vision,audio".into());
    assert!(
        matches!(load(&ts, Some(meta.clone())), Err(Error::ModelMissingTensor { name, .. }) if name == "proj.audio.weight")
    );
    // A projection not listed.
    meta.insert("modalities".into(), "text".into());
    assert!(matches!(
        load(&ts, Some(meta.clone())),
        Err(Error::ModelUnexpectedTensor { .. })
    ));
    // Duplicates, empty lists and the reserved name.
    for bad in ["text,text,vision", " , ", "mask,text,vision"] {
        meta.insert("modalities".into(), bad.into());
        assert!(
            matches!(
                load(&ts, Some(meta.clone())),
                Err(Error::ModelMetadata { .. })
            ),
            "{bad}"
        );
    }
}

#[test]
fn eps_metadata_is_parsed_validated_and_used() {
    let h = head();
    let (ts, mut meta) = tensors(&h);
    meta.insert("eps".into(), "0.25".into());
    assert_eq!(load(&ts, Some(meta.clone())).expect("loads").eps, 0.25);
    for bad in ["abc", "-1", "0", "inf", "NaN"] {
        meta.insert("eps".into(), bad.into());
        assert!(
            matches!(load(&ts, Some(meta.clone())), Err(Error::ModelMetadata { key, .. }) if key == "eps"),
            "{bad}"
        );
    }
}

#[test]
fn half_precision_weights_load_exactly() {
    for dt in [DType::F16, DType::BF16] {
        let h = head().rounded_to(dt);
        let bytes = h.to_safetensors(dt).expect("serialise");
        let back = FusionHead::from_bytes(&bytes, "half").expect("loads");
        assert_eq!(back.weight_dtype, dt);
        assert_eq!(back.proj_weight, h.proj_weight, "{dt}");
        assert_eq!(back.norm_weight, h.norm_weight, "{dt}");
    }
}

#[test]
fn garbage_is_a_typed_error_not_a_panic() {
    for bytes in [
        &b""[..],
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
        b"\xff\xff\xff\xff\xff\xff\xff\xff",
        b"hello world, not safetensors",
    ] {
        assert!(matches!(
            FusionHead::from_bytes(bytes, "junk"),
            Err(Error::Safetensors { .. } | Error::ModelMissingTensor { .. })
        ));
    }
    assert!(matches!(
        FusionHead::load(std::path::Path::new("/nonexistent/model.safetensors")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn embedded_head_has_the_documented_shape() {
    let h = FusionHead::embedded();
    let dims: Vec<(&str, usize)> = h
        .modalities
        .iter()
        .map(|m| (m.name.as_str(), m.width))
        .collect();
    assert_eq!(dims, [("vision", 1024), ("text", 768), ("audio", 128)]);
    assert_eq!(h.dim, 512);
    // Seeded: the same every time.
    assert_eq!(h.gate, FusionHead::embedded().gate);
}
