//! The engine with real worker threads on CPU devices only: routing away from a slow device
//! and back, retries without loss or duplicates, hang detection, bounded queues, overload,
//! shutdown, bad input. Every test runs under a watchdog so a bug fails it instead of hanging.

mod engine_util;

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine_util::*;
use fusion_engine::backend::BackendKind;
use fusion_engine::engine::{
    DeviceSpec, DeviceState, Engine, EngineConfig, FaultSpec, Priority, Ticket,
};

#[test]
fn slow_device_is_avoided_marked_slow_and_recovers() {
    within(120, || {
        let head = small_head();
        let mut cfg = config("cpu:threads=1:delay=2ms,cpu:threads=1:delay=20ms");
        cfg.probe_interval = Duration::from_millis(100);
        let engine = Engine::start(cfg, Arc::clone(&head)).unwrap();
        let bs = batches(&head, 300, 32, 1);
        let mut slow_at: Option<u64> = None;
        let tickets = submit_all(&engine, &bs, |e| {
            let d = &e.stats().devices[1];
            if slow_at.is_none() && d.state == DeviceState::Slow {
                slow_at = Some(d.batches);
            }
        });
        let mut per_dev = [0usize; 2];
        for t in tickets {
            per_dev[t.wait().unwrap().device_index] += 1;
        }
        let st = engine.stats();
        let d1 = &st.devices[1];
        assert!(
            d1.slow_events >= 1,
            "the 10x slower device was never marked SLOW: {d1:?}"
        );
        let at = slow_at.expect("SLOW was never observed during the load");
        assert!(at <= 20, "marked SLOW only after {at} batches");
        let share = per_dev[1] as f64 / 300.0;
        assert!(
            share < 0.10,
            "the slow device got {:.1}% of the samples",
            share * 100.0
        );

        // Remove the delay: the next probe finds it fast and it gets traffic again.
        engine
            .set_faults(
                1,
                &FaultSpec {
                    delay: Duration::from_millis(2),
                    ..FaultSpec::default()
                },
            )
            .unwrap();
        let bs = batches(&head, 300, 32, 2);
        let mut per_dev = [0usize; 2];
        for t in submit_all(&engine, &bs, |_| {}) {
            per_dev[t.wait().unwrap().device_index] += 1;
        }
        let d1 = &engine.stats().devices[1];
        assert_eq!(d1.state, DeviceState::Healthy, "{d1:?}");
        assert!(
            per_dev[1] >= 60,
            "recovered device got only {} of 300 batches",
            per_dev[1]
        );
        assert_eq!(engine.shutdown(Duration::from_secs(5)), 0);
    });
}

#[test]
fn failing_device_loses_nothing_and_duplicates_nothing() {
    within(120, || {
        let head = small_head();
        // Device 0 is given 1 ms per batch so that the failing device gets most of the traffic
        // even when it opened late on a busy machine (it once got 2 of 200 batches, neither
        // failed, and the test saw nothing to retry).
        let mut cfg = config("cpu:threads=1:delay=1ms,cpu:threads=1:fail=0.3");
        // This test is about failures: keep timing noise on a busy machine from marking the
        // failing device SLOW (which would leave it only probes).
        cfg.slow_ratio = 1e6;
        let engine = Engine::start(cfg, Arc::clone(&head)).unwrap();
        let bs = batches(&head, 200, 16, 3);
        let tickets = submit_all(&engine, &bs, |_| {});
        let mut retried = 0;
        for (i, t) in tickets.into_iter().enumerate() {
            let r = t.wait().unwrap_or_else(|e| panic!("batch {i} lost: {e}"));
            retried += (r.retries > 0) as usize;
            if i % 40 == 0 || r.retries > 0 {
                let want = direct(&head, &bs[i]);
                assert_close(&r.outputs.fused, &want.fused);
                assert_close(&r.outputs.weights, &want.weights);
            }
        }
        let st = engine.stats();
        assert_eq!(st.duplicate_deliveries, 0);
        assert!(
            st.devices[1].failures > 0 && st.devices[1].retried > 0,
            "{:?}",
            st.devices[1]
        );
        assert!(retried > 0);
        let t0 = Instant::now();
        while engine.stats().devices[1].restarts == 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let restarts = engine.stats().devices[1].restarts;
        assert!(restarts > 0, "the failed worker was not restarted");
        assert_eq!(st.devices[0].failures, 0);
        engine.shutdown(Duration::from_secs(5));
    });
}

