//! The device boundary.
//!
//! A [`Backend`] is one opened device holding one uploaded fusion head. It is owned by exactly
//! one thread (an engine worker, the CLI) and runs batches synchronously into caller-provided
//! outputs. [`AnyBackend`] is the closed enum the rest of the crate uses, so the hot path has no
//! trait objects. [`discover`] lists every device of every compiled-in backend, with the reason
//! for each one that cannot be used.
//!
//! In flow order:
//! - `api.rs`: the [`Backend`] trait and what a backend reports ([`DeviceInfo`], [`DeviceEntry`],
//!   [`RunStats`]), device families ([`BackendKind`], [`BackendChoice`]), [`OpenOptions`].
//! - `mod.rs` (here): [`AnyBackend`], [`discover`], [`open`], [`open_choice`].
//! - [`cpu`]: the multithreaded CPU fallback (`gemm` projections, fused per-row-block epilogue).
//! - [`wgpu`]: WGSL compute shaders on any wgpu adapter (Vulkan, Metal, DX12, GL; lavapipe).
//! - [`cuda`]: cuBLAS projections and a fused epilogue kernel, chunked and double-buffered.
//! - [`host_lock`]: page-locked batch memory, which a device's uploads read without staging.

use std::sync::Arc;

use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;

mod api;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host_lock;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use api::{
    Backend, BackendChoice, BackendKind, DeviceEntry, DeviceInfo, OpenOptions, RunStats,
};

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
    fn page_lock(&self) -> Option<Arc<dyn host_lock::HostPageLock>> {
        dispatch!(self, b => b.page_lock())
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
