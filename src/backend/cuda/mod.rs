//! CUDA backend over cudarc: cuBLAS projections and one fused epilogue kernel, with pinned,
//! double-buffered, overlapped copies.
//!
//! Nothing here assumes CUDA is installed. The driver, NVRTC and cuBLAS are loaded at run time
//! ([`libs`]); a missing library is a reason in `devices` and a typed
//! [`Error::BackendUnavailable`], never a panic.
//!
//! In flow order:
//! - [`libs`]: finding libnvrtc/libcublas (also in pip wheels) and the panic guard.
//! - [`device`]: discovery ([`device::GpuProperties`]) and context creation.
//! - [`kernels`]: `kernels/*.cu`, NVRTC compilation, per-device module cache, compile check.
//! - [`blas`]: the cuBLAS handle and the projection GEMM.
//! - [`mem`]: grow-only device and pinned buffers ([`mem::GrowOnly`]), events.
//! - [`weights`]: the head on the device.
//! - [`plan`]: chunk sizes, chunk byte layout, the dtype of `h`.
//! - [`epilogue_plan`]: which epilogue kernel runs (`FUSION_CUDA_EPILOGUE`), its launch shape.
//! - [`pinned`]: page-locking batch buffers in place, and the per-chunk copies that read them
//!   directly (docs/DESIGN.md section 6.7).
//! - [`pipeline`]: the chunked, double-buffered launch sequence ([`pipeline::Pipeline`]).
//! - `mod.rs` (here): [`CudaBackend`] over a boxed `CudaDevice` (context, streams, cuBLAS
//!   handle, kernels, pipeline, uploaded head).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::backend::api::{Backend, DeviceEntry, DeviceInfo, OpenOptions};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;

mod blas;
mod device;
mod epilogue_plan;
mod kernels;
mod libs;
mod mem;
mod pinned;
mod pinned_out;
mod pipeline;
mod plan;
mod weights;

pub use kernels::{compile_check, CompileReport, KernelSource, CHECK_ARCH, SOURCES};

/// Lists every CUDA GPU, or why CUDA cannot be used here.
pub fn discover() -> Vec<DeviceEntry> {
    device::discover()
}

fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason,
    }
}

fn device_error(reason: String) -> Error {
    Error::Device {
        backend: "cuda".into(),
        reason,
    }
}

/// One CUDA GPU with an uploaded head. Owned by one thread at a time; every call binds the
/// device's context to the calling thread first.
pub struct CudaBackend {
    info: DeviceInfo,
    /// Boxed: keeps `AnyBackend` small.
    device: Box<CudaDevice>,
}

/// The device state behind a [`CudaBackend`]: context, streams, cuBLAS handle, kernels, the
/// pipeline's buffers and the uploaded head.
struct CudaDevice {
    smem_limit: usize,
    /// The epilogue kernel `FUSION_CUDA_EPILOGUE` asks for (read at open).
    epilogue: epilogue_plan::EpilogueKind,
    // Field order is drop order: everything that lives in the context goes before the streams
    // and the context itself (and `Drop` synchronises first).
    head: Option<weights::DeviceHead>,
    pipeline: pipeline::Pipeline,
    blas: blas::Blas,
    kernels: Arc<kernels::Kernels>,
    h2d: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    d2h: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl CudaBackend {
    /// Opens GPU `index`: context, streams, cuBLAS handle, kernels (compiled by NVRTC for the
    /// GPU's architecture on first use, then cached).
    pub fn new(index: usize, opts: &OpenOptions) -> Result<CudaBackend> {
        let gpus = device::gpus().map_err(unavailable)?;
        let gpu = gpus
            .iter()
            .find(|g| g.ordinal == index)
            .cloned()
            .ok_or_else(|| unavailable(format!("no CUDA GPU {index} ({} found)", gpus.len())))?;
        let driver = device::driver_version().ok();
        device::check_libs(driver.map(|d| d.0)).map_err(unavailable)?;
        let ctx = device::context(index).map_err(unavailable)?;
        let stream = |what: &str| {
            libs::guard("cuStreamCreate", || {
                ctx.new_stream()
                    .map_err(|e| format!("creating the {what} stream: {e}"))
            })
            .map_err(unavailable)
        };
        let (h2d, compute, d2h) = (stream("upload")?, stream("compute")?, stream("download")?);
        let kernels = kernels::load(&ctx, index, gpu.cc)
            .map_err(|e| unavailable(format!("{} ({}): {e}", gpu.name, gpu.arch())))?;
        let blas = blas::Blas::new(compute.cu_stream(), opts.allow_tf32).map_err(unavailable)?;
        let pipeline = pipeline::Pipeline::new(&ctx).map_err(unavailable)?;
        let epilogue = epilogue_plan::EpilogueKind::from_env().map_err(Error::Config)?;
        Ok(CudaBackend {
            info: device::info(&gpu, driver),
            device: Box::new(CudaDevice {
                smem_limit: gpu.smem_per_block,
                epilogue,
                head: None,
                pipeline,
                blas,
                kernels,
                h2d,
                compute,
                d2h,
                ctx,
            }),
        })
    }
}

impl CudaDevice {
    fn streams(&self) -> pipeline::Streams {
        pipeline::Streams {
            h2d: self.h2d.cu_stream(),
            compute: self.compute.cu_stream(),
            d2h: self.d2h.cu_stream(),
        }
    }

