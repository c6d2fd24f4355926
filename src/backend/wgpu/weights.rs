//! A head on the device: projection weights transposed to `[ks_m, DP]` and concatenated (so the
//! GEMM reads W^T tiles along D, coalesced, as vec4), zero-padded so that every GEMM tile is in
//! range (`ks_m` = d_m rounded up to [`K_PAD`], `DP` = D rounded up to [`COL_PAD`]); in f32, and
//! also in f16 on devices with SHADER_F16 (the f16 paths); and the small vectors (biases, gate,
//! LayerNorm affine) in one f32 buffer. Uploaded once per head.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use crate::error::Result;
use crate::model::FusionHead;

use super::device::{device_error, WgpuDevice};
use super::kernels::{COL_PAD, K_PAD};

/// A head's parameters in device memory.
pub(super) struct DeviceHead {
    pub(super) head: Arc<FusionHead>,
    /// All W_m^T, `[ks_m, DP]` each, f32.
    pub(super) wt: wgpu::Buffer,
    /// The same in f16 (devices with SHADER_F16 only).
    pub(super) wt16: Option<wgpu::Buffer>,
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
        let dp = d.div_ceil(COL_PAD) * COL_PAD;
        let total: usize = head
            .modalities
            .iter()
            .map(|m| m.width.div_ceil(K_PAD) * K_PAD * dp)
            .sum();
        let bytes = (total as u64).saturating_mul(4);
        if bytes > gpu.max_binding {
            return Err(device_error(format!(
                "the head's projection weights take {bytes} bytes, more than one storage binding \
                 of this adapter ({} bytes)",
                gpu.max_binding
            )));
        }
        let col_tiles = d.div_ceil(32);
        if u32::try_from(total).is_err()
            || head.num_modalities() > gpu.max_groups as usize
            || col_tiles > gpu.max_groups as usize
        {
            return Err(device_error(
                "the head is too large for this adapter's dispatch limits",
            ));
        }
        let mut wt = vec![0f32; total.max(K_PAD)];
        let mut w_off = Vec::with_capacity(head.num_modalities());
        let mut off = 0usize;
        for (md, w) in head.modalities.iter().zip(&head.proj_weight) {
            let k = md.width;
            w_off.push(off as u32);
            let dst = &mut wt[off..off + k * dp];
            for (o, wrow) in w.chunks_exact(k.max(1)).enumerate().take(d) {
                for (c, v) in wrow.iter().enumerate() {
                    dst[c * dp + o] = *v;
                }
            }
            off += k.div_ceil(K_PAD) * K_PAD * dp;
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
        let wt16_buf = gpu.f16.then(|| {
            let h: Vec<half::f16> = wt.iter().map(|v| half::f16::from_f32(*v)).collect();
            gpu.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("wt16"),
                    contents: bytemuck::cast_slice(&h),
                    usage: wgpu::BufferUsages::STORAGE,
                })
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_error(format!("uploading the head: {e}")));
        }
        Ok(DeviceHead {
            head,
            wt: wt_buf,
            wt16: wt16_buf,
            vecs: vecs_buf,
            w_off,
            generation,
        })
    }
}
