//! The engine with real worker threads on CPU devices only: routing away from a slow device
//! and back, retries without loss or duplicates, hang detection, bounded queues, overload,
//! shutdown, bad input. Every test runs under a watchdog so a bug fails it instead of hanging.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use fusion_engine::backend::{self, Backend, BackendKind, OpenOptions};
use fusion_engine::batch::{Batch, Outputs};
use fusion_engine::engine::{
    DeviceSpec, DeviceState, Engine, EngineConfig, FaultSpec, Priority, Ticket,
};
use fusion_engine::error::Error;
use fusion_engine::model::FusionHead;
use fusion_engine::selftest::{random_batch, MaskMode};
use fusion_engine::tensor::DType;

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(RecvTimeoutError::Disconnected) => panic!("the test body panicked (see above)"),
        Err(RecvTimeoutError::Timeout) => {
            panic!("test did not finish within {secs} s (a caller waited forever?)")
        }
    }
}

fn small_head() -> Arc<FusionHead> {
    Arc::new(FusionHead::random(
        &[("a".into(), 48), ("b".into(), 24), ("c".into(), 8)],
        32,
        1e-5,
        7,
    ))
}

fn config(devices: &str) -> EngineConfig {
    let mut c = EngineConfig::with_devices(DeviceSpec::parse_list(devices).unwrap());
    c.restart_backoff = Duration::from_millis(10);
    c.restart_backoff_max = Duration::from_millis(200);
    c
}

fn batches(head: &FusionHead, n: usize, rows: usize, seed: u64) -> Vec<Arc<Batch>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            Arc::new(random_batch(
                head,
                rows,
                DType::F32,
                MaskMode::Random,
                &mut rng,
            ))
        })
        .collect()
}

/// Submits, retrying after `Overloaded`; calls `watch` between submissions.
fn submit_all(engine: &Engine, bs: &[Arc<Batch>], mut watch: impl FnMut(&Engine)) -> Vec<Ticket> {
    let mut out = Vec::with_capacity(bs.len());
    for b in bs {
        loop {
            match engine.submit_shared(Arc::clone(b), Priority::Important) {
                Ok(t) => break out.push(t),
                Err(Error::Overloaded(_)) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("submit: {e}"),
            }
            watch(engine);
        }
        watch(engine);
    }
    out
}

/// The direct CPU backend's result for `b`.
fn direct(head: &Arc<FusionHead>, b: &Batch) -> Outputs {
    let mut be = backend::open(
        BackendKind::Cpu,
        9,
        Arc::clone(head),
        &OpenOptions::default(),
    )
    .unwrap();
    let mut out = Outputs::zeros(head, b.rows);
    be.run(&b.view(), out.as_mut()).unwrap();
    out
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    assert!(
        (num / den.max(1e-30)).sqrt() <= 1e-5,
        "engine result differs from the direct run"
    );
}

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

/// Under sustained CRITICAL overload a BULK batch still runs: once it has waited
/// `priority_aging` it goes ahead of newer batches. Without aging it waits for the CRITICAL
/// flood to end (so the test can tell the two apart).
#[test]
fn bulk_is_not_starved_by_sustained_critical_load() {
    fn bulk_finished_during_flood(aging: Duration) -> (bool, Duration) {
        let head = small_head();
        let mut cfg = config("cpu:threads=1:delay=5ms");
        cfg.max_in_flight = 1;
        cfg.max_pending = Some(64);
        cfg.priority_aging = aging;
        let engine = Engine::start(cfg, Arc::clone(&head)).unwrap();
        let bs = batches(&head, 1, 4, 11);
        // Fill the device and its pending queue with CRITICAL work first.
        let mut crit: std::collections::VecDeque<Ticket> = (0..8)
            .map(|_| {
                engine
                    .submit_shared(Arc::clone(&bs[0]), Priority::Critical)
                    .unwrap()
            })
            .collect();
        let t0 = Instant::now();
        let mut bulk = Some(
            engine
                .submit_shared(Arc::clone(&bs[0]), Priority::Bulk)
                .unwrap(),
        );
        let mut done_at = None;
        // Keep 8 CRITICAL batches pending for 1.5 s (the device does ~150 batches meanwhile).
        while t0.elapsed() < Duration::from_millis(1500) {
            if let Some(t) = crit.pop_front() {
                t.wait().unwrap();
            }
            crit.push_back(
                engine
                    .submit_shared(Arc::clone(&bs[0]), Priority::Critical)
                    .unwrap(),
            );
            if let Some(b) = bulk.take() {
                match b.try_take() {
                    Ok(r) => {
                        r.unwrap();
                        done_at = Some(t0.elapsed());
                    }
                    Err(b) => bulk = Some(b),
                }
            }
        }
        let flood = t0.elapsed();
        if let Some(b) = bulk {
            b.wait().unwrap();
        }
        for t in crit {
            t.wait().unwrap();
        }
        engine.shutdown(Duration::from_secs(1));
        (done_at.is_some(), done_at.unwrap_or(flood))
    }
    within(60, || {
        let (ran, after) = bulk_finished_during_flood(Duration::from_millis(100));
        assert!(ran, "BULK batch did not run during the CRITICAL flood");
        // 100 ms of aging plus at most the batch running ahead of it (5 ms delay + kernel).
        assert!(
            after < Duration::from_millis(600),
            "BULK ran only after {after:?}"
        );
        let (ran, after) = bulk_finished_during_flood(Duration::from_secs(3600));
        assert!(
            !ran,
            "without aging BULK should wait for the flood (ran after {after:?})"
        );
    });
}

