//! The engine's priorities under load, with real worker threads on CPU devices: BULK is not
//! starved by sustained CRITICAL load, CRITICAL keeps its priority over an aged BULK backlog;
//! and the engine benches (`bench --engine`'s overhead against the kernel, a starved slow
//! device marked slow). Every test runs under a watchdog so a bug fails it instead of hanging.

mod engine_util;

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine_util::*;
use fusion_engine::engine::{Engine, Priority, Ticket};
use fusion_engine::error::Error;
use fusion_engine::tensor::DType;

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
