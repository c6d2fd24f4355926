//! Batch input buffers recycled by the engine (docs/DESIGN.md section 6.1): a buffer goes back to
//! the pool only when the engine has dropped its batch, never while a device may still read it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use fusion_engine::batch::Batch;
use fusion_engine::engine::{DeviceSpec, Engine, EngineConfig, Priority};
use fusion_engine::model::FusionHead;
use fusion_engine::reference::{reference, rel_error};
use fusion_engine::selftest::{random_batch, MaskMode};
use fusion_engine::tensor::{DType, HostMat};

/// `src` copied into buffers from the engine's pool.
fn pooled(engine: &Engine, src: &Batch) -> Batch {
    let inputs = src
        .inputs
        .iter()
        .map(|m| {
            let mut bytes = engine.batch_buffer(m.bytes.len());
            bytes.extend_from_slice(&m.bytes);
            HostMat {
                bytes: bytes.into(),
                ..m.clone()
            }
        })
        .collect();
    let mut mask = engine.batch_buffer(src.mask.len());
    mask.extend_from_slice(&src.mask);
    Batch {
        rows: src.rows,
        inputs,
        mask,
    }
}

#[test]
fn a_batch_buffer_is_not_handed_out_again_while_a_delayed_device_reads_it() {
    let head = Arc::new(FusionHead::random(
        &[("a".into(), 48), ("b".into(), 24)],
        16,
        1e-5,
        3,
    ));
    let devices = DeviceSpec::parse_list("cpu:threads=1:delay=400ms").unwrap();
    let engine = Engine::start(EngineConfig::with_devices(devices), Arc::clone(&head)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let src = random_batch(&head, 64, DType::F32, MaskMode::All, &mut rng);
    let want = reference(&head, &src.view());

    let batch = pooled(&engine, &src);
    let ptrs: Vec<*const u8> = batch
        .inputs
        .iter()
        .map(|m| m.bytes.as_ptr())
        .chain([batch.mask.as_ptr()])
        .collect();
    let ticket = engine.submit(batch, Priority::Important).unwrap();

    // While the device sleeps before reading the batch, every buffer the pool hands out is
    // another allocation; each is filled with NaN bytes, which would poison the batch if it
    // were one of its buffers.
    let t0 = Instant::now();
    let mut held = Vec::new();
    while t0.elapsed() < Duration::from_millis(250) {
        let mut b = engine.batch_buffer(64 * 48 * 4);
        assert!(
            !ptrs.contains(&b.as_ptr()),
            "a buffer of the batch in flight was handed out again"
        );
        b.resize(b.capacity(), 0xff);
        held.push(b);
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = ticket.wait().unwrap();
    let err = rel_error(&r.outputs.fused, &want.fused);
    assert!(
        err <= 1e-5,
        "fused differs from the float64 reference: {err:e}"
    );
    assert!(rel_error(&r.outputs.weights, &want.weights) <= 1e-5);
    drop(held);

    // Once the engine dropped the batch, its buffers come back to the pool: draining the pool
    // (holding every buffer taken) finds each of them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut back: Vec<*const u8> = Vec::new();
    while back.len() < ptrs.len() && Instant::now() < deadline {
        let mut taken = Vec::new();
        loop {
            let b = engine.batch_buffer(1);
            if b.capacity() < 64 {
                break;
            }
            if ptrs.contains(&b.as_ptr()) && !back.contains(&b.as_ptr()) {
                back.push(b.as_ptr());
            }
            taken.push(b);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        back.len(),
        ptrs.len(),
        "the batch's buffers went back to the pool once the engine dropped it"
    );
}

/// A batch the engine refuses (overloaded) gives its buffers back to the pool at once, as one
/// it ran does (they may be page-locked: freeing them is the pool's job, docs/DESIGN.md
/// section 6.7).
#[test]
fn a_refused_batch_gives_its_buffers_back() {
    let head = Arc::new(FusionHead::random(
        &[("a".into(), 48), ("b".into(), 24)],
        16,
        1e-5,
        3,
    ));
    let devices = DeviceSpec::parse_list("cpu:threads=1:delay=300ms").unwrap();
    let mut cfg = EngineConfig::with_devices(devices);
    cfg.max_pending = Some(1);
    let engine = Engine::start(cfg, Arc::clone(&head)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eee);
    let src = random_batch(&head, 64, DType::F32, MaskMode::All, &mut rng);
    let first = engine
        .submit(pooled(&engine, &src), Priority::Important)
        .unwrap();

    let refused = pooled(&engine, &src);
    let ptrs: Vec<*const u8> = refused
        .inputs
        .iter()
        .map(|m| m.bytes.as_ptr())
        .chain([refused.mask.as_ptr()])
        .collect();
    let e = engine
        .submit(refused, Priority::Important)
        .expect_err("max_pending 1 with one batch pending");
    assert!(e.to_string().contains("max_pending"), "{e}");
    // Every buffer of the refused batch is in the pool now (the first batch's are in flight).
    let mut taken = Vec::new();
    for _ in 0..ptrs.len() {
        taken.push(engine.batch_buffer(1));
    }
    let mut got: Vec<*const u8> = taken.iter().map(|b| b.as_ptr()).collect();
    let mut want = ptrs.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the pool hands out the refused batch's buffers");
    first.wait().unwrap();
}