#[test]
fn hung_device_is_detected_by_device_timeout() {
    within(120, || {
        let head = small_head();
        // Device 0 gets 1 ms per batch, as in the failing-device test: on a busy machine the
        // hanging device otherwise got only a few of the 120 batches and none of them hung.
        let mut cfg = config("cpu:threads=1:delay=1ms,cpu:threads=1:hang=0.3:hang_for=1s");
        cfg.device_timeout = Duration::from_millis(200);
        cfg.slow_ratio = 1e6;
        let engine = Engine::start(cfg, Arc::clone(&head)).unwrap();
        let bs = batches(&head, 120, 16, 4);
        let t0 = Instant::now();
        let tickets = submit_all(&engine, &bs, |_| {});
        for (i, t) in tickets.into_iter().enumerate() {
            let r = t.wait().unwrap_or_else(|e| panic!("batch {i} lost: {e}"));
            if r.retries > 0 {
                assert_close(&r.outputs.fused, &direct(&head, &bs[i]).fused);
            }
        }
        let st = engine.stats();
        let d1 = &st.devices[1];
        assert!(d1.failures > 0, "{st:?}");
        let why = d1.last_error.as_deref().unwrap_or("");
        assert!(why.contains("device_timeout"), "{why}");
        assert_eq!(st.duplicate_deliveries, 0);
        assert!(t0.elapsed() < Duration::from_secs(60));
        engine.shutdown(Duration::from_secs(5));
    });
}

#[test]
fn overload_is_a_typed_error_and_queues_stay_bounded() {
    within(60, || {
        let head = small_head();
        let mut cfg = config("cpu:threads=1:delay=200ms,cpu:threads=1:delay=200ms");
        cfg.max_pending = Some(8);
        cfg.max_in_flight = 2;
        let engine = Engine::start(cfg, Arc::clone(&head)).unwrap();
        let bs = batches(&head, 50, 8, 5);
        let mut tickets = Vec::new();
        let mut refused = 0;
        for b in &bs {
            match engine.submit_shared(Arc::clone(b), Priority::Bulk) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    assert_eq!(e.code(), "overloaded", "{e}");
                    refused += 1;
                }
            }
            let st = engine.stats();
            assert!(st.admitted <= 8, "admitted {} > max_pending", st.admitted);
            for d in &st.devices {
                assert!(d.in_flight <= 2 && d.queued <= 2, "{d:?}");
            }
        }
        assert_eq!(tickets.len(), 8);
        assert_eq!(refused, 42);
        for t in tickets {
            t.wait().unwrap();
        }
        let st = engine.stats();
        assert!(st.max_admitted_seen <= 8);
        assert!(st.devices.iter().all(|d| d.max_in_flight_seen <= 2));
        assert_eq!(st.overloaded, 42);
        // Room again once delivered.
        engine
            .submit_shared(Arc::clone(&bs[0]), Priority::Bulk)
            .unwrap()
            .wait()
            .unwrap();
        engine.shutdown(Duration::from_secs(5));
    });
}

#[test]
fn shutdown_fails_every_pending_batch_and_drains_with_grace() {
    within(60, || {
        let head = small_head();
        let engine = Engine::start(config("cpu:threads=1:delay=50ms"), Arc::clone(&head)).unwrap();
        let bs = batches(&head, 10, 8, 6);
        let tickets = submit_all(&engine, &bs, |_| {});
        let failed = engine.shutdown(Duration::ZERO);
        assert!(failed >= 8, "only {failed} failed at shutdown");
        let mut shut = 0;
        for t in tickets {
            match t.wait() {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.code(), "shutdown", "{e}");
                    shut += 1;
                }
            }
        }
        assert_eq!(shut, failed);

        let engine = Engine::start(config("cpu:threads=1:delay=5ms"), Arc::clone(&head)).unwrap();
        let tickets = submit_all(&engine, &bs, |_| {});
        assert_eq!(engine.shutdown(Duration::from_secs(10)), 0);
        for t in tickets {
            t.wait().unwrap();
        }
    });
}

