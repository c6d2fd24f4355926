//! The bench's measures, and its pinned inputs (docs/DESIGN.md section 6.7).

use super::*;
use crate::backend::RunStats;
use crate::model::FusionHead;

#[test]
fn stage_times_are_per_batch_means_and_rates() {
    assert!(StageTimes::from_stats(&RunStats::default(), 64).is_none());
    let s = RunStats {
        runs: 4,
        h2d_bytes: 4 * 50_000_000,
        h2d_ms: 4.0, // 200 MB in 4 ms
        d2h_bytes: 4 * 10_000_000,
        d2h_ms: 2.0,
        gemm_ms: 2.0,
        epilogue_ms: 0.4,
        host_stage_ms: 8.0,
        host_wait_ms: 1.0,
        host_drain_ms: 4.0,
        half_h_runs: 3,
        h_f32_reruns: 1,
        h2d_direct_bytes: 50_000_000,
        d2h_direct_bytes: 30_000_000,
        epilogue_kernel: Some("fusion_epilogue_vec16_f16"),
    };
    let t = StageTimes::from_stats(&s, 1000).expect("runs > 0");
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.abs().max(1.0);
    assert!(close(t.device_proj_ms, 0.5));
    assert!(close(t.device_head_ms, 0.6));
    assert!(close(t.device_head_over_proj, 1.2));
    assert!(close(t.device_samples_per_s, 1000.0 / 0.6e-3));
    assert!(close(t.h2d_gbps, 50.0));
    assert!(close(t.d2h_gbps, 20.0));
    assert!(close(t.h2d_direct_share, 0.25));
    assert!(close(t.d2h_direct_share, 0.75));
    assert!(close(t.host_stage_ms, 2.0));
    assert!(close(t.host_wait_ms, 0.25));
    assert!(close(t.host_drain_ms, 1.0));
    assert_eq!((t.half_h_runs, t.h_f32_reruns), (3, 1));
    assert_eq!(t.epilogue_kernel, Some("fusion_epilogue_vec16_f16"));
    // No copy timed: the rate is NaN, not a division by zero passed off as a number.
    let none = RunStats {
        runs: 1,
        ..RunStats::default()
    };
    assert!(StageTimes::from_stats(&none, 1)
        .expect("runs > 0")
        .h2d_gbps
        .is_nan());
}

#[test]
fn cpu_bench_reports_no_stage_times() {
    let head = std::sync::Arc::new(FusionHead::random(&[("a".into(), 8)], 4, 1e-5, 1));
    let mut b = crate::backend::open(
        crate::backend::BackendKind::Cpu,
        0,
        head,
        &crate::backend::OpenOptions::default(),
    )
    .expect("cpu opens");
    let r = bench_backend(&mut b, 16, DType::F32, 2, 1, InputMemory::Pageable).expect("bench");
    assert!(r.stages.is_none());
    let json = serde_json::to_string(&r).expect("json");
    assert!(!json.contains("device_head_ms"), "{json}");
}

/// A CPU backend whose every third `run` takes 20 ms longer: a host's slow spell.
struct Hiccups {
    inner: crate::backend::AnyBackend,
    runs: usize,
}

impl Backend for Hiccups {
    fn info(&self) -> &crate::backend::DeviceInfo {
        self.inner.info()
    }
    fn upload(&mut self, head: std::sync::Arc<FusionHead>) -> Result<()> {
        self.inner.upload(head)
    }
    fn head(&self) -> Option<&std::sync::Arc<FusionHead>> {
        self.inner.head()
    }
    fn run(
        &mut self,
        batch: &crate::batch::BatchRef<'_>,
        out: crate::batch::OutputsMut<'_>,
    ) -> Result<()> {
        self.runs += 1;
        if self.runs.is_multiple_of(3) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.inner.run(batch, out)
    }
}

#[test]
fn headline_is_throughput_with_slow_batches_counted_median_kept_apart() {
    let head = std::sync::Arc::new(FusionHead::random(&[("a".into(), 8)], 4, 1e-5, 1));
    let inner = crate::backend::open(
        crate::backend::BackendKind::Cpu,
        0,
        head,
        &crate::backend::OpenOptions::default(),
    )
    .expect("cpu opens");
    let mut b = Hiccups { inner, runs: 0 };
    // One warm-up run, then 9 timed runs back to back: 3 of them slow.
    let r = bench_backend(&mut b, 16, DType::F32, 9, 1, InputMemory::Pageable).expect("bench");
    assert!(r.ms_per_batch < 5.0, "median {}", r.ms_per_batch);
    assert!(
        r.mean_ms_per_batch >= 3.0 * 20.0 / 9.0,
        "{}",
        r.mean_ms_per_batch
    );
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(close(r.samples_per_s, 16.0 / (r.mean_ms_per_batch / 1e3)));
    assert!(close(r.median_samples_per_s, 16.0 / (r.ms_per_batch / 1e3)));
    assert!(r.samples_per_s * 2.0 < r.median_samples_per_s, "{r:?}");
    // No projections-only path here: no ratio pass.
    assert!(r.head_over_proj.is_none() && r.proj_ms_per_batch.is_none());
    assert_eq!(b.runs, 10);
}

