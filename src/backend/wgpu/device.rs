//! One opened adapter: the device and queue, the features and limits the kernels run under, and
//! an error sink. wgpu reports validation errors, out-of-memory and device loss through
//! callbacks (its default handler panics); here they are recorded and turned into typed
//! [`Error::Device`] values at the next synchronisation point.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

/// Longest wait for one submission before the device is reported as hung.
const WAIT_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest byte size used for one binding: the adapter's limit, capped so that every element
/// index of an f32 array fits in a u32 with room to spare.
const BINDING_CAP: u64 = 1 << 31;

/// The device, its queue, and what it can do.
pub(super) struct WgpuDevice {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    /// SHADER_F16 was granted: f16 inputs stay f16 in storage.
    pub(super) f16: bool,
    /// TIMESTAMP_QUERY was granted: the GEMM and epilogue passes are timed on the device.
    pub(super) timestamps: bool,
    /// The experimental cooperative-matrix feature was granted and the adapter reports f16
    /// 16 x 16 x 16 matrices with an f32 accumulator.
    pub(super) coop: bool,
    /// Subgroup size the cooperative-matrix kernel's workgroup is sized to.
    pub(super) subgroup: u32,
    /// The device's limits (the adapter's).
    pub(super) limits: wgpu::Limits,
    /// Largest storage binding, in bytes.
    pub(super) max_binding: u64,
    /// Largest buffer, in bytes.
    pub(super) max_buffer: u64,
    /// Largest workgroup count per dispatch dimension.
    pub(super) max_groups: u32,
    errors: Arc<Mutex<Option<String>>>,
}

impl WgpuDevice {
    /// Requests a device on `adapter` with its full limits, and SHADER_F16, TIMESTAMP_QUERY and
    /// (experimental) cooperative matrices when offered.
    pub(super) fn open(adapter: &wgpu::Adapter) -> std::result::Result<WgpuDevice, String> {
        let offered = adapter.features();
        let f16 = offered.contains(wgpu::Features::SHADER_F16);
        let timestamps = offered.contains(wgpu::Features::TIMESTAMP_QUERY);
        let coop = f16 && coop_f16_16(adapter);
        let mut features = wgpu::Features::empty();
        for (on, f) in [
            (f16, wgpu::Features::SHADER_F16),
            (timestamps, wgpu::Features::TIMESTAMP_QUERY),
            (coop, wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
        ] {
            if on {
                features |= f;
            }
        }
        let experimental = if coop {
            // SAFETY: only EXPERIMENTAL_COOPERATIVE_MATRIX is requested among the experimental
            // features, and only its shader (fusion_proj_coop.wgsl, naga-validated in the tests)
            // uses it: f16 16x16 fragments the adapter reported, loads and stores kept in
            // bounds by the host's padding, run by whole subgroups in uniform control flow.
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let limits = adapter.limits();
        let info = adapter.get_info();
        let subgroup = info.subgroup_max_size.clamp(1, 128);
        let desc = wgpu::DeviceDescriptor {
            label: Some("fusion-engine"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&desc)).map_err(|e| e.to_string())?;
        let errors: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| record(&sink, e.to_string())));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            record(&sink, format!("device lost ({reason:?}): {msg}"))
        });
        Ok(WgpuDevice {
            device,
            queue,
            f16,
            timestamps,
            coop,
            subgroup,
            limits: limits.clone(),
            max_binding: limits.max_storage_buffer_binding_size.min(BINDING_CAP),
            max_buffer: limits.max_buffer_size,
            max_groups: limits.max_compute_workgroups_per_dimension,
            errors,
        })
    }

    /// The first error wgpu reported since the last call, as a typed error.
    pub(super) fn take_error(&self) -> Result<()> {
        let mut slot = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            None => Ok(()),
            Some(reason) => Err(device_error(reason)),
        }
    }

    /// Submits `cmd` without waiting.
    pub(super) fn submit(&self, cmd: wgpu::CommandBuffer) -> wgpu::SubmissionIndex {
        self.queue.submit([cmd])
    }

    /// Blocks until submission `idx` is done (its map callbacks have run), then reports any
    /// error wgpu recorded.
    pub(super) fn wait_for(&self, idx: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(idx),
                timeout: Some(WAIT_TIMEOUT),
            })
            .map_err(|e| device_error(format!("waiting for the device: {e}")))?;
        self.take_error()
    }
}

