//! A device worker: one OS thread that opens its device (so the backend's state is created on,
//! and owned by, this thread alone), then pulls batches from its bounded queue and runs them
//! synchronously, with injected faults applied first and panics caught.
//!
//! The worker exits when its queue disconnects (shutdown, or its device was marked FAILED and
//! a new generation started), after a device error or panic (the core restarts the device with
//! a fresh backend), or when the core tells it it has been abandoned (a hang: its late result
//! is discarded).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::core::{Core, Work};
use super::fault::Injected;
use crate::backend::{self, AnyBackend, Backend, OpenOptions};
use crate::batch::{Batch, Outputs};
use crate::error::Error;

/// How a run ended, as the worker reports it to [`Core::complete`]: the outputs, or the failure
/// kind (`"device"`, `"panic"`) and the error.
pub(crate) type RunResult = std::result::Result<Outputs, (&'static str, Error)>;

/// The worker thread's body.
pub(crate) fn worker_loop(core: Arc<Core>, d: usize, gen: u64, rx: Receiver<Work>) {
    let dev = &core.devices[d];
    let opts = OpenOptions {
        threads: dev.spec.threads,
        allow_tf32: core.cfg.allow_tf32,
    };
    let opened = catch_unwind(AssertUnwindSafe(|| {
        backend::open(dev.spec.kind, dev.index, Arc::clone(&core.head), &opts)
    }))
    .unwrap_or_else(|p| {
        Err(Error::Device {
            backend: dev.name.clone(),
            reason: format!("panicked while opening: {}", panic_message(&*p)),
        })
    });
    let mut be = match opened {
        Ok(be) => {
            // A device that copies faster from and into page-locked memory: the batch
            // buffers and the recycled outputs are locked from now on (docs/DESIGN.md
            // section 6.7).
            if let Some(lock) = be.page_lock() {
                core.buffers.set_page_lock(lock.clone());
                core.outputs.set_page_lock(lock);
            }
            if !core.worker_opened(d, gen, Ok(be.info().accelerator)) {
                return;
            }
            be
        }
        Err(e) => {
            core.worker_opened(d, gen, Err(e));
            return;
        }
    };
    while let Ok(Work { job, gen: g }) = rx.recv() {
        if g != gen || !core.begin(d, gen, job.id) {
            continue;
        }
        let t = Instant::now();
        let res = run_one(&mut be, &core, d, &job.batch);
        let elapsed = t.elapsed();
        if let Some(s) = be.take_run_stats() {
            dev.metrics.record_run(&s);
        }
        if !core.complete(d, gen, job.id, res, elapsed) {
            return;
        }
    }
}

/// Runs one batch: injected faults first, then the backend, with panics caught.
fn run_one(be: &mut AnyBackend, core: &Core, d: usize, batch: &Batch) -> RunResult {
    let dev = &core.devices[d];
    match dev.faults.draw() {
        Injected::Fail => {
            return Err((
                "device",
                Error::Device {
                    backend: dev.name.clone(),
                    reason: "injected fault".into(),
                },
            ))
        }
        Injected::Hang(t) => {
            tracing::debug!(device = %dev.name, secs = t.as_secs_f64(), "injected hang");
            std::thread::sleep(t);
        }
        Injected::Run { delay } => {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
        }
    }
    let mut out = core.outputs_for(batch.rows);
    let e = match catch_unwind(AssertUnwindSafe(|| be.run(&batch.view(), out.as_mut()))) {
        Ok(Ok(())) => return Ok(out),
        Ok(Err(e)) => ("device", e),
        Err(p) => (
            "panic",
            Error::Device {
                backend: dev.name.clone(),
                reason: format!("panicked: {}", panic_message(&*p)),
            },
        ),
    };
    // The outputs go back to the pool rather than being dropped, so that a locked pair is not
    // freed while locked (the backend has returned: the CUDA backend synchronises its streams
    // before it returns an error, so no copy into `out` is pending).
    core.recycle(out);
    Err(e)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;
    use crate::engine::config::{DeviceSpec, EngineConfig};
    use crate::engine::core::Device;
    use crate::engine::fault::Faults;
    use crate::engine::metrics::DeviceMetrics;
    use crate::model::FusionHead;
    use crate::tensor::{DType, HostMat};

    #[test]
    fn a_failed_runs_outputs_go_back_to_the_pool() {
        let head = Arc::new(FusionHead::random(&[("a".into(), 8)], 4, 1e-5, 1));
        let spec = DeviceSpec::parse_list("cpu").expect("spec").remove(0);
        let dev = Device {
            name: "cpu:0".into(),
            faults: Faults::new(&spec.faults, std::time::Duration::from_secs(1)),
            metrics: DeviceMetrics::new("cpu:0"),
            spec: spec.clone(),
            index: 0,
        };
        let core = Core::new(
            EngineConfig::with_devices(vec![spec]),
            head.clone(),
            vec![dev],
        );
        let mut be =
            backend::open(BackendKind::Cpu, 0, head, &OpenOptions::default()).expect("cpu opens");
        let rows = 3;
        let batch = |x: &[f32]| Batch {
            rows,
            inputs: vec![HostMat {
                dtype: DType::F32,
                rows,
                cols: 8,
                bytes: bytemuck::cast_slice(x).to_vec().into(),
            }],
            mask: vec![1; rows],
        };
        let mut x = vec![0.5f32; rows * 8];
        x[9] = f32::NAN; // a present value: the run is refused
        let r = run_one(&mut be, &core, 0, &batch(&x));
        assert!(matches!(r, Err(("device", _))), "{:?}", r.err());
        assert_eq!(core.outputs.spare(), 1, "the failed run's outputs are back");
        x[9] = 0.25;
        let out = run_one(&mut be, &core, 0, &batch(&x)).map_err(|(w, e)| format!("{w}: {e}"));
        let out = out.expect("a good batch runs");
        assert_eq!((out.fused.len(), out.weights.len()), (rows * 4, rows));
        assert!(
            out.weights.iter().all(|&w| (w - 1.0).abs() < 1e-6),
            "one modality: weight 1"
        );
        assert_eq!(core.outputs.spare(), 0, "and reused by the next run");
    }
}
