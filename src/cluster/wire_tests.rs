use proptest::prelude::*;

use super::*;

fn sample(rows: usize) -> WireBatch {
    WireBatch {
        id: "gw-1.7".into(),
        reply: "fusion.results.gw-1".into(),
        fingerprint: 0xdead_beef_0123_4567,
        priority: Priority::Important,
        version: 2,
        streams: (0..rows).map(|i| format!("s{i}")).collect(),
        keys: (0..rows).map(|i| format!("k{i}")).collect(),
        priorities: (0..rows).map(|i| Priority::ALL[1 + i % 2]).collect(),
        inputs: vec![
            HostMat {
                dtype: DType::F32,
                rows,
                cols: 3,
                bytes: vec![7; rows * 12].into(),
            },
            HostMat {
                dtype: DType::F16,
                rows,
                cols: 2,
                bytes: vec![1; rows * 4].into(),
            },
        ],
        mask: vec![1; rows * 2],
    }
}

#[test]
fn batch_round_trip() {
    let b = sample(5);
    assert_eq!(WireBatch::decode(&b.encode()).unwrap(), b);
}

#[test]
fn a_version_1_batch_decodes_with_the_batch_class_per_row() {
    let mut b = sample(3);
    b.version = 1;
    let e = b.encode();
    assert_eq!(&e[..4], b"FEB1");
    let d = WireBatch::decode(&e).unwrap();
    assert_eq!(d.version, 1);
    assert_eq!(d.priorities, vec![Priority::Important; 3]);
    assert_eq!(&sample(3).encode()[..4], b"FEB2");
}

#[test]
fn a_version_2_result_carries_the_rows() {
    let rows = Rows {
        streams: vec!["a".into(), "b".into()],
        keys: vec!["k0".into(), "k1".into()],
        priorities: vec![Priority::Critical, Priority::Bulk],
        mask: vec![1, 0, 1, 1],
    };
    let ok = WireResult {
        id: "x.1".into(),
        outcome: Ok(Computed {
            outputs: Outputs {
                fused: vec![1.0; 6],
                weights: vec![0.5; 4],
            },
            device: "w/cpu:0".into(),
            retries: 0,
            device_time: Duration::from_micros(5),
        }),
        rows: Some(rows.clone()),
    };
    let e = ok.encode();
    assert_eq!(&e[..4], b"FER2");
    assert_eq!(WireResult::decode(&e).unwrap(), ok);
    // Rows that do not match the outputs (3 weights per row, 2 mask bytes) are refused.
    let mut bad = ok.clone();
    if let Some(r) = bad.rows.as_mut() {
        r.mask.pop();
    }
    assert!(WireResult::decode(&bad.encode()).is_err());
    for cut in 0..e.len() {
        assert!(WireResult::decode(&e[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn result_round_trip() {
    let ok = WireResult {
        id: "x.1".into(),
        outcome: Ok(Computed {
            outputs: Outputs {
                fused: vec![1.5, -2.0],
                weights: vec![0.25],
            },
            device: "w/cpu:0".into(),
            retries: 2,
            device_time: Duration::from_micros(1234),
        }),
        rows: None,
    };
    assert_eq!(WireResult::decode(&ok.encode()).unwrap(), ok);
    let err = WireResult {
        id: "x.2".into(),
        outcome: Err(("overloaded".into(), "busy".into())),
        rows: None,
    };
    assert_eq!(WireResult::decode(&err.encode()).unwrap(), err);
}

#[test]
fn inconsistent_sizes_are_errors() {
    let mut b = sample(2);
    b.mask.pop();
    assert!(WireBatch::decode(&b.encode()).is_err());
    let mut b = sample(2);
    b.inputs[0].cols = 4;
    assert!(WireBatch::decode(&b.encode()).is_err());
    assert!(WireBatch::decode(b"FER1").is_err());
    let mut e = sample(1).encode();
    e.push(0);
    assert!(WireBatch::decode(&e).is_err());
}

proptest! {
    #[test]
    fn truncations_never_panic(rows in 0usize..4, cut in 0usize..400) {
        let e = sample(rows).encode();
        let cut = cut.min(e.len());
        let r = WireBatch::decode(&e[..cut]);
        prop_assert_eq!(r.is_ok(), cut == e.len());
    }

    #[test]
    fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = WireBatch::decode(&b);
        let _ = WireResult::decode(&b);
        let mut m = b"FEB1".to_vec();
        m.extend_from_slice(&b);
        let _ = WireBatch::decode(&m);
        let mut m = b"FER1".to_vec();
        m.extend_from_slice(&b);
        let _ = WireResult::decode(&m);
    }
}

#[test]
fn a_batch_of_max_batch_rows_fits_max_payload_and_one_more_row_may_not() {
    let widths = [1024usize, 768, 128];
    let (max_payload, name) = (1 << 20, 256);
    let rows = max_batch_rows(max_payload, &widths, name);
    assert!(rows > 100 && rows < 130, "{rows}");
    let batch = |n: usize| WireBatch {
        id: "g".repeat(256),
        reply: "r".repeat(256),
        fingerprint: 7,
        priority: Priority::Bulk,
        version: 2,
        streams: vec!["s".repeat(name); n],
        keys: vec!["k".repeat(name); n],
        priorities: vec![Priority::Bulk; n],
        inputs: widths
            .iter()
            .map(|&w| HostMat {
                dtype: DType::F32,
                rows: n,
                cols: w,
                bytes: vec![0; n * w * 4].into(),
            })
            .collect(),
        mask: vec![1; n * widths.len()],
    };
    assert!(batch(rows).encode().len() <= max_payload);
    assert!(batch(rows + 1).encode().len() > max_payload - 8300);
    // Tiny limits still allow a batch of one row.
    assert_eq!(max_batch_rows(100, &widths, name), 1);
}
