//! The CPU as a device: its description (model name, threads, SIMD level) and default thread
//! count.

use crate::backend::api::{BackendKind, DeviceInfo};

/// Device description of the CPU backend.
pub fn device_info(index: usize, threads: Option<usize>) -> DeviceInfo {
    let threads = threads.unwrap_or_else(default_threads);
    DeviceInfo {
        kind: BackendKind::Cpu,
        index,
        name: cpu_model(),
        detail: format!("{threads} threads, gemm {}", simd_level()),
        accelerator: false,
    }
}

/// Worker threads when none are configured: every core.
pub(super) fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The CPU's model name (`/proc/cpuinfo`), or the architecture.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The widest SIMD level the `gemm` crate dispatches to here.
fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
        "sse2"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "portable"
    }
}
