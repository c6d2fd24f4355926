//! The buffer pool: grow-only device buffers for one chunk's inputs, activations and outputs,
//! plus the mapped staging buffers that carry them across the bus. A buffer is only replaced
//! when a chunk needs more than it holds, so steady-state batches allocate nothing; every
//! replacement bumps [`Pool::generation`] so cached bind groups are rebuilt.

use crate::error::Result;

use super::device::{device_error, MapState, WgpuDevice};

/// Buffer sizes are rounded up to this, and grow by at least half their size.
const GRANULE: u64 = 256;

/// One grow-only buffer.
pub(super) struct GrowBuffer {
    label: &'static str,
    usage: wgpu::BufferUsages,
    buf: Option<wgpu::Buffer>,
}

impl GrowBuffer {
    fn new(label: &'static str, usage: wgpu::BufferUsages) -> GrowBuffer {
        GrowBuffer {
            label,
            usage,
            buf: None,
        }
    }

    /// Makes the buffer hold at least `need` bytes without exceeding `limit`; returns true when
    /// a new buffer was created (created mapped when `mapped` is set).
    fn ensure(&mut self, gpu: &WgpuDevice, need: u64, limit: u64, mapped: bool) -> Result<bool> {
        let need = need.max(4).div_ceil(GRANULE) * GRANULE;
        let have = self.buf.as_ref().map_or(0, |b| b.size());
        if have >= need {
            return Ok(false);
        }
        if need > limit {
            return Err(device_error(format!(
                "buffer {} needs {need} bytes, the adapter allows {limit}",
                self.label
            )));
        }
        let size = (have + have / 2)
            .max(need)
            .min(limit / GRANULE * GRANULE)
            .max(need);
        if let Some(old) = self.buf.take() {
            old.destroy();
        }
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(self.label),
            size,
            usage: self.usage,
            mapped_at_creation: mapped,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_error(format!(
                "allocating {size} bytes for {}: {e}",
                self.label
            )));
        }
        self.buf = Some(buf);
        Ok(true)
    }

    /// The buffer (after a successful `ensure`).
    pub(super) fn get(&self) -> Result<&wgpu::Buffer> {
        self.buf
            .as_ref()
            .ok_or_else(|| device_error(format!("buffer {} used before allocation", self.label)))
    }
}

/// Byte sizes one chunk needs.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ChunkBytes {
    /// Modality descriptors (16 bytes each).
    pub(super) mods: u64,
    /// Packed inputs.
    pub(super) x: u64,
    /// Packed mask.
    pub(super) mask: u64,
    /// Projected activations `[M, n, D]` f32.
    pub(super) h: u64,
    /// Partial scores `[M, n, ntn]` f32.
    pub(super) part: u64,
    /// `fused` then `weights`, f32.
    pub(super) out: u64,
    /// Upload staging: params, mods, mask, x.
    pub(super) upload: u64,
}

/// All per-chunk buffers of one device.
pub(super) struct Pool {
    pub(super) params: GrowBuffer,
    pub(super) mods: GrowBuffer,
    pub(super) x: GrowBuffer,
    pub(super) mask: GrowBuffer,
    pub(super) h: GrowBuffer,
    pub(super) part: GrowBuffer,
    pub(super) out: GrowBuffer,
    /// MAP_WRITE staging for inputs, kept mapped between chunks.
    pub(super) upload: GrowBuffer,
    pub(super) upload_state: MapState,
    /// MAP_READ staging for outputs.
    pub(super) readback: GrowBuffer,
    pub(super) readback_state: MapState,
    /// Bumped whenever a buffer is replaced.
    pub(super) generation: u64,
}

impl Pool {
    /// An empty pool (buffers are created by the first chunk).
    pub(super) fn new() -> Pool {
        use wgpu::BufferUsages as U;
        let storage = U::STORAGE | U::COPY_DST;
        Pool {
            params: GrowBuffer::new("params", U::UNIFORM | U::COPY_DST),
            mods: GrowBuffer::new("mods", storage),
            x: GrowBuffer::new("x", storage),
            mask: GrowBuffer::new("mask", storage),
            h: GrowBuffer::new("h", U::STORAGE),
            part: GrowBuffer::new("part", U::STORAGE),
            out: GrowBuffer::new("out", U::STORAGE | U::COPY_SRC),
            upload: GrowBuffer::new("upload", U::MAP_WRITE | U::COPY_SRC),
            upload_state: MapState::default(),
            readback: GrowBuffer::new("readback", U::MAP_READ | U::COPY_DST),
            readback_state: MapState::default(),
            generation: 0,
        }
    }

    /// Grows what is too small for a chunk of these sizes and leaves the upload staging
    /// buffer mapped for writing.
    pub(super) fn prepare(
        &mut self,
        gpu: &WgpuDevice,
        b: &ChunkBytes,
        params_bytes: u64,
    ) -> Result<()> {
        let bind = gpu.max_binding;
        if self.readback_state.is_mapped() {
            // Left mapped by a chunk that failed after its map request.
            self.readback.get()?.unmap();
            self.readback_state.set_unmapped();
        }
        let mut grown = false;
        grown |= self.params.ensure(gpu, params_bytes, bind, false)?;
        grown |= self.mods.ensure(gpu, b.mods, bind, false)?;
        grown |= self.x.ensure(gpu, b.x, bind, false)?;
        grown |= self.mask.ensure(gpu, b.mask, bind, false)?;
        grown |= self.h.ensure(gpu, b.h, bind, false)?;
        grown |= self.part.ensure(gpu, b.part, bind, false)?;
        grown |= self.out.ensure(gpu, b.out, bind, false)?;
        if grown {
            self.generation += 1;
        }
        if self.readback.ensure(gpu, b.out, gpu.max_buffer, false)? {
            self.readback_state = MapState::default();
        }
        if self.upload.ensure(gpu, b.upload, gpu.max_buffer, true)? {
            self.upload_state = MapState::mapped();
        } else if !self.upload_state.is_mapped() {
            // Normally re-mapped right after the previous chunk; this covers a failed chunk.
            let buf = self.upload.get()?;
            self.upload_state
                .request(buf, wgpu::MapMode::Write, 0..buf.size());
            self.upload_state
                .wait(&gpu.device, "the upload staging buffer")?;
        }
        Ok(())
    }
}