#[test]
fn bad_input_fails_to_the_caller_without_failing_the_device() {
    within(60, || {
        let head = small_head();
        let engine =
            Engine::start(config("cpu:threads=1,cpu:threads=1"), Arc::clone(&head)).unwrap();
        let mut b = (*batches(&head, 1, 4, 7)[0]).clone();
        b.mask.fill(1);
        b.inputs[0] = fusion_engine::tensor::HostMat::from_f32(4, 48, &[f32::NAN; 4 * 48]);
        let e = engine
            .submit(b, Priority::Critical)
            .unwrap()
            .wait()
            .unwrap_err();
        assert!(e.is_input_error(), "{e}");
        let mut wrong = (*batches(&head, 1, 4, 8)[0]).clone();
        wrong.mask.pop();
        assert!(engine
            .submit(wrong, Priority::Critical)
            .unwrap_err()
            .is_input_error());
        let st = engine.stats();
        assert!(st
            .devices
            .iter()
            .all(|d| d.state == DeviceState::Healthy && d.failures == 0));
        let good = batches(&head, 1, 4, 9)[0].clone();
        engine
            .submit_shared(good, Priority::Critical)
            .unwrap()
            .wait()
            .unwrap();
        engine.shutdown(Duration::from_secs(5));
    });
}

#[test]
fn tickets_are_futures_and_results_are_correct() {
    within(60, || {
        let head = small_head();
        let engine = Engine::start(config("cpu,cpu:threads=1"), Arc::clone(&head)).unwrap();
        let bs = batches(&head, 6, 33, 10);
        let tickets = submit_all(&engine, &bs, |_| {});
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (b, t) in bs.iter().zip(tickets) {
            let r = rt.block_on(t).unwrap();
            let want = direct(&head, b);
            assert_close(&r.outputs.fused, &want.fused);
            assert_close(&r.outputs.weights, &want.weights);
        }
        engine.shutdown(Duration::from_secs(5));
    });
}

#[test]
fn engine_and_tickets_can_be_shared_across_threads_and_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Engine>();
    send::<Ticket>();
}

#[test]
fn no_usable_device_is_a_clear_start_error() {
    let head = small_head();
    let mut cfg = EngineConfig::with_devices(vec![DeviceSpec::new(BackendKind::Cuda, Some(99))]);
    cfg.open_timeout = Duration::from_secs(20);
    match Engine::start(cfg, head) {
        Err(e) => assert_eq!(e.code(), "backend_unavailable", "{e}"),
        Ok(_) => panic!("cuda:99 opened"),
    }
    let dup = EngineConfig::with_devices(DeviceSpec::parse_list("cpu:0,cpu:0").unwrap());
    match Engine::start(dup, small_head()) {
        Err(e) => assert_eq!(e.code(), "config", "{e}"),
        Ok(_) => panic!("a device listed twice was accepted"),
    }
}

/// Threads of this process whose name starts with `prefix` (Linux `/proc/self/task`).
fn threads_named(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn instances_run_side_by_side_and_shutdown_waits_for_every_worker() {
    within(60, || {
        let head = small_head();
        // Index 7: no other test's workers carry these thread names.
        let engine = Engine::start(
            config("cpu:7:threads=1:delay=20ms:instances=2"),
            Arc::clone(&head),
        )
        .unwrap();
        assert_eq!(engine.device_names(), ["cpu:7", "cpu:7/1"]);
        let bs = batches(&head, 16, 8, 3);
        let want: Vec<_> = bs.iter().map(|b| direct(&head, b)).collect();
        for (t, w) in submit_all(&engine, &bs, |_| {}).into_iter().zip(&want) {
            let r = t.wait().unwrap();
            assert_close(&r.outputs.fused, &w.fused);
        }
        let st = engine.stats();
        assert!(
            st.devices.iter().all(|d| d.batches >= 1),
            "both instances run batches: {:?}",
            st.devices
                .iter()
                .map(|d| (&d.name, d.batches))
                .collect::<Vec<_>>()
        );
        assert_eq!(threads_named("fusion-cpu:7").len(), 2, "one thread each");

        // Each worker is inside a 400 ms batch when the engine shuts down without a grace
        // period: shutdown returns only once both threads have exited (their backends
        // dropped), not while they still sleep in the batch.
        let slow = FaultSpec {
            delay: Duration::from_millis(400),
            ..FaultSpec::default()
        };
        for d in 0..2 {
            engine.set_faults(d, &slow).unwrap();
        }
        let running = submit_all(&engine, &batches(&head, 2, 8, 4), |_| {});
        let t0 = Instant::now();
        while engine.stats().devices.iter().any(|d| d.in_flight == 0) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "both instances took a batch"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            engine.shutdown(Duration::ZERO),
            2,
            "both running batches cut off"
        );
        assert_eq!(
            threads_named("fusion-cpu:7"),
            Vec::<String>::new(),
            "a worker thread outlived shutdown"
        );
        for t in running {
            assert!(t.wait().is_err(), "a batch cut off by shutdown fails");
        }
    });
}
