//! Chunk planning for the CUDA pipeline: how a batch is cut into chunks (about `CHUNK_BYTES` of
//! input each, at least two once it holds `2 * SPLIT_BYTES`), the byte layout of a chunk's
//! input and output slots, and how the epilogue kernel is launched for a head. Pure
//! arithmetic: the launch sequence that follows the plan is `pipeline.rs`.

use super::kernels::Kernels;
use super::mem::align256;
use super::weights::DeviceHead;
use crate::batch::BatchRef;
use crate::tensor::DType;

/// Target input bytes per chunk. Measured on an H200 host (docs/PERF.md, 2026-11-27): the rate
/// of one pinned host-to-device copy grew with its size there (8 MiB: 23-25 GB/s, 16 MiB:
/// 44-46, 32 MiB: 49-50 against a 54 GB/s ceiling), and overlap buys little when the GPU's part
/// of a chunk is a small fraction of its copies, so chunks are large: a batch of up to 32 MiB of
/// input is one chunk. Tunable with `FUSION_CUDA_CHUNK_MIB` (read once; scripts/cuda-tune.sh
/// sweeps it).
const CHUNK_BYTES: usize = 32 << 20;

/// A batch of at least twice this much input is cut into at least two chunks. Measured on the
/// H200 host (docs/PERF.md, session 6): a B = 8192 f16 batch (31.5 MB) as one 32 MiB chunk ran
/// at 4.2-4.4M samples/s host to host, as two 16 MiB chunks at 5.4-5.5M (its H2D copy of the
/// second half then overlaps the first half's GEMMs and the D2H of its results).
const SPLIT_BYTES: usize = 8 << 20;

/// Rows per chunk for a batch of `rows` rows of `row_bytes` input each: chunks of about
/// `chunk_bytes` (at least [`MIN_CHUNK_ROWS`] rows), at least two when the batch holds
/// `2 * SPLIT_BYTES`, all of one size but the last.
fn chunk_rows(rows: usize, row_bytes: usize, chunk_bytes: usize) -> usize {
    let target = (chunk_bytes / row_bytes.max(1)).max(MIN_CHUNK_ROWS);
    let mut nchunks = rows.div_ceil(target);
    if rows.saturating_mul(row_bytes) >= 2 * SPLIT_BYTES && rows >= 2 * MIN_CHUNK_ROWS {
        nchunks = nchunks.max(2);
    }
    rows.div_ceil(nchunks.max(1)).max(1)
}

/// [`CHUNK_BYTES`], or `FUSION_CUDA_CHUNK_MIB` MiB when set to a positive number.
fn chunk_bytes() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("FUSION_CUDA_CHUNK_MIB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&v| v > 0)
            .map_or(CHUNK_BYTES, |v| v << 20)
    })
}
/// Fewest rows per chunk (GEMM efficiency).
const MIN_CHUNK_ROWS: usize = 128;
/// Epilogue flags (kernels/fusion_epilogue.cu).
pub(super) const Z_IN_SHARED: i32 = 1;
pub(super) const H_IN_SHARED: i32 = 2;

/// Byte layout of one chunk of `n` rows.
pub(super) struct Layout {
    /// Per modality: offset in the input slot.
    pub(super) x_off: Vec<usize>,
    pub(super) mask_off: usize,
    pub(super) in_bytes: usize,
    pub(super) w_off: usize,
    pub(super) out_bytes: usize,
}

/// Which dtype the GEMMs write the projections `h` in (docs/DESIGN.md section 2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HPath {
    /// The inputs' half dtype when every modality's GEMM runs in the same half dtype, else f32.
    Auto,
    /// Always f32 (the path before half `h`; the host's rerun after a half overflow).
    F32,
}

impl HPath {
    /// `FUSION_CUDA_H`: unset, empty or `auto` is [`HPath::Auto`], `f32` forces f32 (for
    /// comparing the two paths on a GPU, docs/PERF.md "GPU"); anything else is an error.
    pub(super) fn from_env() -> Result<HPath, String> {
        HPath::parse(std::env::var("FUSION_CUDA_H").ok().as_deref())
    }

    /// [`HPath::from_env`] for the variable's value (`None`: unset).
    fn parse(v: Option<&str>) -> Result<HPath, String> {
        match v.map(str::trim) {
            None | Some("") | Some("auto") => Ok(HPath::Auto),
            Some("f32") => Ok(HPath::F32),
            Some(other) => Err(format!("FUSION_CUDA_H={other}: expected auto or f32")),
        }
    }
}

