//! Adapter discovery: one wgpu instance over the backends the environment selects
//! (`WGPU_BACKEND`, e.g. `vulkan` or `vulkan,gl`; all native backends when unset), every adapter
//! it finds described as a [`DeviceEntry`], and the checks an adapter must pass to run the
//! kernels. Nothing here panics when a driver is missing: no adapter is a reason, not an error.

use crate::backend::api::{BackendKind, DeviceEntry, DeviceInfo};

use super::choice::{env_choices, KERNEL_ENV, TILE_ENV};
use super::device::coop_f16_16;
use super::kernels::{Path, Tile, EPILOGUE_THREADS, PROJ_THREADS, PROJ_WG_DIM, SHARED_BYTES};

/// Storage buffers bound by the widest kernel (the projection GEMM).
const STORAGE_BUFFERS: u32 = 6;

/// The process's wgpu instances, one per backend set, and the right to use them: held while
/// discovering adapters and while opening a device (instance, adapter, device, kernels).
///
/// One instance per backend set, created once, because a fresh instance per open made NVIDIA's
/// Vulkan driver stop listing its GPU after about 14 of them in one process (then discovery fell
/// back to GL and failed); one holder at a time, because opening devices from four threads at
/// once crashed (fresh instances) or hung (shared ones) there (an H200, docs/PERF.md sessions 5
/// and 6). An instance keeps the environment's settings of when it was first needed.
pub(super) struct Discovery(std::sync::MutexGuard<'static, Vec<(wgpu::Backends, wgpu::Instance)>>);

/// Waits for the [`Discovery`] lock.
pub(super) fn open_lock() -> Discovery {
    static INSTANCES: std::sync::Mutex<Vec<(wgpu::Backends, wgpu::Instance)>> =
        std::sync::Mutex::new(Vec::new());
    // A panic while the lock was held cannot leave the list half-updated (one push), so a
    // poisoned lock still holds a valid list.
    Discovery(INSTANCES.lock().unwrap_or_else(|p| p.into_inner()))
}

impl Discovery {
    /// The instance over `backends` (plus the rest of the environment's instance settings).
    fn instance_for(&mut self, backends: wgpu::Backends) -> wgpu::Instance {
        if let Some((_, i)) = self.0.iter().find(|(b, _)| *b == backends) {
            return i.clone();
        }
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = backends;
        let instance = wgpu::Instance::new(desc);
        self.0.push((backends, instance.clone()));
        instance
    }

    /// The instance and its adapters, in a stable order (the order `devices` lists them in).
    ///
    /// `WGPU_BACKEND` decides the backends when set. Unset, the native APIs (Vulkan, Metal,
    /// DX12) are tried first and GL only when they find nothing: GL usually reaches the same GPU
    /// a second time, and merely initialising it (EGL) makes Mesa print warnings on headless
    /// machines.
    pub(super) fn instance_and_adapters(&mut self) -> (wgpu::Instance, Vec<wgpu::Adapter>) {
        if let Some(backends) = wgpu::Backends::from_env() {
            let instance = self.instance_for(backends);
            let adapters = enumerate(&instance, backends);
            return (instance, adapters);
        }
        let instance = self.instance_for(wgpu::Backends::PRIMARY);
        let adapters = enumerate(&instance, wgpu::Backends::PRIMARY);
        if !adapters.is_empty() {
            return (instance, adapters);
        }
        let instance = self.instance_for(wgpu::Backends::SECONDARY);
        let adapters = enumerate(&instance, wgpu::Backends::SECONDARY);
        (instance, adapters)
    }
}

/// Every adapter of `instance` over `backends` (the no-op backend excluded).
fn enumerate(instance: &wgpu::Instance, backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .filter(|a| a.get_info().backend != wgpu::Backend::Noop)
        .collect()
}

/// Why no adapter was found, naming the environment that decides it.
pub(super) fn no_adapter_reason() -> String {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "unset".into());
    let backend = std::env::var("WGPU_BACKEND").ok();
    if let Some(b) = &backend {
        if wgpu::Backends::from_comma_list(b).is_empty() {
            return format!(
                "WGPU_BACKEND={b:?} selects no backend (expected a comma list of vulkan, metal, dx12, gl)"
            );
        }
    }
    format!(
        "no wgpu adapter found (Vulkan/GL drivers missing? WGPU_BACKEND={}, VK_DRIVER_FILES={}, VK_ICD_FILENAMES={})",
        backend.unwrap_or_else(|| "unset".into()),
        var("VK_DRIVER_FILES"),
        var("VK_ICD_FILENAMES"),
    )
}

/// Device descriptions of all `adapters`, by index.
///
/// The GL backend often reaches the same GPU as Vulkan/Metal/DX12 a second time; when a native
/// hardware adapter exists, GL adapters are listed but not marked as accelerators, so `auto` and
/// the benches do not drive one GPU through two APIs.
pub(super) fn device_infos(adapters: &[wgpu::Adapter]) -> Vec<DeviceInfo> {
    let native_gpu = adapters.iter().any(|a| {
        let i = a.get_info();
        i.backend != wgpu::Backend::Gl && i.device_type != wgpu::DeviceType::Cpu
    });
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut info = device_info(i, a);
            if native_gpu && a.get_info().backend == wgpu::Backend::Gl && info.accelerator {
                info.accelerator = false;
                info.detail
                    .push_str(", GL twin of a native adapter (not used by auto)");
            }
            info
        })
        .collect()
}

