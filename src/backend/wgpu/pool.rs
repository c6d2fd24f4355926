//! The buffer pool: grow-only device buffers for one chunk's inputs, activations and outputs,
//! plus a ring of [`RING`] staging slots (an upload buffer mapped at creation and re-mapped
//! right after each use, a readback buffer, and a timestamp query set) so that consecutive
//! chunks overlap: the host packs chunk i + 1 while the device runs chunk i and the results of
//! chunk i - 1 wait in their slot. A buffer is only replaced when a batch needs more than it
//! holds, and only between batches (never under a chunk in flight), so steady-state batches
//! create nothing ([`Pool::created`] counts every buffer and query set ever created); every
//! replacement of a device buffer bumps [`Pool::generation`] so cached bind groups are rebuilt.

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
    /// The staging ring.
    pub(super) slots: Vec<Slot>,
    /// Bumped whenever a device buffer is replaced.
    pub(super) generation: u64,
    /// Buffers and query sets created so far (tests: constant in steady state).
    pub(super) created: u64,
}

/// Staging slots in the ring: one being packed, one running, one being drained.
pub(super) const RING: usize = 3;

/// Timestamps per chunk: GEMM pass begin/end, epilogue pass begin/end.
pub(super) const TIMESTAMPS: u32 = 4;

/// A chunk submitted from a slot and not yet drained.
pub(super) struct Pending {
    /// Its submission.
    pub(super) index: wgpu::SubmissionIndex,
    /// First sample of the chunk in its batch, and its samples.
    pub(super) start: usize,
    pub(super) rows: usize,
    /// Bytes of results in the readback buffer (0: projections only).
    pub(super) out_bytes: u64,
    /// Where the resolved timestamps sit in the readback buffer, when timed.
    pub(super) ts_at: Option<u64>,
}

/// One staging slot of the ring.
pub(super) struct Slot {
    /// MAP_WRITE staging for inputs, mapped at creation and re-mapped after each use.
    pub(super) upload: GrowBuffer,
    pub(super) upload_state: MapState,
    /// The submission that last used `upload` (its re-mapping completes with it).
    pub(super) upload_index: Option<wgpu::SubmissionIndex>,
    /// MAP_READ staging for outputs (and the chunk's timestamps after them).
    pub(super) readback: GrowBuffer,
    pub(super) readback_state: MapState,
    /// Timestamp queries and their resolve buffer (devices with TIMESTAMP_QUERY).
    pub(super) query: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    /// The chunk in flight from this slot.
    pub(super) pending: Option<Pending>,
}

impl Slot {
    fn new() -> Slot {
        use wgpu::BufferUsages as U;
        Slot {
            upload: GrowBuffer::new("upload", U::MAP_WRITE | U::COPY_SRC),
            upload_state: MapState::default(),
            upload_index: None,
            readback: GrowBuffer::new("readback", U::MAP_READ | U::COPY_DST),
            readback_state: MapState::default(),
            query: None,
            pending: None,
        }
    }
}

/// Byte offset of the timestamps in a readback buffer holding `out` bytes of results.
pub(super) fn ts_offset(out: u64) -> u64 {
    out.div_ceil(GRANULE) * GRANULE
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
            slots: (0..RING).map(|_| Slot::new()).collect(),
            generation: 0,
            created: 0,
        }
    }

    /// Waits for every chunk still in flight (left by a batch that failed) and unmaps what it
    /// left mapped for reading; afterwards no slot is pending.
    pub(super) fn drain(&mut self, gpu: &WgpuDevice) -> Result<()> {
        for slot in &mut self.slots {
            if let Some(p) = slot.pending.take() {
                gpu.wait_for(p.index)?;
            }
            if slot.readback_state.is_mapped() {
                slot.readback.get()?.unmap();
                slot.readback_state.set_unmapped();
            }
        }
        Ok(())
    }

    /// Grows what is too small for chunks of these sizes (called between batches, after
    /// [`Pool::drain`]) and leaves every upload staging buffer mapped or being mapped.
    pub(super) fn prepare(
        &mut self,
        gpu: &WgpuDevice,
        b: &ChunkBytes,
        params_bytes: u64,
    ) -> Result<()> {
        let bind = gpu.max_binding;
        let mut grown = 0u64;
        for (buf, need) in [
            (&mut self.params, params_bytes),
            (&mut self.mods, b.mods),
            (&mut self.x, b.x),
            (&mut self.mask, b.mask),
            (&mut self.h, b.h),
            (&mut self.part, b.part),
            (&mut self.out, b.out),
        ] {
            grown += u64::from(buf.ensure(gpu, need, bind, false)?);
        }
        if grown > 0 {
            self.generation += 1;
        }
        let readback = ts_offset(b.out) + u64::from(TIMESTAMPS) * 8;
        for slot in &mut self.slots {
            if slot.readback.ensure(gpu, readback, gpu.max_buffer, false)? {
                slot.readback_state = MapState::default();
                grown += 1;
            }
            if slot.upload.ensure(gpu, b.upload, gpu.max_buffer, true)? {
                slot.upload_state = MapState::mapped();
                slot.upload_index = None;
                grown += 1;
            } else if !slot.upload_state.is_mapped() && !slot.upload_state.is_pending() {
                // Normally re-mapped right after its chunk; this covers a failed chunk.
                let buf = slot.upload.get()?;
                slot.upload_state
                    .request(buf, wgpu::MapMode::Write, 0..buf.size());
            }
            if gpu.timestamps && slot.query.is_none() {
                let q = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("fusion timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: TIMESTAMPS,
                });
                let r = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("timestamp resolve"),
                    size: u64::from(TIMESTAMPS) * 8,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                slot.query = Some((q, r));
                grown += 2;
            }
        }
        self.created += grown;
        Ok(())
    }
}