/// The dtype of `h` for GEMMs in `gemm_dtype`: a half dtype only when every modality's GEMM
/// runs in it (one epilogue reads all of `h`), so mixed or f32 inputs keep f32 `h`.
pub(super) fn h_dtype(gemm_dtype: &[DType], path: HPath) -> DType {
    match gemm_dtype.first() {
        Some(&t)
            if path == HPath::Auto && t != DType::F32 && gemm_dtype.iter().all(|&g| g == t) =>
        {
            t
        }
        _ => DType::F32,
    }
}

/// Per-batch plan.
pub(super) struct Plan {
    pub(super) chunk: usize,
    /// Per modality: the dtype staged and multiplied (the input's, or f32 when the weights do
    /// not fit the input's dtype; then the host widens while staging).
    pub(super) gemm_dtype: Vec<DType>,
    /// The dtype the GEMMs write `h` in and the epilogue reads ([`h_dtype`]).
    pub(super) h_dtype: DType,
}

impl Plan {
    /// The plan for `batch`: each modality's GEMM dtype (uploading the head's weights in that
    /// dtype when they fit it), the dtype of `h` and the rows per chunk.
    pub(super) fn for_batch(
        dh: &mut DeviceHead,
        batch: &BatchRef<'_>,
        path: HPath,
    ) -> Result<Plan, String> {
        let mut gemm_dtype = Vec::with_capacity(batch.inputs.len());
        for x in &batch.inputs {
            gemm_dtype.push(if dh.ensure(x.dtype)? {
                x.dtype
            } else {
                DType::F32
            });
        }
        let head = &dh.head;
        let row_bytes: usize = head
            .modalities
            .iter()
            .zip(&gemm_dtype)
            .map(|(m, t)| m.width * t.size())
            .sum::<usize>()
            + head.num_modalities();
        let chunk = chunk_rows(batch.rows, row_bytes, chunk_bytes());
        let h_dtype = h_dtype(&gemm_dtype, path);
        Ok(Plan {
            chunk,
            gemm_dtype,
            h_dtype,
        })
    }

    /// Chunk `k` of a batch of `rows`: its first row, its row count and its byte layout.
    pub(super) fn chunk_at(
        &self,
        k: usize,
        rows: usize,
        widths: &[usize],
        dim: usize,
    ) -> (usize, usize, Layout) {
        let r0 = k * self.chunk;
        let n = self.chunk.min(rows - r0);
        (r0, n, layout(n, widths, &self.gemm_dtype, dim))
    }
}

pub(super) fn layout(n: usize, widths: &[usize], dtypes: &[DType], dim: usize) -> Layout {
    let mut off = 0;
    let mut x_off = Vec::with_capacity(widths.len());
    for (w, t) in widths.iter().zip(dtypes) {
        x_off.push(off);
        off += align256(n * w * t.size());
    }
    let mask_off = off;
    let in_bytes = mask_off + n * widths.len();
    let w_off = align256(n * dim * 4);
    Layout {
        x_off,
        mask_off,
        in_bytes,
        w_off,
        out_bytes: w_off + n * widths.len() * 4,
    }
}

/// How the epilogue is launched for one head.
pub(super) struct EpiloguePlan {
    pub(super) func: cudarc::driver::sys::CUfunction,
    pub(super) name: &'static str,
    pub(super) rows_per_block: u32,
    pub(super) block: u32,
    pub(super) smem: u32,
    pub(super) flags: i32,
}

/// Warps (rows) per block of the warp-per-row epilogue.
pub(super) const WARP_ROWS: usize = 8;

/// Which epilogue kernel runs (`FUSION_CUDA_EPILOGUE`; kernels/fusion_epilogue.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EpilogueKind {
    /// One block per row, any D (unset, empty or `block`): the default, the one measured on
    /// an H200 (docs/PERF.md "GPU").
    Block,
    /// One warp per row, one element a load (`warp`): agrees with the reference under host
    /// emulation and passed `selftest` and tests/cuda_backend.rs on an H200 (session 6), but was
    /// not faster there overall (its epilogue 9-14% faster at B = 8192, 0.021 against 0.012 ms
    /// at B = 1024).
    Warp,
    /// One warp per row, 16 bytes a load (`vec`), where D is a multiple of the elements one
    /// load brings (4 f32, 8 f16/bf16); else as [`EpilogueKind::Warp`]. Written for the f16
    /// head's epilogue, which moved ~0.3 TB/s on an H200 (docs/PERF.md, session 14): checked by
    /// host emulation and NVRTC, not yet run on a GPU.
    Vec,
}

