//! Tests of the `samples` frame (src/protocol/samples.rs): round trips, truncations, header and
//! name errors, the encoders.

use super::*;

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn frame() -> Vec<u8> {
    let a = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]); // 2 samples x 3
    let t = f32s(&[7.0, 8.0]); // 2 samples x 1
    encode_samples(
        "cam",
        &["k0", "k1"],
        &["vision", "audio"],
        &[&a, &t],
        DType::F32,
        Priority::Important,
        true,
        9,
    )
    .unwrap()
}

#[test]
fn roundtrip() {
    let f = Bytes::from(frame());
    let s = parse_samples(&f).unwrap();
    assert_eq!(s.stream, "cam");
    assert_eq!(s.keys, ["k0", "k1"]);
    assert_eq!(s.modalities, [("vision", 3), ("audio", 1)]);
    assert_eq!(
        (s.priority, s.dtype, s.ack, s.id),
        (Priority::Important, DType::F32, true, 9)
    );
    assert_eq!(&s.blocks[0][..], &f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[..]);
    assert_eq!(&s.blocks[1][..], &f32s(&[7.0, 8.0])[..]);
    // The request id sits where a produce frame's does.
    assert_eq!(crate::protocol::produce::produce_id(&f), 9);
}

#[test]
fn every_truncation_and_extension_is_refused() {
    let f = frame();
    for cut in 0..f.len() {
        let e = parse_samples(&Bytes::copy_from_slice(&f[..cut])).unwrap_err();
        assert_eq!(e.code, Code::Malformed, "cut at {cut}: {}", e.message);
    }
    let mut long = f.clone();
    long.push(0);
    let e = parse_samples(&Bytes::from(long)).unwrap_err();
    assert_eq!(e.code, Code::Malformed);
    assert!(e.message.contains("payload bytes"), "{}", e.message);
}

#[test]
fn header_errors_have_their_codes() {
    let code = |at: usize, v: u8| {
        let mut f = frame();
        f[at] = v;
        parse_samples(&Bytes::from(f)).unwrap_err().code
    };
    assert_eq!(code(0, b'X'), Code::Malformed);
    assert_eq!(code(2, 7), Code::UnsupportedVersion);
    assert_eq!(code(3, 1), Code::UnknownType);
    assert_eq!(code(4, 9), Code::BadDtype);
    assert_eq!(code(5, 3), Code::BadPriority);
    assert_eq!(code(6, 2), Code::Malformed); // `last` has no meaning here
    assert_eq!(code(7, 1), Code::Malformed);
    assert_eq!(code(20, 1), Code::Malformed);
    // M = 0 and N = 0.
    assert_eq!(code(10, 0), Code::Malformed);
    assert_eq!(code(12, 0), Code::Malformed);
    // A key count far beyond what the frame holds is refused without allocating for it.
    let mut f = frame();
    f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = parse_samples(&Bytes::from(f)).unwrap_err();
    assert!(e.message.contains("cannot hold"), "{}", e.message);
}

#[test]
fn duplicate_modality_and_bad_utf8() {
    let a = f32s(&[1.0]);
    let f = encode_samples(
        "s",
        &["k"],
        &["x", "x"],
        &[&a, &a],
        DType::F32,
        Priority::Bulk,
        false,
        0,
    )
    .unwrap();
    let e = parse_samples(&Bytes::from(f)).unwrap_err();
    assert_eq!(e.code, Code::DuplicateModality);
    let mut f = frame();
    f[PRODUCE_HEADER] = 0xff; // first byte of the stream name
    let e = parse_samples(&Bytes::from(f)).unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (Code::Malformed, "stream is not UTF-8")
    );
}

#[test]
fn encode_into_matches_and_reuses_its_buffer() {
    let rows = f32s(&(0..30).map(|x| x as f32).collect::<Vec<_>>()); // up to 10 x 3
    let keys = [
        "k0", "key1", "k2", "k33", "k4", "k5", "k6", "k7", "k8", "k9",
    ];
    let mut buf = Vec::new();
    let mut cap = 0;
    for n in [10, 3, 7, 1, 10] {
        let (a, t) = (&rows[..n * 12], &rows[..n * 4]);
        let mods = ["vision", "audio"];
        let want = encode_samples(
            "cam",
            &keys[..n],
            &mods,
            &[a, t],
            DType::F32,
            Priority::Critical,
            false,
            3,
        )
        .unwrap();
        buf.clear();
        let b: [&[u8]; 2] = [a, t];
        encode_samples_into(
            &mut buf,
            "cam",
            &keys[..n],
            &mods,
            &b,
            DType::F32,
            Priority::Critical,
            false,
            3,
        )
        .unwrap();
        assert_eq!(buf, want, "n = {n}");
        if n == 10 && cap > 0 {
            assert_eq!(buf.capacity(), cap, "the buffer is reused, not regrown");
        }
        cap = cap.max(buf.capacity());
        // Keys written by a closure give the same frame.
        let mut keyed = b"prefix".to_vec();
        let mut next = keys[..n].iter();
        let key = |v: &mut Vec<u8>| v.extend_from_slice(next.next().unwrap().as_bytes());
        let head = ("cam", DType::F32, Priority::Critical, false, 3);
        encode_samples_keyed(&mut keyed, head, (n, 0), key, &mods, &b).unwrap();
        assert_eq!(&keyed[..6], b"prefix");
        assert_eq!(&keyed[6..], &want[..]);
    }
    // A refusal leaves the buffer as it was.
    let long = "k".repeat(70_000);
    let head = ("cam", DType::F32, Priority::Bulk, false, 0);
    let key = |v: &mut Vec<u8>| v.extend_from_slice(long.as_bytes());
    let r = encode_samples_keyed(&mut buf, head, (1, 0), key, &["x"], &[&rows[..4]]);
    assert!(r.is_none());
    assert_eq!(
        buf,
        encode_samples(
            "cam",
            &keys,
            &["vision", "audio"],
            &[&rows[..120], &rows[..40]],
            DType::F32,
            Priority::Critical,
            false,
            3
        )
        .unwrap()
    );
}

#[test]
fn encoder_refuses_what_it_cannot_write() {
    let a = f32s(&[1.0, 2.0, 3.0]);
    let enc = |keys: &[&str], blocks: &[&[u8]]| {
        encode_samples(
            "s",
            keys,
            &["x"],
            blocks,
            DType::F32,
            Priority::Bulk,
            false,
            0,
        )
    };
    assert!(enc(&[], &[&a]).is_none());
    assert!(enc(&["a", "b"], &[&a]).is_none()); // 3 elements are not 2 whole rows
    assert!(enc(&["a"], &[&a, &a]).is_none()); // one name, two blocks
    let long = "k".repeat(70_000);
    assert!(enc(&[long.as_str()], &[&a]).is_none());
    // f16 rows: 2 samples x 2 elements x 2 bytes.
    let h = [0u8; 8];
    let f = encode_samples(
        "s",
        &["a", "b"],
        &["x"],
        &[&h],
        DType::F16,
        Priority::Bulk,
        false,
        0,
    );
    let f = Bytes::from(f.unwrap());
    assert_eq!(parse_samples(&f).unwrap().modalities, [("x", 2)]);
}