    /// Waits for all three streams (after an error, so that buffers can be reused or freed).
    fn sync_all(&self) {
        for s in [&self.h2d, &self.compute, &self.d2h] {
            let _ = s.synchronize();
        }
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| device_error(format!("cuCtxSetCurrent: {e}")))
    }

    /// Runs `batch` (into `out`, or only the projections) with `h` as `path` says; returns the
    /// dtype `h` was written in.
    fn execute(
        &mut self,
        batch: &BatchRef<'_>,
        out: Option<OutputsMut<'_>>,
        path: plan::HPath,
    ) -> Result<crate::tensor::DType> {
        self.bind()?;
        let streams = self.streams();
        let dh = self
            .head
            .as_mut()
            .ok_or_else(|| Error::Config("no head uploaded to the cuda backend".into()))?;
        let r = libs::guard("cuda run", || {
            self.pipeline.run_chunks(
                dh,
                &mut self.blas,
                &self.kernels,
                streams,
                self.smem_limit,
                self.epilogue,
                batch,
                out,
                path,
            )
        });
        r.map_err(|reason| {
            self.sync_all();
            device_error(reason)
        })
    }

    fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        self.bind()?;
        // Runs end synchronised, but after an error queued work may still read the previous
        // head's buffers: wait before freeing them.
        self.sync_all();
        self.head = None;
        let dh = libs::guard("cuda upload", || {
            weights::DeviceHead::upload(&self.ctx, head)
        })
        .map_err(device_error)?;
        self.head = Some(dh);
        Ok(())
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Bind so that the buffers, events and handle are released in this context, and wait
        // for queued work that may still use them.
        let _ = self.ctx.bind_to_thread();
        self.sync_all();
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        self.device.upload(head)
    }

    fn head(&self) -> Option<&Arc<FusionHead>> {
        self.device.head.as_ref().map(|h| &h.head)
    }

    fn run(&mut self, batch: &BatchRef<'_>, out: OutputsMut<'_>) -> Result<()> {
        let head = self
            .head()
            .cloned()
            .ok_or_else(|| Error::Config("no head uploaded to the cuda backend".into()))?;
        // Shapes and mask here; non-finite values are caught on the device instead of by a
        // host pass over every input (which cost more than the whole head at B = 8192): the
        // epilogue turns a row whose present projections are not all finite (a NaN/Inf input,
        // an f32 overflow of the projection, or a half `h` at the top of its range) into NaN
        // attention weights, and the host looks only at the weights. After a run with half `h`
        // the batch is recomputed with f32 `h` (an f16 overflow costs time, not accuracy:
        // docs/DESIGN.md section 2.5); after an f32 run, that row's inputs give the precise error.
        batch.validate_shapes(&head)?;
        batch.validate_mask(0..batch.rows)?;
        out.check(&head, batch.rows)?;
        let m = head.num_modalities();
        let mut path = plan::HPath::from_env().map_err(Error::Config)?;
        // At most two passes: the second runs with `HPath::F32`, whose `h` is always f32.
        loop {
            let h = self.device.execute(
                batch,
                Some(OutputsMut {
                    fused: &mut *out.fused,
                    weights: &mut *out.weights,
                }),
                path,
            )?;
            let Some(i) = out.weights.iter().position(|w| !w.is_finite()) else {
                return Ok(());
            };
            if h == crate::tensor::DType::F32 {
                return Err(batch.non_finite_error(&head, i / m));
            }
            self.device.pipeline.stats.h_f32_reruns += 1;
            path = plan::HPath::F32;
        }
    }

    fn run_projections_only(&mut self, batch: &BatchRef<'_>) -> Result<bool> {
        let head = self
            .head()
            .cloned()
            .ok_or_else(|| Error::Config("no head uploaded to the cuda backend".into()))?;
        batch.validate_shapes(&head)?;
        let path = plan::HPath::from_env().map_err(Error::Config)?;
        self.device.execute(batch, None, path).map(|_| true)
    }

    fn take_run_stats(&mut self) -> Option<crate::backend::api::RunStats> {
        Some(std::mem::take(&mut self.device.pipeline.stats))
    }

    fn page_lock(&self) -> Option<Arc<dyn crate::backend::host_lock::HostPageLock>> {
        pinned::CudaPageLock::for_context(&self.device.ctx)
    }
}
