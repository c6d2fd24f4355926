//! The device boundary.
//!
//! A [`Backend`] is one opened device holding one uploaded fusion head. It is owned by exactly
//! one thread (an engine worker, the CLI) and runs batches synchronously into caller-provided
//! outputs. [`AnyBackend`] is the closed enum the rest of the crate uses, so the hot path has no
//! trait objects. [`discover`] lists every device of every compiled-in backend, with the reason
//! for each one that cannot be used.

use std::sync::Arc;

use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

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

/// One entry of [`discover`]: a usable device, or a reason.
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
    /// Allow TF32 tensor-core math for f32 on CUDA (off by default: SPEC accuracy needs f32).
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
}

/// The closed set of backends.
pub enum AnyBackend {
    /// CPU.
    Cpu(cpu::CpuBackend),
    /// wgpu.
    #[cfg(feature = "wgpu")]
    Wgpu(wgpu::WgpuBackend),
    /// CUDA.
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaBackend),
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Cpu($b) => $e,
            #[cfg(feature = "wgpu")]
            AnyBackend::Wgpu($b) => $e,
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda($b) => $e,
        }
    };
}

impl Backend for AnyBackend {
    fn info(&self) -> &DeviceInfo {
        dispatch!(self, b => b.info())
    }
    fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        dispatch!(self, b => b.upload(head))
    }
    fn head(&self) -> Option<&Arc<FusionHead>> {
        dispatch!(self, b => b.head())
    }
    fn run(&mut self, batch: &BatchRef<'_>, out: OutputsMut<'_>) -> Result<()> {
        dispatch!(self, b => b.run(batch, out))
    }
    fn run_projections_only(&mut self, batch: &BatchRef<'_>) -> Result<bool> {
        dispatch!(self, b => b.run_projections_only(batch))
    }
    fn take_run_stats(&mut self) -> Option<RunStats> {
        dispatch!(self, b => b.take_run_stats())
    }
}

/// Lists the devices of every backend, usable or not (with the reason), in `auto` order.
pub fn discover() -> Vec<DeviceEntry> {
    let mut out = Vec::new();
    for kind in BackendKind::ALL {
        out.extend(discover_kind(kind));
    }
    out
}

/// Devices of one backend.
pub fn discover_kind(kind: BackendKind) -> Vec<DeviceEntry> {
    match kind {
        BackendKind::Cpu => vec![DeviceEntry {
            kind,
            device: Some(cpu::device_info(0, None)),
            unavailable: None,
        }],
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => wgpu::discover(),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => cuda::discover(),
        #[allow(unreachable_patterns)]
        other => vec![DeviceEntry {
            kind: other,
            device: None,
            unavailable: Some(format!(
                "not compiled in (build with the `{}` cargo feature)",
                other.name()
            )),
        }],
    }
}

/// Opens device `index` of `kind` and uploads `head`.
pub fn open(
    kind: BackendKind,
    index: usize,
    head: Arc<FusionHead>,
    opts: &OpenOptions,
) -> Result<AnyBackend> {
    let mut b = match kind {
        BackendKind::Cpu => AnyBackend::Cpu(cpu::CpuBackend::new(index, opts.threads)?),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => AnyBackend::Wgpu(wgpu::WgpuBackend::new(index, opts)?),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => AnyBackend::Cuda(cuda::CudaBackend::new(index, opts)?),
        #[allow(unreachable_patterns)]
        other => {
            return Err(Error::BackendUnavailable {
                backend: other.name().into(),
                reason: format!(
                    "not compiled in (build with the `{}` cargo feature)",
                    other.name()
                ),
            })
        }
    };
    b.upload(head)?;
    Ok(b)
}

/// Opens the first device of a choice. For `auto`: the first usable CUDA device, then the first
/// hardware wgpu adapter, then the CPU; reasons for skipped backends are logged.
pub fn open_choice(
    choice: BackendChoice,
    head: Arc<FusionHead>,
    opts: &OpenOptions,
) -> Result<AnyBackend> {
    match choice {
        BackendChoice::Kind(kind) => {
            let entries = discover_kind(kind);
            match entries.iter().find_map(|e| e.device.as_ref()) {
                Some(d) => open(kind, d.index, head, opts),
                None => Err(Error::BackendUnavailable {
                    backend: kind.name().into(),
                    reason: entries
                        .iter()
                        .filter_map(|e| e.unavailable.clone())
                        .collect::<Vec<_>>()
                        .join("; "),
                }),
            }
        }
        BackendChoice::Auto => {
            for e in discover() {
                match (&e.device, &e.unavailable) {
                    (Some(d), _) if d.accelerator || d.kind == BackendKind::Cpu => {
                        match open(d.kind, d.index, head.clone(), opts) {
                            Ok(b) => return Ok(b),
                            Err(err) => {
                                tracing::warn!(device = %d.id(), error = %err, "auto: skipping device")
                            }
                        }
                    }
                    (Some(d), _) => {
                        tracing::debug!(device = %d.id(), "auto: skipping software adapter")
                    }
                    (None, Some(reason)) => {
                        tracing::debug!(backend = %e.kind, %reason, "auto: backend unavailable")
                    }
                    (None, None) => {}
                }
            }
            Err(Error::BackendUnavailable {
                backend: "auto".into(),
                reason: "no device could be opened".into(),
            })
        }
    }
}
