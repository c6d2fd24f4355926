//! The protocol decoders (docs/PROTOCOL.md): binary produce and samples frames, binary result frames and
//! client JSON control messages. The first input byte picks the decoder (fuzz_common). Besides
//! "never panics", every successful decode is checked: lengths agree with the header, and
//! re-encoding gives back the input bytes.

#![no_main]

use bytes::Bytes;
use fusion_engine::protocol::{
    decode_client_message, decode_result, encode_produce, results_frame_push, results_frame_start, split_results, encode_result, encode_samples,
    json_result, json_result_tail, parse_client_json, parse_produce, parse_samples, produce_id,
    with_seq, ClientMessage, Code, ResultView, FLAG_ACK, FLAG_LAST, PRODUCE_HEADER,
    RESULT_FLAG_REPLAYED, VERSION, VERSION_2,
};
use fusion_engine::DType;
use fuzz_common::{PROTOCOL_MODES, PROTOCOL_PRODUCE, PROTOCOL_RESULT};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % PROTOCOL_MODES {
        PROTOCOL_PRODUCE => produce(body),
        PROTOCOL_RESULT => result(body),
        _ => text(body),
    }
});

fn produce(b: &[u8]) {
    let frame = Bytes::copy_from_slice(b);
    samples(&frame);
    let id = produce_id(&frame);
    match parse_produce(&frame) {
        Ok(p) => {
            assert_eq!(p.payload.len(), p.n * p.dtype.size(), "payload length");
            assert_eq!(p.id, id, "produce_id agrees with the parser");
            let flags = if p.ack { FLAG_ACK } else { 0 } | if p.last { FLAG_LAST } else { 0 };
            let again = encode_produce(
                p.stream, p.key, p.modality, p.dtype, p.priority, flags, p.id, &p.payload,
            )
            .expect("a parsed frame re-encodes");
            assert_eq!(again, b, "encode(parse(frame)) == frame");
            let m = p.to_produce();
            assert_eq!(
                (m.n, m.dtype, m.payload.len()),
                (p.n, p.dtype, p.payload.len())
            );
            assert_eq!(m.id.is_some(), p.id != 0);
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            if b.len() < PRODUCE_HEADER {
                assert_eq!(e.code, Code::Malformed);
            }
        }
    }
}

/// A samples frame (4.4): blocks are whole rows, the id sits where a produce frame's does, and
/// it re-encodes to the same bytes.
fn samples(frame: &Bytes) {
    let Ok(s) = parse_samples(frame) else {
        return;
    };
    assert!(!s.keys.is_empty() && !s.modalities.is_empty());
    for ((_, w), blk) in s.modalities.iter().zip(&s.blocks) {
        assert_eq!(blk.len(), s.keys.len() * w * s.dtype.size(), "block length");
    }
    assert_eq!(produce_id(frame), s.id);
    let names: Vec<&str> = s.modalities.iter().map(|m| m.0).collect();
    let blocks: Vec<&[u8]> = s.blocks.iter().map(|x| &x[..]).collect();
    let again = encode_samples(
        s.stream, &s.keys, &names, &blocks, s.dtype, s.priority, s.ack, s.id,
    );
    assert_eq!(
        again.as_deref(),
        Some(&frame[..]),
        "encode(parse(frame)) == frame"
    );
}

fn result(b: &[u8]) {
    // A `results` frame: its records tile it exactly, and rebuilding it gives the same bytes.
    if let Some(records) = split_results(b) {
        let mut again = results_frame_start(b[2], 0);
        for r in &records {
            assert!(results_frame_push(&mut again, r));
            result(r);
        }
        assert_eq!(again, b, "start + push(split(frame)) == frame");
    }
    let Some(d) = decode_result(b) else {
        return;
    };
    assert_eq!(d.mask.len(), d.weights.len(), "one mask byte per weight");
    let view = ResultView {
        stream: &d.stream,
        key: &d.key,
        priority: d.priority,
        mask: &d.mask,
        fused: &d.fused,
        weights: &d.weights,
        stream_seq: d.stream_seq,
        replayed: d.replayed,
    };
    // Byte 2 is the session's version (1 or 2); the decoder accepted it.
    let version = b[2];
    let again = with_seq(&encode_result(&view, version), d.seq);
    // The client-side decoder ignores the flag bits it does not know (byte 5): version 1 has
    // none, version 2 only `replayed`.
    let mut expected = b.to_vec();
    expected[5] = if version == VERSION_2 {
        b[5] & RESULT_FLAG_REPLAYED
    } else {
        0
    };
    assert_eq!(&again[..], &expected[..], "encode(decode(frame)) == frame");
    let j: Value = serde_json::from_str(&json_result(&json_result_tail(&view), d.seq))
        .expect("the JSON result is JSON");
    assert_eq!(j["seq"].as_u64(), Some(d.seq));
    assert_eq!(j["stream_seq"].as_u64(), Some(d.stream_seq));
    assert_eq!(j["replayed"].as_bool().unwrap_or(false), d.replayed);
    assert_eq!(j["key"].as_str(), Some(d.key.as_str()));
    assert_eq!(j["fused"].as_array().map(Vec::len), Some(d.fused.len()));
    assert_eq!(j["weights"].as_array().map(Vec::len), Some(d.weights.len()));
}

fn text(b: &[u8]) {
    let t = String::from_utf8_lossy(b);
    let v = match parse_client_json(&t) {
        Ok(v) => v,
        Err(e) => {
            assert_eq!(e.code, Code::Malformed);
            return;
        }
    };
    match decode_client_message(&v) {
        Ok(ClientMessage::Hello {
            binary,
            version,
            batch,
            send_queue,
        }) => {
            assert_eq!(v["type"], "hello");
            assert!(
                version == VERSION || version == VERSION_2,
                "version {version}"
            );
            assert_eq!(v["version"].as_u64(), Some(u64::from(version)));
            assert_eq!(binary, v["results"] == "binary");
            assert_eq!(batch, v["batch_results"] == true);
            assert!(binary || !batch);
            // Each size asked for is a positive integer of the message, under its class's name.
            for (name, n) in ["critical", "important", "bulk"]
                .into_iter()
                .zip(send_queue)
            {
                if let Some(n) = n {
                    assert!(n >= 1);
                    assert_eq!(v["send_queue"][name].as_u64(), Some(n as u64));
                }
            }
        }
        Ok(ClientMessage::Ping) => assert_eq!(v["type"], "ping"),
        Ok(ClientMessage::Subscribe { stream }) | Ok(ClientMessage::Unsubscribe { stream }) => {
            assert_eq!(v["stream"].as_str(), Some(stream));
        }
        Ok(ClientMessage::Produce(p)) => {
            assert_eq!(v["type"], "produce");
            assert_eq!(p.dtype, DType::F32);
            assert_eq!(p.payload.len(), p.n * 4, "payload length");
            assert_eq!(v["values"].as_array().map(Vec::len), Some(p.n));
            assert_eq!(v["stream"].as_str(), Some(p.stream));
            assert_eq!(v["modality"].as_str(), Some(p.modality));
            assert_eq!(p.id.as_ref(), v.get("id"));
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            assert!(matches!(
                e.code,
                Code::Malformed | Code::UnsupportedVersion | Code::UnknownType | Code::BadPriority
            ));
        }
    }
}
