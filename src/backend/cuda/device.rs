//! GPU discovery and the context guard: every driver call of discovery and context creation runs
//! only after the driver library was found, and under [`guard`] so that a missing symbol becomes
//! a reason instead of a panic.

use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{result as dr, CudaContext};

use super::libs::{self, guard, Lib};
use crate::backend::api::{BackendKind, DeviceEntry, DeviceInfo};

/// What discovery learnt about one GPU.
#[derive(Debug, Clone)]
pub(crate) struct GpuProperties {
    /// Driver ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    /// Total memory in bytes.
    pub mem: usize,
    /// Streaming multiprocessors.
    pub sms: i32,
    /// Largest shared memory per block without opt-in, in bytes.
    pub smem_per_block: usize,
}

impl GpuProperties {
    /// `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }
}

/// The installed driver's CUDA version as (major, minor), e.g. (12, 4).
pub(crate) fn driver_version() -> Result<(u32, u32), String> {
    libs::driver()?;
    guard("cuDriverGetVersion", || {
        let mut v: std::ffi::c_int = 0;
        // SAFETY: cuDriverGetVersion writes one int to a valid pointer; it needs no cuInit.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(|e| format!("cuDriverGetVersion: {e}"))?;
        Ok(((v / 1000) as u32, ((v % 1000) / 10) as u32))
    })
}

/// Lists the GPUs the driver sees, or why none can be listed.
pub(crate) fn gpus() -> Result<Vec<GpuProperties>, String> {
    libs::driver()?;
    guard("libcuda", || {
        dr::init().map_err(|e| format!("cuInit failed: {e} (driver present, no usable GPU)"))?;
        let n = dr::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
        let mut out = Vec::new();
        for ordinal in 0..n.max(0) {
            let dev =
                dr::device::get(ordinal).map_err(|e| format!("cuDeviceGet({ordinal}): {e}"))?;
            let attr = |a: Attr| {
                // SAFETY: `dev` was returned by cuDeviceGet above.
                unsafe { dr::device::get_attribute(dev, a) }
                    .map_err(|e| format!("cuDeviceGetAttribute({a:?}): {e}"))
            };
            let cc = (
                attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            );
            let sms = attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            let smem = attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?;
            // SAFETY: `dev` was returned by cuDeviceGet above.
            let mem = unsafe { dr::device::total_mem(dev) }
                .map_err(|e| format!("cuDeviceTotalMem: {e}"))?;
            let name = dr::device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {e}"))?;
            out.push(GpuProperties {
                ordinal: ordinal as usize,
                name,
                cc,
                mem,
                sms,
                smem_per_block: smem.max(0) as usize,
            });
        }
        Ok(out)
    })
}

/// Checks that NVRTC and cuBLAS can be loaded (for a driver of `driver_major`).
pub(crate) fn check_libs(driver_major: Option<u32>) -> Result<(), String> {
    libs::ensure(Lib::Nvrtc, driver_major)?;
    libs::ensure(Lib::Cublas, driver_major)?;
    Ok(())
}

/// Device description for a GPU.
pub(crate) fn info(gpu: &GpuProperties, driver: Option<(u32, u32)>) -> DeviceInfo {
    let drv = driver.map_or(String::new(), |(a, b)| format!(", driver CUDA {a}.{b}"));
    DeviceInfo {
        kind: BackendKind::Cuda,
        index: gpu.ordinal,
        name: gpu.name.clone(),
        detail: format!(
            "compute capability {}.{}, {:.1} GiB, {} SMs{drv}",
            gpu.cc.0,
            gpu.cc.1,
            gpu.mem as f64 / (1u64 << 30) as f64,
            gpu.sms
        ),
        accelerator: true,
    }
}

/// Every GPU as a device entry; a GPU whose libraries are missing is listed with the reason.
pub(crate) fn discover() -> Vec<DeviceEntry> {
    let unavailable = |reason: String| DeviceEntry {
        kind: BackendKind::Cuda,
        device: None,
        unavailable: Some(reason),
    };
    let gpus = match gpus() {
        Ok(g) if g.is_empty() => {
            return vec![unavailable(
                "driver found, but it reports no CUDA GPU".into(),
            )]
        }
        Ok(g) => g,
        Err(reason) => return vec![unavailable(reason)],
    };
    let driver = driver_version().ok();
    let libs = check_libs(driver.map(|d| d.0));
    gpus.iter()
        .map(|g| match &libs {
            Ok(()) => DeviceEntry {
                kind: BackendKind::Cuda,
                device: Some(info(g, driver)),
                unavailable: None,
            },
            Err(reason) => unavailable(format!("cuda:{} {}: {reason}", g.ordinal, g.name)),
        })
        .collect()
}

/// Retains the primary context of GPU `ordinal` (the one cuBLAS and other runtime users share).
pub(crate) fn context(ordinal: usize) -> Result<Arc<CudaContext>, String> {
    libs::driver()?;
    guard("cuda context", || {
        CudaContext::new(ordinal)
            .map_err(|e| format!("cannot create a context on GPU {ordinal}: {e}"))
    })
}
