//! Running a batch: splitting it into chunks that fit one dispatch's limits, packing a chunk's
//! inputs into the mapped staging buffer, recording copies + `fusion_proj` (+ `fusion_epilogue`
//! and the readback copy), and reading the results back.

use crate::batch::BatchRef;
use crate::error::Result;
use crate::model::FusionHead;
use crate::tensor::{bytes_to_f32, DType};

use super::device::{device_error, WgpuDevice};
use super::kernels::{Tile, XType};
use super::pool::ChunkBytes;

/// Bytes of the `Params` uniform (8 words).
pub(super) const PARAMS_BYTES: u64 = 32;
/// Bytes of one `ModInfo` record.
const MOD_BYTES: u64 = 16;
/// Elements converted per step when widening f16/bf16 to f32 on the host.
const CONVERT_STEP: usize = 1024;

const fn align4(n: u64) -> u64 {
    n.div_ceil(4) * 4
}

/// Where one chunk's pieces go.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    /// Samples in the chunk.
    pub(super) rows: usize,
    /// Column tiles of the GEMM.
    pub(super) ntn: u32,
    /// Byte sizes.
    pub(super) bytes: ChunkBytes,
    /// Byte offset of each modality's rows in `x`.
    pub(super) x_off: Vec<u64>,
    /// Offset of the mask in the upload staging buffer (params and mods come first).
    pub(super) mask_at: u64,
    /// Offset of x in the upload staging buffer.
    pub(super) x_at: u64,
}

impl Layout {
    /// The layout of a chunk of `rows` samples.
    pub(super) fn new(head: &FusionHead, rows: usize, xt: XType, tile: Tile) -> Layout {
        let (m, d) = (head.num_modalities() as u64, head.dim as u64);
        let n = rows as u64;
        let ntn = head.dim.div_ceil(tile.bn() as usize) as u32;
        let mut x_off = Vec::with_capacity(head.num_modalities());
        let mut x = 0u64;
        for md in &head.modalities {
            x_off.push(x);
            x += align4(n * md.width as u64 * xt.size() as u64);
        }
        let mods = m * MOD_BYTES;
        let mask = align4(n * m);
        let mask_at = PARAMS_BYTES + mods;
        let x_at = mask_at + mask;
        Layout {
            rows,
            ntn,
            bytes: ChunkBytes {
                mods,
                x,
                mask,
                h: m * n * d * 4,
                part: m * n * ntn as u64 * 4,
                out: n * (d + m) * 4,
                upload: x_at + x,
            },
            x_off,
            mask_at,
            x_at,
        }
    }

    /// The largest sizes this chunk needs from one binding and one buffer.
    fn largest(&self) -> (u64, u64) {
        let b = &self.bytes;
        let binding = [b.mods, b.x, b.mask, b.h, b.part, b.out]
            .into_iter()
            .max()
            .unwrap_or(0);
        (binding, binding.max(b.upload))
    }
}

/// Rows per chunk: at most `cap`, and few enough that every buffer fits the adapter's binding
/// and buffer limits and the epilogue grid fits one dispatch dimension.
pub(super) fn chunk_rows(
    gpu: &WgpuDevice,
    head: &FusionHead,
    rows: usize,
    xt: XType,
    tile: Tile,
    cap: usize,
) -> Result<usize> {
    let fits = |n: usize| {
        let (binding, buffer) = Layout::new(head, n, xt, tile).largest();
        binding <= gpu.max_binding && buffer <= gpu.max_buffer
    };
    let mut n = rows.min(cap).min(gpu.max_groups as usize).max(1);
    if !fits(1) {
        let (binding, _) = Layout::new(head, 1, xt, tile).largest();
        return Err(device_error(format!(
            "one sample of this head needs a {binding}-byte binding, the adapter allows {}",
            gpu.max_binding
        )));
    }
    // Sizes are linear in n: halve until it fits (a few steps at most), then it is the chunk.
    while !fits(n) {
        n = n.div_ceil(2);
    }
    Ok(n)
}

/// The `Params` uniform of a chunk (see the shaders).
pub(super) fn params(head: &FusionHead, rows: usize, ntn: u32) -> [u32; 8] {
    [
        rows as u32,
        head.dim as u32,
        head.num_modalities() as u32,
        ntn,
        (head.eps as f32).to_bits(),
        rows as u32,
        0,
        0,
    ]
}

/// Writes params, modality records, mask and inputs of `batch` into the mapped staging view.
pub(super) fn pack(
    view: &mut wgpu::BufferViewMut,
    layout: &Layout,
    head: &FusionHead,
    w_off: &[u32],
    batch: &BatchRef<'_>,
    xt: XType,
) -> Result<()> {
    let es = xt.size() as u64;
    let p = params(head, layout.rows, layout.ntn);
    view.slice(0..PARAMS_BYTES as usize)
        .copy_from_slice(bytemuck::cast_slice(&p));
    for (i, md) in head.modalities.iter().enumerate() {
        let rec = [
            md.width as u32,
            (layout.x_off[i] / es) as u32,
            w_off[i],
            0u32,
        ];
        let at = (PARAMS_BYTES + i as u64 * MOD_BYTES) as usize;
        view.slice(at..at + MOD_BYTES as usize)
            .copy_from_slice(bytemuck::cast_slice(&rec));
    }
    let mask_at = layout.mask_at as usize;
    view.slice(mask_at..mask_at + batch.mask.len())
        .copy_from_slice(batch.mask);
    let pad = layout.bytes.mask as usize - batch.mask.len();
    view.slice(mask_at + batch.mask.len()..mask_at + batch.mask.len() + pad)
        .fill(0);
    for (i, x) in batch.inputs.iter().enumerate() {
        let at = (layout.x_at + layout.x_off[i]) as usize;
        match (xt, x.dtype) {
            (XType::F32, DType::F32) | (XType::F16, DType::F16) => {
                view.slice(at..at + x.bytes.len()).copy_from_slice(x.bytes);
            }
            (XType::F32, dt) => {
                // Widen on the host in small steps through a stack buffer (no allocation).
                let mut tmp = [0f32; CONVERT_STEP];
                let es_in = dt.size();
                for (j, src) in x.bytes.chunks(CONVERT_STEP * es_in).enumerate() {
                    let n = src.len() / es_in;
                    bytes_to_f32(dt, src, &mut tmp[..n]);
                    let o = at + j * CONVERT_STEP * 4;
                    view.slice(o..o + n * 4)
                        .copy_from_slice(bytemuck::cast_slice(&tmp[..n]));
                }
            }
            (XType::F16, dt) => {
                return Err(device_error(format!(
                    "internal: {dt} input packed for the f16 kernel (it is chosen only when every input is f16)"
                )))
            }
        }
    }
    Ok(())
}

/// Copies `n` little-endian f32 values from `src` into `dst`.
pub(super) fn read_f32(src: &[u8], dst: &mut [f32]) {
    match bytemuck::try_cast_slice::<u8, f32>(src) {
        Ok(v) => dst.copy_from_slice(v),
        Err(_) => {
            for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}
