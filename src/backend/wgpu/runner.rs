//! The device state behind [`WgpuBackend`](super::WgpuBackend): head upload, chunked runs
//! (copies in, `fusion_proj`, `fusion_epilogue`, copy out), and the bind group cache.

use std::sync::Arc;

use crate::backend::api::{DeviceInfo, OpenOptions};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;
use crate::tensor::DType;

use super::adapter;
use super::device::{device_error, WgpuDevice};
use super::kernels::{self, Kernels, Tile, XType};
use super::pool::Pool;
use super::run::{self, Layout};
use super::weights::DeviceHead;

/// Default cap on samples per chunk (the adapter's limits may impose fewer).
const DEFAULT_MAX_CHUNK_ROWS: usize = 65_536;

/// Bind groups for the current pool buffers and head.
struct BindGroups {
    key: (u64, u64),
    proj: wgpu::BindGroup,
    epilogue: wgpu::BindGroup,
}

/// Everything one opened adapter holds.
pub(super) struct WgpuRunner {
    pub(super) info: DeviceInfo,
    gpu: WgpuDevice,
    kernels: Kernels,
    pool: Pool,
    pub(super) head: Option<DeviceHead>,
    uploads: u64,
    binds: Option<BindGroups>,
    pub(super) max_chunk_rows: usize,
    pub(super) tile: Option<Tile>,
    pub(super) f16_storage: bool,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "wgpu".into(),
        reason: reason.into(),
    }
}

impl WgpuRunner {
    pub(super) fn new(index: usize, _opts: &OpenOptions) -> Result<WgpuRunner> {
        // Held until the device and its kernels are created.
        let mut discovery = adapter::open_lock();
        let (_instance, adapters) = discovery.instance_and_adapters();
        if adapters.is_empty() {
            return Err(unavailable(adapter::no_adapter_reason()));
        }
        let count = adapters.len();
        let missing = || unavailable(format!("no adapter {index} (found {count})"));
        let info = adapter::device_infos(&adapters)
            .into_iter()
            .nth(index)
            .ok_or_else(missing)?;
        let a = adapters.into_iter().nth(index).ok_or_else(missing)?;
        adapter::check(&a).map_err(|r| unavailable(format!("{}: {r}", info.name)))?;
        let gpu = WgpuDevice::open(&a)
            .map_err(|e| unavailable(format!("requesting a device on {}: {e}", info.name)))?;
        let kernels = Kernels::new(&gpu.device);
        gpu.take_error()?;
        Ok(WgpuRunner {
            info,
            gpu,
            kernels,
            pool: Pool::new(),
            head: None,
            uploads: 0,
            binds: None,
            max_chunk_rows: DEFAULT_MAX_CHUNK_ROWS,
            tile: None,
            f16_storage: true,
        })
    }

    pub(super) fn f16_storage(&self) -> bool {
        self.gpu.f16 && self.f16_storage
    }

    fn xtype(&self, batch: &BatchRef<'_>) -> XType {
        if self.f16_storage() && batch.inputs.iter().all(|x| x.dtype == DType::F16) {
            XType::F16
        } else {
            XType::F32
        }
    }

    /// Runs `batch` chunk by chunk; with `out`, the whole head, otherwise the GEMMs only.
    fn run_chunks(&mut self, batch: &BatchRef<'_>, mut out: Option<OutputsMut<'_>>) -> Result<()> {
        let dh = self.head.as_ref().ok_or_else(no_head)?;
        let head = dh.head.clone();
        let xt = self.xtype(batch);
        let (d, m) = (head.dim, head.num_modalities());
        // Size chunks for the small tile unless one is forced: it has more column tiles, so its
        // partial-score buffer is the larger one and the plan holds whichever tile a chunk picks.
        let plan_tile = self.tile.unwrap_or(Tile::Small);
        let chunk = run::chunk_rows(
            &self.gpu,
            &head,
            batch.rows,
            xt,
            plan_tile,
            self.max_chunk_rows,
        )?;
        let mut start = 0;
        while start < batch.rows {
            let n = chunk.min(batch.rows - start);
            let tile = self.tile.unwrap_or_else(|| Tile::choose(n, d));
            let sub = batch.slice(start, n);
            let dst = out.as_mut().map(|o| {
                (
                    &mut o.fused[start * d..(start + n) * d],
                    &mut o.weights[start * m..(start + n) * m],
                )
            });
            self.run_chunk(&head, &sub, xt, tile, dst)?;
            start += n;
        }
        Ok(())
    }