/// Counts locks and unlocks of live ranges (locks nothing).
#[derive(Default)]
struct CountingLock {
    live: parking_lot::Mutex<Vec<(usize, usize)>>,
    locks: std::sync::atomic::AtomicUsize,
}

impl crate::backend::host_lock::HostPageLock for CountingLock {
    fn lock(&self, start: usize, len: usize) -> bool {
        self.live.lock().push((start, len));
        self.locks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        true
    }
    fn unlock(&self, start: usize, len: usize) {
        let mut live = self.live.lock();
        let at = live.iter().position(|&r| r == (start, len));
        assert!(at.is_some(), "unlock of a range not locked");
        live.retain(|&r| r != (start, len));
    }
}

/// A CPU backend that offers [`CountingLock`] and checks, on every run, that each input
/// lies in a locked range, and that both outputs do.
struct Locking {
    inner: crate::backend::AnyBackend,
    lock: std::sync::Arc<CountingLock>,
    runs_all_locked: usize,
    runs_out_locked: usize,
}

impl Backend for Locking {
    fn info(&self) -> &crate::backend::DeviceInfo {
        self.inner.info()
    }
    fn upload(&mut self, head: std::sync::Arc<FusionHead>) -> Result<()> {
        self.inner.upload(head)
    }
    fn head(&self) -> Option<&std::sync::Arc<FusionHead>> {
        self.inner.head()
    }
    fn run(
        &mut self,
        batch: &crate::batch::BatchRef<'_>,
        out: crate::batch::OutputsMut<'_>,
    ) -> Result<()> {
        let r = registry();
        if batch
            .inputs
            .iter()
            .all(|x| r.contains(x.bytes.as_ptr() as usize, x.bytes.len()))
        {
            self.runs_all_locked += 1;
        }
        if [&*out.fused, &*out.weights]
            .iter()
            .all(|v| r.contains(v.as_ptr() as usize, std::mem::size_of_val(*v)))
        {
            self.runs_out_locked += 1;
        }
        self.inner.run(batch, out)
    }
    fn page_lock(&self) -> Option<std::sync::Arc<dyn crate::backend::host_lock::HostPageLock>> {
        Some(self.lock.clone())
    }
}

fn cpu(head: std::sync::Arc<FusionHead>) -> crate::backend::AnyBackend {
    crate::backend::open(
        crate::backend::BackendKind::Cpu,
        0,
        head,
        &crate::backend::OpenOptions::default(),
    )
    .expect("cpu opens")
}

#[test]
fn pinned_inputs_are_locked_for_every_run_and_unlocked_after() {
    let head = std::sync::Arc::new(FusionHead::random(
        &[("a".into(), 8), ("b".into(), 3)],
        4,
        1e-5,
        1,
    ));
    let lock = std::sync::Arc::new(CountingLock::default());
    let mut b = Locking {
        inner: cpu(head),
        lock: lock.clone(),
        runs_all_locked: 0,
        runs_out_locked: 0,
    };
    let r = bench_backend(&mut b, 16, DType::F16, 3, 2, InputMemory::Pinned).expect("bench");
    assert_eq!(r.inputs, InputMemory::Pinned);
    assert!(serde_json::to_string(&r)
        .expect("json")
        .contains(r#""inputs":"pinned""#));
    // 2 warm-up and 3 timed runs, each with both matrices and both outputs locked.
    assert_eq!(b.runs_all_locked, 5);
    assert_eq!(b.runs_out_locked, 5);
    // Two matrices, the mask and the two outputs, each locked once and unlocked once the bench
    // is done.
    let locks = lock.locks.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(locks, 5);
    assert!(
        lock.live.lock().is_empty(),
        "left locked: {:?}",
        lock.live.lock()
    );

    let p = bench_backend(&mut b, 16, DType::F16, 3, 2, InputMemory::Pageable).expect("bench");
    assert_eq!(p.inputs, InputMemory::Pageable);
    assert_eq!(b.runs_all_locked, 5, "pageable inputs are not locked");
    assert_eq!(b.runs_out_locked, 5, "nor are the outputs");
}

#[test]
fn pinned_needs_a_backend_that_locks() {
    let head = std::sync::Arc::new(FusionHead::random(&[("a".into(), 8)], 4, 1e-5, 1));
    let mut b = cpu(head);
    let e = bench_backend(&mut b, 16, DType::F32, 2, 1, InputMemory::Pinned)
        .expect_err("the cpu backend locks nothing");
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    assert!(e.to_string().contains("--pinned: the cpu backend"), "{e}");
}