/// The device description of adapter `index` on its own.
fn device_info(index: usize, adapter: &wgpu::Adapter) -> DeviceInfo {
    let info = adapter.get_info();
    let f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => "discrete GPU",
        wgpu::DeviceType::IntegratedGpu => "integrated GPU",
        wgpu::DeviceType::VirtualGpu => "virtual GPU",
        wgpu::DeviceType::Cpu => "software (CPU)",
        wgpu::DeviceType::Other => "other",
    };
    let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
        (true, true) => "driver unknown".to_string(),
        (false, true) => format!("driver {}", info.driver),
        (true, false) => format!("driver {}", info.driver_info),
        (false, false) => format!("driver {} ({})", info.driver, info.driver_info),
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    let coop = f16 && coop_f16_16(adapter);
    let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
    DeviceInfo {
        kind: BackendKind::Wgpu,
        index,
        name: info.name.clone(),
        detail: format!(
            "{}, {kind}, {driver}, shader-f16 {}, coop-matrix f16 16x16 {}, timestamps {}; {}",
            info.backend,
            yes(f16),
            yes(coop),
            yes(timestamps),
            path_line(f16, coop, Tile::Large.fits(&adapter.limits())),
        ),
        accelerator: info.device_type != wgpu::DeviceType::Cpu,
    }
}

/// Which projection path and tile a device with these capabilities uses under the current
/// environment (`FUSION_WGPU_KERNEL`, `FUSION_WGPU_TILE`).
fn path_line(f16: bool, coop: bool, large_ok: bool) -> String {
    let (tile, choice) = match env_choices() {
        Ok(c) => c,
        Err(e) => return format!("path: invalid environment ({e})"),
    };
    let (path, fallback) = Path::resolve(choice, f16, coop);
    let tiles = match (path, tile) {
        (Path::Coop, _) => "workgroup tile 32x32 of 16x16x16 fragments".to_string(),
        (_, Some(Tile::Large)) if !large_ok => format!(
            "tile {} ({TILE_ENV} asks for {}, beyond this adapter's limits)",
            Tile::Small.shape(),
            Tile::Large.shape()
        ),
        (_, Some(t)) => format!("tile {} ({TILE_ENV})", t.shape()),
        (_, None) if large_ok => format!(
            "tile {} (< 512 rows or D < 256), else {}",
            Tile::Small.shape(),
            Tile::Large.shape()
        ),
        (_, None) => format!("tile {}", Tile::Small.shape()),
    };
    let why = fallback.map_or(String::new(), |w| format!(" [{KERNEL_ENV}: {w}]"));
    format!("path {}, {tiles}{why}", path.name())
}

/// Checks that the adapter can run the kernels; the reason when it cannot.
pub(super) fn check(adapter: &wgpu::Adapter) -> Result<(), String> {
    let caps = adapter.get_downlevel_capabilities();
    if !caps.flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS) {
        return Err("adapter has no compute shaders".into());
    }
    let l = adapter.limits();
    let need = [
        (
            "max_compute_invocations_per_workgroup",
            l.max_compute_invocations_per_workgroup,
            PROJ_THREADS.max(EPILOGUE_THREADS),
        ),
        (
            "max_compute_workgroup_size_x",
            l.max_compute_workgroup_size_x,
            EPILOGUE_THREADS.max(PROJ_WG_DIM),
        ),
        (
            "max_compute_workgroup_size_y",
            l.max_compute_workgroup_size_y,
            PROJ_WG_DIM,
        ),
        (
            "max_compute_workgroup_storage_size",
            l.max_compute_workgroup_storage_size,
            SHARED_BYTES,
        ),
        (
            "max_storage_buffers_per_shader_stage",
            l.max_storage_buffers_per_shader_stage,
            STORAGE_BUFFERS,
        ),
    ];
    for (name, have, want) in need {
        if have < want {
            return Err(format!(
                "adapter limit {name} is {have}, the kernels need {want}"
            ));
        }
    }
    Ok(())
}

/// Lists every adapter; one entry with the reason when there is none.
pub fn discover() -> Vec<DeviceEntry> {
    let mut discovery = open_lock();
    let (_instance, adapters) = discovery.instance_and_adapters();
    if adapters.is_empty() {
        return vec![DeviceEntry {
            kind: BackendKind::Wgpu,
            device: None,
            unavailable: Some(no_adapter_reason()),
        }];
    }
    adapters
        .iter()
        .zip(device_infos(&adapters))
        .enumerate()
        .map(|(i, (a, info))| match check(a) {
            Ok(()) => DeviceEntry {
                kind: BackendKind::Wgpu,
                device: Some(info),
                unavailable: None,
            },
            Err(reason) => DeviceEntry {
                kind: BackendKind::Wgpu,
                device: None,
                unavailable: Some(format!(
                    "wgpu:{i} {} ({}): {reason}",
                    info.name, info.detail
                )),
            },
        })
        .collect()
}