    fn run_chunk(
        &mut self,
        head: &FusionHead,
        batch: &BatchRef<'_>,
        xt: XType,
        tile: Tile,
        out: Option<(&mut [f32], &mut [f32])>,
    ) -> Result<()> {
        let layout = Layout::new(head, batch.rows, xt, tile);
        self.pool
            .prepare(&self.gpu, &layout.bytes, run::PARAMS_BYTES)?;
        self.bind_groups()?;
        let dh = self.head.as_ref().ok_or_else(no_head)?;
        {
            let upload = self.pool.upload.get()?;
            let mut view = upload
                .get_mapped_range_mut(0..layout.bytes.upload)
                .map_err(|e| device_error(format!("staging inputs: {e}")))?;
            run::pack(&mut view, &layout, head, &dh.w_off, batch, xt)?;
        }
        let upload = self.pool.upload.get()?;
        upload.unmap();
        self.pool.upload_state.set_unmapped();

        let vpt = kernels::values_per_thread(head.dim);
        let full = out.is_some();
        let dev = &self.gpu.device;
        let proj = self
            .kernels
            .proj(dev, tile, xt)
            .map_err(device_error)?
            .clone();
        let epilogue = if full {
            Some(
                self.kernels
                    .epilogue(dev, vpt)
                    .map_err(device_error)?
                    .clone(),
            )
        } else {
            None
        };
        let binds = self
            .binds
            .as_ref()
            .ok_or_else(|| device_error("bind groups missing"))?;
        let p = &self.pool;
        let b = &layout.bytes;
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("fusion chunk"),
        });
        enc.copy_buffer_to_buffer(upload, 0, p.params.get()?, 0, run::PARAMS_BYTES);
        enc.copy_buffer_to_buffer(upload, run::PARAMS_BYTES, p.mods.get()?, 0, b.mods);
        enc.copy_buffer_to_buffer(upload, layout.mask_at, p.mask.get()?, 0, b.mask);
        enc.copy_buffer_to_buffer(upload, layout.x_at, p.x.get()?, 0, b.x);
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("fusion"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&proj);
            pass.set_bind_group(0, &binds.proj, &[]);
            pass.dispatch_workgroups(
                layout.ntn,
                batch.rows.div_ceil(tile.bm() as usize) as u32,
                head.num_modalities() as u32,
            );
            if let Some(e) = &epilogue {
                pass.set_pipeline(e);
                pass.set_bind_group(0, &binds.epilogue, &[]);
                pass.dispatch_workgroups(batch.rows as u32, 1, 1);
            }
        }
        let readback = p.readback.get()?;
        if full {
            enc.copy_buffer_to_buffer(p.out.get()?, 0, readback, 0, b.out);
        }
        let upload_size = upload.size();
        self.gpu.submit_and_wait(enc.finish(), || {
            if full {
                p.readback_state
                    .request(readback, wgpu::MapMode::Read, 0..b.out);
            }
            // Re-map the staging buffer now so the next chunk can write into it at once.
            p.upload_state
                .request(upload, wgpu::MapMode::Write, 0..upload_size);
        })?;
        if let Some((fused, weights)) = out {
            p.readback_state.wait(dev, "the readback buffer")?;
            let res = (|| {
                let view = readback
                    .get_mapped_range(0..b.out)
                    .map_err(|e| device_error(format!("reading results: {e}")))?;
                let split = fused.len() * 4;
                run::read_f32(&view[..split], fused);
                run::read_f32(&view[split..split + weights.len() * 4], weights);
                Ok(())
            })();
            readback.unmap();
            p.readback_state.set_unmapped();
            res?;
        }
        Ok(())
    }

    /// (Re)builds the bind groups when a pool buffer or the head changed.
    fn bind_groups(&mut self) -> Result<()> {
        let dh = self.head.as_ref().ok_or_else(no_head)?;
        let key = (self.pool.generation, dh.generation);
        if self.binds.as_ref().is_some_and(|b| b.key == key) {
            return Ok(());
        }
        let p = &self.pool;
        fn e(i: u32, b: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
            wgpu::BindGroupEntry {
                binding: i,
                resource: b.as_entire_binding(),
            }
        }
        let dev = &self.gpu.device;
        let proj = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("fusion_proj"),
            layout: &self.kernels.proj_layout,
            entries: &[
                e(0, p.params.get()?),
                e(1, p.mods.get()?),
                e(2, p.x.get()?),
                e(3, &dh.wt),
                e(4, &dh.vecs),
                e(5, p.h.get()?),
                e(6, p.part.get()?),
            ],
        });
        let epilogue = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("fusion_epilogue"),
            layout: &self.kernels.epilogue_layout,
            entries: &[
                e(0, p.params.get()?),
                e(1, p.mask.get()?),
                e(2, p.h.get()?),
                e(3, p.part.get()?),
                e(4, &dh.vecs),
                e(5, p.out.get()?),
            ],
        });
        self.binds = Some(BindGroups {
            key,
            proj,
            epilogue,
        });
        Ok(())
    }
}

fn no_head() -> Error {
    Error::Config("no head uploaded to the wgpu backend".into())
}

impl WgpuRunner {
    pub(super) fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        self.uploads += 1;
        self.head = None;
        self.binds = None;
        let vpt = kernels::values_per_thread(head.dim);
        let dh = DeviceHead::upload(&self.gpu, head, self.uploads)?;
        // Compile what the first batch will need now rather than on its clock.
        self.kernels
            .epilogue(&self.gpu.device, vpt)
            .map_err(device_error)?;
        self.kernels
            .proj(&self.gpu.device, Tile::Small, XType::F32)
            .map_err(device_error)?;
        self.gpu.take_error()?;
        self.head = Some(dh);
        Ok(())
    }

    pub(super) fn run_batch(&mut self, batch: &BatchRef<'_>, out: OutputsMut<'_>) -> Result<()> {
        let head = self.head.as_ref().ok_or_else(no_head)?.head.clone();
        batch.validate(&head)?;
        out.check(&head, batch.rows)?;
        self.run_chunks(batch, Some(out))
    }

    pub(super) fn run_projections_only(&mut self, batch: &BatchRef<'_>) -> Result<bool> {
        let head = self.head.as_ref().ok_or_else(no_head)?.head.clone();
        batch.validate_shapes(&head)?;
        self.run_chunks(batch, None).map(|_| true)
    }
}
