//! Running a batch: splitting it into chunks that fit one dispatch's limits, packing a chunk's
//! inputs into the mapped staging buffer, recording copies + `fusion_proj` (+ `fusion_epilogue`
//! and the readback copy), and reading the results back.

use crate::batch::BatchRef;
use crate::error::Result;
use crate::model::FusionHead;
use crate::tensor::{bytes_to_f32, DType};

use super::device::{device_error, WgpuDevice};
use super::kernels::{XType, COL_PAD, K_PAD, ROW_PAD};
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
    /// Row stride of W^T (D rounded up to [`COL_PAD`]).
    pub(super) dp: usize,
    /// Byte sizes.
    pub(super) bytes: ChunkBytes,
    /// Byte offset of each modality's rows in `x` (each `[rows_pad, ks_m]`).
    pub(super) x_off: Vec<u64>,
    /// Offset of the mask in the upload staging buffer (params and mods come first).
    pub(super) mask_at: u64,
    /// Offset of x in the upload staging buffer.
    pub(super) x_at: u64,
}

/// Rows of x a chunk of `rows` samples holds (padded so no row tile reads past it).
pub(super) fn rows_pad(rows: usize) -> usize {
    rows.div_ceil(ROW_PAD) * ROW_PAD
}

/// A modality's row stride in x: its width rounded up to [`K_PAD`].
pub(super) fn k_pad(width: usize) -> usize {
    width.div_ceil(K_PAD) * K_PAD
}

impl Layout {
    /// The layout of a chunk of `rows` samples for a GEMM of `bn`-column tiles.
    pub(super) fn new(head: &FusionHead, rows: usize, xt: XType, bn: u32) -> Layout {
        let (m, d) = (head.num_modalities() as u64, head.dim as u64);
        let n = rows as u64;
        let np = rows_pad(rows) as u64;
        let ntn = head.dim.div_ceil(bn as usize) as u32;
        let mut x_off = Vec::with_capacity(head.num_modalities());
        let mut x = 0u64;
        for md in &head.modalities {
            x_off.push(x);
            x += np * k_pad(md.width) as u64 * xt.size() as u64;
        }
        let mods = m * MOD_BYTES;
        let mask = align4(n * m);
        let mask_at = PARAMS_BYTES + mods;
        // x is read as vec4 (16 bytes): keep its staging offset 16-aligned too.
        let x_at = (mask_at + mask).div_ceil(16) * 16;
        Layout {
            rows,
            ntn,
            dp: head.dim.div_ceil(COL_PAD) * COL_PAD,
            bytes: ChunkBytes {
                mods,
                x: x.max(16),
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
    bn: u32,
    cap: usize,
) -> Result<usize> {
    let fits = |n: usize| {
        let (binding, buffer) = Layout::new(head, n, xt, bn).largest();
        binding <= gpu.max_binding && buffer <= gpu.max_buffer
    };
    let mut n = rows.min(cap).min(gpu.max_groups as usize).max(1);
    if !fits(1) {
        let (binding, _) = Layout::new(head, 1, xt, bn).largest();
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
pub(super) fn params(head: &FusionHead, rows: usize, ntn: u32, dp: usize) -> [u32; 8] {
    [
        rows as u32,
        head.dim as u32,
        head.num_modalities() as u32,
        ntn,
        (head.eps as f32).to_bits(),
        rows as u32,
        dp as u32,
        0,
    ]
}

/// Writes params, modality records, mask and inputs of `batch` into the mapped staging view:
/// each modality as `[rows_pad, ks]` of `xt`, converted on the host where its dtype differs,
/// with the padding columns and rows zeroed.
pub(super) fn pack(
    view: &mut wgpu::BufferViewMut,
    layout: &Layout,
    head: &FusionHead,
    w_off: &[u32],
    batch: &BatchRef<'_>,
    xt: XType,
) -> Result<()> {
    let es = xt.size() as u64;
    let p = params(head, layout.rows, layout.ntn, layout.dp);
    view.slice(0..PARAMS_BYTES as usize)
        .copy_from_slice(bytemuck::cast_slice(&p));
    for (i, md) in head.modalities.iter().enumerate() {
        let rec = [
            k_pad(md.width) as u32,
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
    view.slice(mask_at + batch.mask.len()..layout.x_at as usize)
        .fill(0);
    let np = rows_pad(layout.rows);
    for (i, (x, md)) in batch.inputs.iter().zip(&head.modalities).enumerate() {
        let (k, ks) = (md.width, k_pad(md.width));
        let at = (layout.x_at + layout.x_off[i]) as usize;
        let es = xt.size();
        if x.dtype == DType::F32 && xt == XType::F32 || x.dtype == DType::F16 && xt == XType::F16 {
            if k == ks {
                view.slice(at..at + x.bytes.len()).copy_from_slice(x.bytes);
            } else {
                let (rs, rd) = (k * es, ks * es);
                for (r, src) in x.bytes.chunks_exact(rs).enumerate() {
                    let o = at + r * rd;
                    view.slice(o..o + rs).copy_from_slice(src);
                    view.slice(o + rs..o + rd).fill(0);
                }
            }
        } else {
            convert_rows(view, at, x.bytes, x.dtype, xt, (k, ks), layout.rows);
        }
        view.slice(at + layout.rows * ks * es..at + np * ks * es)
            .fill(0);
    }
    Ok(())
}

/// Converts `rows` rows of `k` values of `dt` into rows of `ks` values of `xt` (zero-padded)
/// at byte `at` of the view, in small steps through a stack buffer (no allocation).
fn convert_rows(
    view: &mut wgpu::BufferViewMut,
    at: usize,
    src: &[u8],
    dt: DType,
    xt: XType,
    (k, ks): (usize, usize),
    rows: usize,
) {
    let mut tmp = [0f32; CONVERT_STEP];
    let mut tmp16 = [half::f16::ZERO; CONVERT_STEP];
    let es_in = dt.size();
    let es = xt.size();
    for r in 0..rows {
        let srow = &src[r * k * es_in..(r + 1) * k * es_in];
        let row_at = at + r * ks * es;
        for (j, piece) in srow.chunks(CONVERT_STEP * es_in).enumerate() {
            let n = piece.len() / es_in;
            bytes_to_f32(dt, piece, &mut tmp[..n]);
            let o = row_at + j * CONVERT_STEP * es;
            match xt {
                XType::F32 => view
                    .slice(o..o + n * 4)
                    .copy_from_slice(bytemuck::cast_slice(&tmp[..n])),
                XType::F16 => {
                    for (d, v) in tmp16.iter_mut().zip(&tmp[..n]) {
                        *d = half::f16::from_f32(*v);
                    }
                    view.slice(o..o + n * 2)
                        .copy_from_slice(bytemuck::cast_slice(&tmp16[..n]));
                }
            }
        }
        view.slice(row_at + k * es..row_at + ks * es).fill(0);
    }
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
