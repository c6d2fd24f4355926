//! A head on the device: projection weights transposed to `[d_m, D]` and concatenated (so the
//! GEMM reads W^T tiles along D, coalesced), and the small vectors (biases, gate, LayerNorm
//! affine) in one buffer. Uploaded once per head.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use crate::error::Result;
use crate::model::FusionHead;

use super::device::{device_error, WgpuDevice};
use super::kernels::Tile;

/// A head's parameters in device memory.
pub(super) struct DeviceHead {
    pub(super) head: Arc<FusionHead>,
    /// All W_m^T, `[d_m, D]` each.
    pub(super) wt: wgpu::Buffer,
    /// bias `[M, D]`, gate `[D]`, gamma `[D]`, beta `[D]`.
    pub(super) vecs: wgpu::Buffer,
    /// Element offset of each W_m^T in `wt`.
    pub(super) w_off: Vec<u32>,
    /// Distinguishes uploads, for bind group caching.
    pub(super) generation: u64,
}

impl DeviceHead {
    /// Transposes and uploads `head`'s parameters.
    pub(super) fn upload(
        gpu: &WgpuDevice,
        head: Arc<FusionHead>,
        generation: u64,
    ) -> Result<DeviceHead> {
        let d = head.dim;
        let total: usize = head.total_width() * d;
        let bytes = (total as u64).saturating_mul(4);
        if bytes > gpu.max_binding {
            return Err(device_error(format!(
                "the head's projection weights take {bytes} bytes, more than one storage binding \
                 of this adapter ({} bytes)",
                gpu.max_binding
            )));
        }
        let col_tiles = d.div_ceil(Tile::Small.bn() as usize);
        if u32::try_from(total).is_err()
            || head.num_modalities() > gpu.max_groups as usize
            || col_tiles > gpu.max_groups as usize
        {
            return Err(device_error(
                "the head is too large for this adapter's dispatch limits",
            ));
        }
        let mut wt = vec![0f32; total.max(1)];
        let mut w_off = Vec::with_capacity(head.num_modalities());
        let mut off = 0usize;
        for (md, w) in head.modalities.iter().zip(&head.proj_weight) {
            let k = md.width;
            w_off.push(off as u32);
            let dst = &mut wt[off..off + k * d];
            for (o, wrow) in w.chunks_exact(k.max(1)).enumerate().take(d) {
                for (c, v) in wrow.iter().enumerate() {
                    dst[c * d + o] = *v;
                }
            }
            off += k * d;
        }
        let mut vecs = Vec::with_capacity((head.num_modalities() + 3) * d);
        for b in &head.proj_bias {
            vecs.extend_from_slice(b);
        }
        vecs.extend_from_slice(&head.gate);
        vecs.extend_from_slice(&head.norm_weight);
        vecs.extend_from_slice(&head.norm_bias);
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let wt_buf = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("wt"),
                contents: bytemuck::cast_slice(&wt),
                usage: wgpu::BufferUsages::STORAGE,
            });
        let vecs_buf = gpu
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("vecs"),
                contents: bytemuck::cast_slice(&vecs),
                usage: wgpu::BufferUsages::STORAGE,
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_error(format!("uploading the head: {e}")));
        }
        Ok(DeviceHead {
            head,
            wt: wt_buf,
            vecs: vecs_buf,
            w_off,
            generation,
        })
    }
}
