//! One batch through the staging ring: each chunk is packed into its slot's mapped upload
//! buffer, submitted (copies in, `fusion_proj`, `fusion_epilogue`, copy out, timestamps) without
//! waiting, and drained (results copied out of its readback buffer) only when its slot comes
//! round again or the batch ends, so up to [`RING`] chunks are in flight at once.

use std::time::Instant;

use crate::backend::api::RunStats;
use crate::batch::{BatchRef, OutputsMut};
use crate::error::Result;
use crate::model::FusionHead;

use super::device::{device_error, WgpuDevice};
use super::kernels::{ProjVariant, XType};
use super::pool::{ts_offset, Pending, Pool, TIMESTAMPS};
use super::run::{self, Layout};

/// What every chunk of one batch shares.
pub(super) struct ChunkJob<'a> {
    pub(super) gpu: &'a WgpuDevice,
    pub(super) head: &'a FusionHead,
    pub(super) w_off: &'a [u32],
    pub(super) xt: XType,
    pub(super) proj: &'a wgpu::ComputePipeline,
    pub(super) proj_bind: &'a wgpu::BindGroup,
    /// The epilogue, for whole-head runs (None: projections only).
    pub(super) epilogue: Option<(&'a wgpu::ComputePipeline, &'a wgpu::BindGroup)>,
    pub(super) params: &'a wgpu::Buffer,
    pub(super) mods: &'a wgpu::Buffer,
    pub(super) mask: &'a wgpu::Buffer,
    pub(super) x: &'a wgpu::Buffer,
    pub(super) out: &'a wgpu::Buffer,
}

