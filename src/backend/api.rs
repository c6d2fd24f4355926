//! The device boundary every backend implements: the [`Backend`] trait, the device families
//! ([`BackendKind`], [`BackendChoice`]), what a backend reports ([`DeviceInfo`], [`DeviceEntry`],
//! [`RunStats`]) and how it is opened ([`OpenOptions`]). Its own file so that the backends
//! (`cpu/`, `wgpu/`, `cuda/`) import it without importing `backend/mod.rs`, which names them.

use std::sync::Arc;

use super::host_lock::HostPageLock;
use crate::batch::{BatchRef, OutputsMut};
use crate::error::Result;
use crate::model::FusionHead;

/// Which family of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CUDA through cudarc.
    Cuda,
    /// WGSL through wgpu.
    Wgpu,
    /// Multithreaded CPU fallback.
    Cpu,
}

impl BackendKind {
    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Cuda => "cuda",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cpu => "cpu",
        }
    }

    /// All kinds in `auto` preference order.
    pub const ALL: [BackendKind; 3] = [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu];
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend choice on the command line or in config: a kind, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Best available: CUDA, then a hardware wgpu adapter, then the CPU.
    Auto,
    /// This kind only.
    Kind(BackendKind),
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Kind(BackendKind::Cpu)),
            "wgpu" => Ok(BackendChoice::Kind(BackendKind::Wgpu)),
            "cuda" => Ok(BackendChoice::Kind(BackendKind::Cuda)),
            o => Err(format!(
                "unknown backend {o:?} (expected auto, cpu, wgpu or cuda)"
            )),
        }
    }
}

/// Description of a usable device.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeviceInfo {
    /// Backend family.
    pub kind: BackendKind,
    /// Index among that backend's devices.
    pub index: usize,
    /// Device name (GPU model, adapter name, CPU model).
    pub name: String,
    /// Free-form details: driver, compute capability, memory, threads.
    pub detail: String,
    /// True for a hardware accelerator; false for the CPU and software rasterisers (lavapipe),
    /// which `auto` does not prefer over the CPU backend.
    pub accelerator: bool,
}

impl DeviceInfo {
    /// `kind:index`, e.g. `cuda:0`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.kind, self.index)
    }
}

/// One entry of [`discover`](super::discover): a usable device, or a reason.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceEntry {
    /// Backend family.
    pub kind: BackendKind,
    /// The device when usable.
    pub device: Option<DeviceInfo>,
    /// Why this backend (or device) cannot be used, when it cannot.
    pub unavailable: Option<String>,
}

/// Options for opening a device.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// CPU worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Allow TF32 tensor-core math for f32 on CUDA (off by default: the tolerances of docs/DESIGN.md section 2.4 need f32).
    pub allow_tf32: bool,
}

/// Where a backend's time went over the whole-head runs since the last
/// [`Backend::take_run_stats`]: device times from GPU timing events, host times from the host
/// clock. Backends that keep none (the CPU) return `None`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RunStats {
    /// Whole-head runs counted.
    pub runs: u64,
    /// Bytes copied host -> device, and the device time of those copies (ms).
    pub h2d_bytes: u64,
    pub h2d_ms: f64,
    /// Bytes copied device -> host, and the device time of those copies (ms).
    pub d2h_bytes: u64,
    pub d2h_ms: f64,
    /// Device time of the projection GEMMs (ms).
    pub gemm_ms: f64,
    /// Device time of the fused epilogue (ms).
    pub epilogue_ms: f64,
    /// Host time spent copying inputs into staging memory (ms).
    pub host_stage_ms: f64,
    /// Host time spent waiting for the device (ms).
    pub host_wait_ms: f64,
    /// Host time spent copying results out of staging memory (ms).
    pub host_drain_ms: f64,
    /// CUDA: runs (of `runs`) whose projections were written in the inputs' half dtype
    /// (docs/DESIGN.md section 2.5).
    pub half_h_runs: u64,
    /// CUDA: batches recomputed with f32 projections after their half projections overflowed
    /// (each also counted in `runs`).
    pub h_f32_reruns: u64,
    /// CUDA: bytes of `h2d_bytes` the device copied straight from page-locked batch memory
    /// (no host staging copy; docs/DESIGN.md section 6.7).
    pub h2d_direct_bytes: u64,
    /// CUDA: bytes of `d2h_bytes` the device wrote straight into page-locked output memory
    /// (no host drain copy; docs/DESIGN.md section 6.7).
    pub d2h_direct_bytes: u64,
    /// CUDA: the epilogue kernel of the last run (`FUSION_CUDA_EPILOGUE` picks among them).
    pub epilogue_kernel: Option<&'static str>,
}

/// One opened device with an uploaded head.
pub trait Backend: Send {
    /// The device.
    fn info(&self) -> &DeviceInfo;

    /// Uploads a head's weights (once; replaces any head uploaded before).
    fn upload(&mut self, head: Arc<FusionHead>) -> Result<()>;

    /// The uploaded head, if any.
    fn head(&self) -> Option<&Arc<FusionHead>>;

    /// Runs a batch into `out` (`fused` `[B, D]`, `weights` `[B, M]`). Bad input (shapes, mask,
    /// a non-finite present value, a projection that overflows f32) is a typed error, never a
    /// non-finite result; shapes and mask are checked before any work, non-finite values either
    /// before (wgpu) or from the results (cpu, cuda: cheaper than scanning every input), so on
    /// an error the contents of `out` are unspecified. Returns when the outputs are written.
    fn run(&mut self, batch: &BatchRef<'_>, out: OutputsMut<'_>) -> Result<()>;

    /// Benchmark hook: runs only the head's projection GEMMs for `batch` through the same GEMM
    /// path as `run` (no epilogue), returning `Ok(false)` when the backend does not offer it.
    fn run_projections_only(&mut self, batch: &BatchRef<'_>) -> Result<bool> {
        let _ = batch;
        Ok(false)
    }

    /// Benchmark hook: the [`RunStats`] of the whole-head runs since the last call (and resets
    /// them), or `None` when the backend keeps none.
    fn take_run_stats(&mut self) -> Option<RunStats> {
        None
    }

    /// How this device page-locks host memory in place, when its uploads copy faster from
    /// page-locked memory (CUDA): the engine's batch buffer pool locks the buffers it recycles
    /// with it, and a run reads a batch matrix that lies in locked memory straight from there
    /// (docs/DESIGN.md section 6.7). `None` (the default): the device gains nothing from it.
    fn page_lock(&self) -> Option<Arc<dyn HostPageLock>> {
        None
    }
}