/// True when the adapter offers the experimental cooperative-matrix feature with f16 A/B and an
/// f32 accumulator in 16 x 16 x 16 (what `fusion_proj_coop.wgsl` uses).
pub(super) fn coop_f16_16(adapter: &wgpu::Adapter) -> bool {
    if !adapter
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    {
        return false;
    }
    adapter.cooperative_matrix_properties().iter().any(|p| {
        p.m_size == 16
            && p.n_size == 16
            && p.k_size == 16
            && p.ab_type == wgpu::CooperativeScalarType::F16
            && p.cr_type == wgpu::CooperativeScalarType::F32
    })
}

fn record(sink: &Mutex<Option<String>>, msg: String) {
    let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_none() {
        tracing::error!(error = %msg, "wgpu device error");
        *slot = Some(msg);
    }
}

/// A `Device` error of the wgpu backend.
pub(super) fn device_error(reason: impl Into<String>) -> Error {
    Error::Device {
        backend: "wgpu".into(),
        reason: reason.into(),
    }
}

/// State of an asynchronous buffer mapping, shared with its callback.
#[derive(Debug, Clone, Default)]
pub(super) struct MapState(Arc<AtomicU8>);

impl MapState {
    const PENDING: u8 = 0;
    const MAPPED: u8 = 1;
    const FAILED: u8 = 2;
    const UNMAPPED: u8 = 3;

    /// A state for a buffer created mapped.
    pub(super) fn mapped() -> MapState {
        MapState(Arc::new(AtomicU8::new(Self::MAPPED)))
    }

    /// Records that the buffer was unmapped.
    pub(super) fn set_unmapped(&self) {
        self.0.store(Self::UNMAPPED, Ordering::Release);
    }

    /// Requests a mapping of `range` of `buffer`; completes at the next device poll.
    pub(super) fn request(
        &self,
        buffer: &wgpu::Buffer,
        mode: wgpu::MapMode,
        range: std::ops::Range<u64>,
    ) {
        self.0.store(Self::PENDING, Ordering::Release);
        let state = self.0.clone();
        buffer.map_async(mode, range, move |r| {
            let v = if r.is_ok() {
                Self::MAPPED
            } else {
                Self::FAILED
            };
            state.store(v, Ordering::Release);
        });
    }

    /// True while a mapping is requested and not yet complete.
    pub(super) fn is_pending(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::PENDING
    }

    /// True when the buffer is mapped.
    pub(super) fn is_mapped(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::MAPPED
    }

    /// Ensures the mapping completed, polling the device (up to submission `after`, the last
    /// one using the buffer, or everything when unknown) if the callback has not run.
    pub(super) fn wait(
        &self,
        device: &wgpu::Device,
        what: &str,
        after: Option<wgpu::SubmissionIndex>,
    ) -> Result<()> {
        if self.0.load(Ordering::Acquire) == Self::PENDING {
            device
                .poll(wgpu::PollType::Wait {
                    submission_index: after,
                    timeout: Some(WAIT_TIMEOUT),
                })
                .map_err(|e| device_error(format!("waiting to map {what}: {e}")))?;
            if self.0.load(Ordering::Acquire) == Self::PENDING {
                // Requested after `after` was submitted: completes with the next poll.
                device
                    .poll(wgpu::PollType::Wait {
                        submission_index: None,
                        timeout: Some(WAIT_TIMEOUT),
                    })
                    .map_err(|e| device_error(format!("waiting to map {what}: {e}")))?;
            }
        }
        match self.0.load(Ordering::Acquire) {
            Self::MAPPED => Ok(()),
            Self::FAILED => Err(device_error(format!("mapping {what} failed"))),
            _ => Err(device_error(format!("{what} is not mapped"))),
        }
    }
}