impl EpilogueKind {
    /// `FUSION_CUDA_EPILOGUE` (read once); an unknown value is an error.
    pub(super) fn from_env() -> Result<EpilogueKind, String> {
        static V: std::sync::OnceLock<Result<EpilogueKind, String>> = std::sync::OnceLock::new();
        V.get_or_init(|| EpilogueKind::parse(std::env::var("FUSION_CUDA_EPILOGUE").ok().as_deref()))
            .clone()
    }

    /// [`EpilogueKind::from_env`] for the variable's value (`None`: unset).
    fn parse(v: Option<&str>) -> Result<EpilogueKind, String> {
        match v.map(str::trim) {
            None | Some("") | Some("block") => Ok(EpilogueKind::Block),
            Some("warp") => Ok(EpilogueKind::Warp),
            Some("vec") => Ok(EpilogueKind::Vec),
            Some(other) => Err(format!(
                "FUSION_CUDA_EPILOGUE={other}: expected block, warp or vec"
            )),
        }
    }
}

/// The epilogue `kind` asks for, where it fits the head (D up to 1024 and the M scores in
/// shared memory for the warp-per-row ones, D a multiple of the load's elements for `vec`),
/// else the block-per-row one; reading `h` in `h_dtype`. Every buffer the kernel reads or
/// writes starts 256-byte aligned (device allocations, `align256` offsets), so with D a
/// multiple of the load's elements every row of `h`, `bias`, `y` is 16-byte aligned too.
pub(super) fn epilogue_plan(
    kernels: &Kernels,
    kind: EpilogueKind,
    d: usize,
    m: usize,
    smem_limit: usize,
    h_dtype: DType,
) -> Result<EpiloguePlan, String> {
    let hi = super::kernels::h_index(h_dtype);
    let warp = |func: Option<&cudarc::driver::CudaFunction>, name: &'static str| {
        func.map(|f| EpiloguePlan {
            func: f.cu_function(),
            name,
            rows_per_block: WARP_ROWS as u32,
            block: (32 * WARP_ROWS) as u32,
            smem: (4 * WARP_ROWS * m) as u32,
            flags: 0,
        })
    };
    if kind == EpilogueKind::Vec {
        if let Some(i) = vec_variant(d, m, smem_limit, h_dtype) {
            let f = kernels.epilogue_vec.get(i).and_then(|v| v.get(hi));
            if let Some(p) = warp(f, super::kernels::EPILOGUE_VEC[i][hi]) {
                return Ok(p);
            }
        }
    }
    if kind != EpilogueKind::Block {
        if let Some(i) = warp_variant(d, m, smem_limit) {
            let f = kernels.epilogue_warp.get(i).and_then(|v| v.get(hi));
            if let Some(p) = warp(f, super::kernels::EPILOGUE_WARP[i][hi]) {
                return Ok(p);
            }
        }
    }
    let (block, smem, flags) = epilogue_shape(d, m, smem_limit)?;
    let func = kernels
        .epilogue
        .get(hi)
        .ok_or_else(|| format!("no epilogue kernel for h in {h_dtype:?}"))?;
    Ok(EpiloguePlan {
        func: func.cu_function(),
        name: super::kernels::EPILOGUE[hi],
        rows_per_block: 1,
        block,
        smem,
        flags,
    })
}

/// Index into `EPILOGUE_WARP` of the smallest warp-per-row variant for D, if one fits.
pub(super) fn warp_variant(d: usize, m: usize, smem_limit: usize) -> Option<usize> {
    if 4 * WARP_ROWS * m > smem_limit {
        return None;
    }
    super::kernels::WARP_PER_LANE
        .iter()
        .position(|&per_lane| d <= 32 * per_lane)
}

/// Index into `EPILOGUE_VEC` of the smallest 16-byte-load variant for D and `h` in `h_dtype`,
/// if one fits: D a multiple of the elements one 16-byte load of `h` brings.
pub(super) fn vec_variant(d: usize, m: usize, smem_limit: usize, h_dtype: DType) -> Option<usize> {
    if 4 * WARP_ROWS * m > smem_limit || !d.is_multiple_of(16 / h_dtype.size()) {
        return None;
    }
    super::kernels::VEC_PER_LANE
        .iter()
        .position(|&per_lane| d <= 32 * per_lane)
}