#[test]
fn critical_keeps_priority_under_an_aged_bulk_backlog() {
    // A BULK backlog older than `priority_aging` and a steady CRITICAL queue on one slow device:
    // aged BULK gets its share (1 dispatch in AGED_SHARE = 4), CRITICAL the rest. With plain
    // aging (everything older than the threshold served oldest first) the old BULK backlog
    // would go first and CRITICAL would wait behind all of it.
    within(60, || {
        let head = small_head();
        let mut cfg = config("cpu:threads=1:delay=5ms");
        cfg.max_in_flight = 1;
        cfg.max_pending = Some(256);
        cfg.priority_aging = Duration::from_millis(50);
        let engine = Engine::start(cfg, Arc::clone(&head)).unwrap();
        let bs = batches(&head, 1, 4, 12);
        let bulk: Vec<Ticket> = (0..60)
            .map(|_| {
                engine
                    .submit_shared(Arc::clone(&bs[0]), Priority::Bulk)
                    .unwrap()
            })
            .collect();
        // Let the backlog age, then keep 4 CRITICAL batches pending.
        std::thread::sleep(Duration::from_millis(80));
        let before = engine.stats().devices[0].batches as usize;
        let t0 = Instant::now();
        let mut crit: std::collections::VecDeque<Ticket> = (0..4)
            .map(|_| {
                engine
                    .submit_shared(Arc::clone(&bs[0]), Priority::Critical)
                    .unwrap()
            })
            .collect();
        let mut crit_done = 0usize;
        let mut crit_wait = Vec::new();
        while t0.elapsed() < Duration::from_millis(400) {
            if let Some(t) = crit.pop_front() {
                let r = t.wait().unwrap();
                crit_wait.push(r.total_time);
                crit_done += 1;
            }
            crit.push_back(
                engine
                    .submit_shared(Arc::clone(&bs[0]), Priority::Critical)
                    .unwrap(),
            );
        }
        let window = t0.elapsed();
        let st = engine.stats();
        let total = st.devices[0].batches as usize;
        for t in crit {
            t.wait().unwrap();
        }
        for t in bulk {
            t.wait().unwrap();
        }
        engine.shutdown(Duration::from_secs(1));
        // Batches run during the window that were not CRITICAL.
        let bulk_in_window = total.saturating_sub(before).saturating_sub(crit_done);
        let share = crit_done as f64 / (crit_done + bulk_in_window).max(1) as f64;
        assert!(
            share >= 0.6,
            "CRITICAL got {crit_done} of the dispatches in {window:?} ({share:.2}); BULK {bulk_in_window}"
        );
        assert!(
            bulk_in_window >= 5,
            "aged BULK got only {bulk_in_window} dispatches in {window:?}"
        );
        crit_wait.sort();
        let p90 = crit_wait[crit_wait.len() * 9 / 10];
        // 4 CRITICAL batches ahead at most, and one BULK in four: about 5 batches of ~5 ms.
        assert!(
            p90 < Duration::from_millis(120),
            "CRITICAL p90 wait {p90:?} (behind the BULK backlog?)"
        );
    });
}

#[test]
fn overhead_bench_compares_one_device_with_its_kernel() {
    use fusion_engine::tools::engine_bench::{run_overhead_bench, OverheadOptions};
    within(120, || {
        let head = small_head();
        let o = OverheadOptions {
            batch: 32,
            dtype: DType::F32,
            rounds: 3,
            batches_per_segment: 4,
        };
        let r = run_overhead_bench(config("cpu:threads=1"), Arc::clone(&head), &o).unwrap();
        assert_eq!((r.rounds, r.round_ratios.len(), r.batch), (3, 3, 32));
        assert!(
            r.engine_samples_per_s > 0.0 && r.direct_samples_per_s > 0.0,
            "{r:?}"
        );
        let ratio = r.engine_samples_per_s / r.direct_samples_per_s;
        assert!((r.ratio - ratio).abs() < 1e-9, "{r:?}");
        assert!(r.round_ratios.iter().all(|x| x.is_finite() && *x > 0.0));
        // One device without faults only.
        for bad in ["cpu:threads=1,cpu:threads=1", "cpu:threads=1:delay=1ms"] {
            let e = run_overhead_bench(config(bad), Arc::clone(&head), &o).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
        }
        let zero = OverheadOptions { rounds: 0, ..o };
        assert!(run_overhead_bench(config("cpu:threads=1"), head, &zero).is_err());
    });
}

/// `bench --devices cpu,cpu:delay=...` as issue 5 runs it: the caller keeps a window of
/// tickets, so the fast device never builds the backlog that would make the router send the
/// slow one another batch after measuring it. The slow device must still be marked SLOW (its
/// average stays over 2x while batches complete without it) and get few samples.
#[test]
fn engine_bench_marks_a_starved_slow_device_slow() {
    use fusion_engine::tools::engine_bench::{run_engine_bench, EngineBenchOptions};
    within(120, || {
        let head = small_head();
        let o = EngineBenchOptions {
            samples: 20_000,
            batch: 64,
            ..EngineBenchOptions::default()
        };
        let cfg = config("cpu:threads=1,cpu:threads=1:delay=40ms");
        let r = run_engine_bench(cfg, head, &o).unwrap();
        assert_eq!(r.delivered, r.submitted, "{r:?}");
        assert_eq!((r.duplicates, r.failed_permanently), (0, 0), "{r:?}");
        let slow = &r.devices[1];
        assert!(slow.slow_events >= 1, "never marked SLOW: {slow:?}");
        assert!(
            slow.share < 0.10,
            "the slow device got {:.1}%",
            slow.share * 100.0
        );
        assert_eq!(r.devices[0].slow_events, 0, "{:?}", r.devices[0]);
    });
}