impl ChunkJob<'_> {
    /// Packs and submits rows `start..start + batch.rows` from slot `s` (drained before).
    pub(super) fn submit(
        &self,
        pool: &mut Pool,
        s: usize,
        batch: &BatchRef<'_>,
        start: usize,
        variant: ProjVariant,
        stats: &mut RunStats,
    ) -> Result<()> {
        let (bm, bn) = variant.tile_mn();
        let layout = Layout::new(self.head, batch.rows, self.xt, bn);
        let slot = pool
            .slots
            .get_mut(s)
            .ok_or_else(|| device_error("staging slot out of range"))?;
        let dev = &self.gpu.device;
        let t = Instant::now();
        slot.upload_state
            .wait(dev, "an upload staging buffer", slot.upload_index.take())?;
        let upload = slot.upload.get()?;
        {
            let mut view = upload
                .get_mapped_range_mut(0..layout.bytes.upload)
                .map_err(|e| device_error(format!("staging inputs: {e}")))?;
            run::pack(&mut view, &layout, self.head, self.w_off, batch, self.xt)?;
        }
        upload.unmap();
        slot.upload_state.set_unmapped();
        stats.host_stage_ms += t.elapsed().as_secs_f64() * 1e3;

        let b = &layout.bytes;
        let mut enc = dev.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("fusion chunk"),
        });
        enc.copy_buffer_to_buffer(upload, 0, self.params, 0, run::PARAMS_BYTES);
        enc.copy_buffer_to_buffer(upload, run::PARAMS_BYTES, self.mods, 0, b.mods);
        enc.copy_buffer_to_buffer(upload, layout.mask_at, self.mask, 0, b.mask);
        enc.copy_buffer_to_buffer(upload, layout.x_at, self.x, 0, b.x);
        let writes = |i: u32| {
            slot.query
                .as_ref()
                .map(|(q, _)| wgpu::ComputePassTimestampWrites {
                    query_set: q,
                    beginning_of_pass_write_index: Some(i),
                    end_of_pass_write_index: Some(i + 1),
                })
        };
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("fusion_proj"),
                timestamp_writes: writes(0),
            });
            pass.set_pipeline(self.proj);
            pass.set_bind_group(0, self.proj_bind, &[]);
            pass.dispatch_workgroups(
                layout.ntn,
                batch.rows.div_ceil(bm as usize) as u32,
                self.head.num_modalities() as u32,
            );
        }
        if let Some((pipe, bind)) = self.epilogue {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("fusion_epilogue"),
                timestamp_writes: writes(2),
            });
            pass.set_pipeline(pipe);
            pass.set_bind_group(0, bind, &[]);
            pass.dispatch_workgroups(batch.rows as u32, 1, 1);
        }
        let readback = slot.readback.get()?;
        let out_bytes = if self.epilogue.is_some() { b.out } else { 0 };
        if out_bytes > 0 {
            enc.copy_buffer_to_buffer(self.out, 0, readback, 0, out_bytes);
        }
        let ts_at = match &slot.query {
            Some((q, resolve)) => {
                let n = if self.epilogue.is_some() {
                    TIMESTAMPS
                } else {
                    2
                };
                enc.resolve_query_set(q, 0..n, resolve, 0);
                let at = ts_offset(out_bytes);
                enc.copy_buffer_to_buffer(resolve, 0, readback, at, u64::from(TIMESTAMPS) * 8);
                Some(at)
            }
            None => None,
        };
        let index = self.gpu.submit(enc.finish());
        let end = ts_at.map_or(out_bytes, |a| a + u64::from(TIMESTAMPS) * 8);
        if end > 0 {
            slot.readback_state
                .request(readback, wgpu::MapMode::Read, 0..end);
        }
        // Re-map the staging buffer now: it is ready for this slot's next chunk as soon as
        // this one is done, without another wait.
        slot.upload_state
            .request(upload, wgpu::MapMode::Write, 0..upload.size());
        slot.upload_index = Some(index.clone());
        slot.pending = Some(Pending {
            index,
            start,
            rows: batch.rows,
            out_bytes,
            ts_at,
        });
        Ok(())
    }

    /// Waits for slot `s`'s chunk (if any), copies its results into `out` and adds its times.
    pub(super) fn drain(
        &self,
        pool: &mut Pool,
        s: usize,
        out: Option<&mut OutputsMut<'_>>,
        stats: &mut RunStats,
    ) -> Result<()> {
        let slot = pool
            .slots
            .get_mut(s)
            .ok_or_else(|| device_error("staging slot out of range"))?;
        let Some(p) = slot.pending.take() else {
            return Ok(());
        };
        let t = Instant::now();
        self.gpu.wait_for(p.index.clone())?;
        let end = p
            .ts_at
            .map_or(p.out_bytes, |a| a + u64::from(TIMESTAMPS) * 8);
        if end == 0 {
            stats.host_wait_ms += t.elapsed().as_secs_f64() * 1e3;
            return Ok(());
        }
        let readback = slot.readback.get()?;
        slot.readback_state
            .wait(&self.gpu.device, "the readback buffer", Some(p.index))?;
        stats.host_wait_ms += t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let (d, m) = (self.head.dim, self.head.num_modalities());
        let res = (|| {
            let view = readback
                .get_mapped_range(0..end)
                .map_err(|e| device_error(format!("reading results: {e}")))?;
            if let (Some(o), true) = (out, p.out_bytes > 0) {
                let fused = &mut o.fused[p.start * d..(p.start + p.rows) * d];
                let weights = &mut o.weights[p.start * m..(p.start + p.rows) * m];
                let split = fused.len() * 4;
                run::read_f32(&view[..split], fused);
                run::read_f32(&view[split..split + weights.len() * 4], weights);
            }
            if let Some(at) = p.ts_at {
                let at = at as usize;
                let mut ts = [0u64; TIMESTAMPS as usize];
                for (i, t) in ts.iter_mut().enumerate() {
                    let b = &view[at + i * 8..at + i * 8 + 8];
                    *t = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                }
                if p.out_bytes > 0 {
                    let ms = f64::from(self.gpu.queue.get_timestamp_period()) / 1e6;
                    stats.gemm_ms += ts[1].saturating_sub(ts[0]) as f64 * ms;
                    stats.epilogue_ms += ts[3].saturating_sub(ts[2]) as f64 * ms;
                }
            }
            Ok(())
        })();
        readback.unmap();
        slot.readback_state.set_unmapped();
        stats.host_drain_ms += t.elapsed().as_secs_f64() * 1e3;
        res
    }
}