/// Block size, dynamic shared memory and flags for the block-per-row epilogue.
pub(super) fn epilogue_shape(
    d: usize,
    m: usize,
    smem_limit: usize,
) -> Result<(u32, u32, i32), String> {
    // About 4 elements per thread, 1 to 8 warps.
    let block = (d.div_ceil(4).div_ceil(32) * 32).clamp(32, 256) as u32;
    let base = 4 * (32 + 2 * m);
    if base > smem_limit {
        return Err(format!(
            "{m} modalities need {base} B of shared memory, the GPU has {smem_limit}"
        ));
    }
    let mut smem = base;
    let mut flags = 0;
    if base + 4 * d <= smem_limit {
        smem += 4 * d;
        flags |= Z_IN_SHARED;
        if smem + 4 * m * d <= smem_limit {
            smem += 4 * m * d;
            flags |= H_IN_SHARED;
        }
    }
    Ok((block, smem as u32, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_about_the_target_and_big_batches_are_split() {
        // The default head: 1920 inputs + 3 mask bytes per row.
        let (f32_row, f16_row) = (1920 * 4 + 3, 1920 * 2 + 3);
        // Small batches: one chunk.
        assert_eq!(chunk_rows(1, f32_row, CHUNK_BYTES), 1);
        assert_eq!(chunk_rows(1024, f32_row, CHUNK_BYTES), 1024);
        // B = 8192 f16 (31.5 MB, under one 32 MiB chunk): two halves.
        assert_eq!(chunk_rows(8192, f16_row, CHUNK_BYTES), 4096);
        // B = 8192 f32 (63 MB): two chunks of 32 MiB or less.
        let c = chunk_rows(8192, f32_row, CHUNK_BYTES);
        assert_eq!(c, 4096);
        assert!(c * f32_row <= CHUNK_BYTES);
        // Big batches: chunks under the target, all but the last of one size.
        let c = chunk_rows(100_000, f32_row, CHUNK_BYTES);
        assert!(
            c * f32_row <= CHUNK_BYTES && c * f32_row > CHUNK_BYTES / 2,
            "{c}"
        );
        // Just under twice SPLIT_BYTES: not split; a batch too few rows to split: one chunk.
        let rows = (2 * SPLIT_BYTES - 1) / f32_row;
        assert_eq!(chunk_rows(rows, f32_row, CHUNK_BYTES), rows);
        // Two even chunks.
        assert_eq!(chunk_rows(200, 1 << 20, CHUNK_BYTES), 100);
        // A tiny target still gives MIN_CHUNK_ROWS rows per chunk.
        assert_eq!(
            chunk_rows(1000, f32_row, 1),
            1000usize.div_ceil(1000usize.div_ceil(MIN_CHUNK_ROWS))
        );
    }

    #[test]
    fn layout_is_aligned_and_tight() {
        let l = layout(
            33,
            &[37, 5, 129],
            &[DType::F32, DType::F16, DType::BF16],
            67,
        );
        assert_eq!(l.x_off[0], 0);
        assert!(l.x_off.iter().all(|o| o % 256 == 0));
        assert_eq!(l.x_off[1], align256(33 * 37 * 4));
        assert_eq!(l.mask_off, l.x_off[2] + align256(33 * 129 * 2));
        assert_eq!(l.in_bytes, l.mask_off + 33 * 3);
        assert_eq!(l.w_off % 256, 0);
        assert_eq!(l.out_bytes, l.w_off + 33 * 3 * 4);
    }

    #[test]
    fn warp_variant_is_the_smallest_that_holds_d() {
        assert_eq!(warp_variant(512, 3, 48 << 10), Some(2));
        assert_eq!(warp_variant(513, 3, 48 << 10), Some(3));
        assert_eq!(warp_variant(1, 1, 48 << 10), Some(0));
        assert_eq!(warp_variant(128, 1, 48 << 10), Some(0));
        assert_eq!(warp_variant(1024, 8, 48 << 10), Some(3));
        assert_eq!(warp_variant(1025, 3, 48 << 10), None);
        // Too many modalities for the scores in shared memory: block-per-row.
        assert_eq!(warp_variant(64, 2000, 48 << 10), None);
    }

    #[test]
    fn vec_variant_needs_whole_16_byte_loads() {
        use DType::*;
        // The default head (D = 512): vec16 for every dtype.
        for t in [F32, F16, BF16] {
            assert_eq!(vec_variant(512, 3, 48 << 10, t), Some(1), "{t:?}");
        }
        // Smallest that holds D, 8 elements a lane at least.
        assert_eq!(vec_variant(8, 1, 48 << 10, F16), Some(0));
        assert_eq!(vec_variant(256, 1, 48 << 10, F32), Some(0));
        assert_eq!(vec_variant(264, 1, 48 << 10, F16), Some(1));
        assert_eq!(vec_variant(1024, 1, 48 << 10, BF16), Some(2));
        // D not a multiple of the load's elements (4 f32, 8 halves), too large, too many scores.
        assert_eq!(vec_variant(100, 1, 48 << 10, F32), Some(0));
        assert_eq!(vec_variant(100, 1, 48 << 10, F16), None);
        assert_eq!(vec_variant(514, 1, 48 << 10, F32), None);
        assert_eq!(vec_variant(1032, 1, 48 << 10, F16), None);
        assert_eq!(vec_variant(64, 2000, 48 << 10, F32), None);
    }

    #[test]
    fn fusion_cuda_epilogue_values() {
        assert_eq!(EpilogueKind::parse(None), Ok(EpilogueKind::Block));
        assert_eq!(EpilogueKind::parse(Some(" block")), Ok(EpilogueKind::Block));
        assert_eq!(EpilogueKind::parse(Some("warp")), Ok(EpilogueKind::Warp));
        assert_eq!(EpilogueKind::parse(Some("vec\n")), Ok(EpilogueKind::Vec));
        let e = EpilogueKind::parse(Some("fast")).expect_err("not a kind");
        assert!(e.contains("FUSION_CUDA_EPILOGUE=fast"), "{e}");
    }

    #[test]
    fn h_is_half_only_when_every_gemm_is_that_half() {
        use DType::*;
        assert_eq!(h_dtype(&[F16, F16, F16], HPath::Auto), F16);
        assert_eq!(h_dtype(&[BF16], HPath::Auto), BF16);
        // Forced f32, f32 inputs, mixed dtypes, weights that did not fit f16 (f32 GEMM).
        assert_eq!(h_dtype(&[F16, F16], HPath::F32), F32);
        assert_eq!(h_dtype(&[BF16], HPath::F32), F32);
        assert_eq!(h_dtype(&[F32, F32], HPath::Auto), F32);
        assert_eq!(h_dtype(&[F16, BF16], HPath::Auto), F32);
        assert_eq!(h_dtype(&[F16, F32], HPath::Auto), F32);
        assert_eq!(h_dtype(&[], HPath::Auto), F32);
    }

    #[test]
    fn fusion_cuda_h_values() {
        assert_eq!(HPath::parse(None), Ok(HPath::Auto));
        assert_eq!(HPath::parse(Some("")), Ok(HPath::Auto));
        assert_eq!(HPath::parse(Some("auto")), Ok(HPath::Auto));
        assert_eq!(HPath::parse(Some(" f32\n")), Ok(HPath::F32));
        let e = HPath::parse(Some("f16")).expect_err("f16 is not a setting");
        assert!(
            e.contains("FUSION_CUDA_H=f16") && e.contains("auto or f32"),
            "{e}"
        );
    }

    #[test]
    fn every_h_dtype_has_its_kernels() {
        use super::super::kernels::{
            h_index, EPILOGUE, EPILOGUE_VEC, EPILOGUE_WARP, VEC_PER_LANE, WARP_PER_LANE,
        };
        for (i, t) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            assert_eq!(h_index(t), i);
            let suffix = format!("_{}", t.name());
            assert!(EPILOGUE[i].ends_with(&suffix), "{}", EPILOGUE[i]);
            for (j, pl) in WARP_PER_LANE.iter().enumerate() {
                assert_eq!(
                    EPILOGUE_WARP[j][i],
                    format!("fusion_epilogue_warp{pl}{suffix}")
                );
            }
            for (j, pl) in VEC_PER_LANE.iter().enumerate() {
                assert_eq!(
                    EPILOGUE_VEC[j][i],
                    format!("fusion_epilogue_vec{pl}{suffix}")
                );
            }
        }
    }

    #[test]
    fn epilogue_shape_fits_shared_memory() {
        // Default head: everything in shared memory.
        let (b, s, f) = epilogue_shape(512, 3, 48 << 10).expect("fits");
        assert_eq!((b, f), (128, Z_IN_SHARED | H_IN_SHARED));
        assert_eq!(s as usize, 4 * (32 + 6 + 512 + 3 * 512));
        // Huge D: z falls back to the output row, h is re-read.
        let (b, s, f) = epilogue_shape(20_000, 3, 48 << 10).expect("fits");
        assert_eq!((b, f), (256, 0));
        assert_eq!(s as usize, 4 * 38);
        // Tiny D: one warp.
        assert_eq!(epilogue_shape(8, 1, 48 << 10).expect("fits").0, 32);
    }
}
