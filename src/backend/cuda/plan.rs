//! Chunk planning for the CUDA pipeline: how a batch is cut into chunks (about `CHUNK_BYTES` of
//! input each, at least two once it holds `2 * SPLIT_BYTES`; with `FUSION_CUDA_TAPER=1` the
//! last ones halving), the byte layout of a chunk's input and output slots, and the dtype of
//! the projections `h`. Pure arithmetic: the launch sequence that follows the plan is
//! `pipeline.rs`, the epilogue's launch shape `epilogue_plan.rs`.

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

/// Row counts of a batch's chunks in order: [`chunk_rows`]'s chunks of one size (the last one
/// smaller), or, with `taper` and when those are two or more, chunks of that size while more
/// than two chunks' worth remains, then chunks halving down to at most `2 * MIN_CHUNK_ROWS`
/// rows. What tapering is for: a batch's last chunk's compute and download overlap nothing (the
/// copies before it overlap the chunks before), so a small last chunk shortens the run, while
/// most bytes still go in large copies (a pinned copy's rate grew with its size on an H200,
/// docs/PERF.md session 5; B = 8192 f16 from page-locked inputs waited 0.71 ms a batch for
/// copies of 0.61 ms, session 14). Opt-in (`FUSION_CUDA_TAPER=1`) until measured on a GPU.
fn chunk_sizes(rows: usize, row_bytes: usize, chunk_bytes: usize, taper: bool) -> Vec<usize> {
    let c = chunk_rows(rows, row_bytes, chunk_bytes);
    let uniform = || {
        let mut v = vec![c; rows / c];
        if !rows.is_multiple_of(c) {
            v.push(rows % c);
        }
        v
    };
    if !taper || c >= rows || rows <= 2 * MIN_CHUNK_ROWS {
        return uniform();
    }
    let mut sizes = Vec::new();
    let mut left = rows;
    while left > 2 * c {
        sizes.push(c);
        left -= c;
    }
    while left > 2 * MIN_CHUNK_ROWS {
        let n = left.div_ceil(2);
        sizes.push(n);
        left -= n;
    }
    sizes.push(left);
    sizes
}

/// `FUSION_CUDA_TAPER`: `1` tapers the last chunks ([`chunk_sizes`]); unset, empty or `0` does
/// not; anything else does not either, with a warning (read once).
fn taper() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(
        || match std::env::var("FUSION_CUDA_TAPER").as_deref().map(str::trim) {
            Ok("1") => true,
            Err(_) | Ok("") | Ok("0") => false,
            Ok(other) => {
                tracing::warn!("FUSION_CUDA_TAPER={other}: expected 1 or 0; not tapering");
                false
            }
        },
    )
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
    /// Rows of the largest chunk (what the buffers are sized for).
    pub(super) chunk: usize,
    /// Each chunk's first row and row count, in order.
    chunks: Vec<(usize, usize)>,
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
        let sizes = chunk_sizes(batch.rows, row_bytes, chunk_bytes(), taper());
        let chunks: Vec<(usize, usize)> = sizes
            .iter()
            .scan(0, |r0, &n| {
                let c = (*r0, n);
                *r0 += n;
                Some(c)
            })
            .collect();
        let h_dtype = h_dtype(&gemm_dtype, path);
        Ok(Plan {
            chunk: sizes.iter().copied().max().unwrap_or(0),
            chunks,
            gemm_dtype,
            h_dtype,
        })
    }

    /// Chunks of the batch.
    pub(super) fn nchunks(&self) -> usize {
        self.chunks.len()
    }

    /// Chunk `k` (< [`Plan::nchunks`]): its first row, its row count and its byte layout.
    pub(super) fn chunk_at(
        &self,
        k: usize,
        widths: &[usize],
        dim: usize,
    ) -> (usize, usize, Layout) {
        let (r0, n) = self.chunks.get(k).copied().unwrap_or((0, 0));
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
    fn tapered_chunks_cover_the_batch_and_end_small() {
        let (f32_row, f16_row) = (1920 * 4 + 3, 1920 * 2 + 3);
        let covers = |v: &[usize], rows: usize| v.iter().sum::<usize>() == rows && !v.contains(&0);
        // Not tapering: chunk_rows's chunks, the last one what is left.
        assert_eq!(chunk_sizes(8192, f16_row, CHUNK_BYTES, false), [4096, 4096]);
        assert_eq!(chunk_sizes(1000, f32_row, 1, false), [125; 8]);
        let mut v = vec![126; 7];
        v.push(119);
        assert_eq!(chunk_sizes(1001, 1 << 20, CHUNK_BYTES, false), v);
        // B = 8192 f16 (two halves untapered): halving down to 256 rows.
        assert_eq!(
            chunk_sizes(8192, f16_row, CHUNK_BYTES, true),
            [4096, 2048, 1024, 512, 256, 256]
        );
        // B = 8192 f32 at 8 MiB chunks (1091 rows each, 8 of them): full chunks while more than
        // two remain, then the halving tail; every chunk within the target.
        let c = chunk_rows(8192, f32_row, 8 << 20);
        let v = chunk_sizes(8192, f32_row, 8 << 20, true);
        assert!(covers(&v, 8192), "{v:?}");
        assert!(v.iter().all(|&n| n <= c), "{v:?} (chunk {c})");
        assert!(*v.last().expect("chunks") <= 2 * MIN_CHUNK_ROWS, "{v:?}");
        assert!(v.windows(2).all(|w| w[0] >= w[1]), "{v:?}");
        // One chunk, or too few rows to taper: as untapered.
        assert_eq!(chunk_sizes(1024, f32_row, CHUNK_BYTES, true), [1024]);
        assert_eq!(chunk_sizes(200, 1 << 20, CHUNK_BYTES, true), [100, 100]);
        // Random batches: the chunks cover the rows in order, none empty, none over the largest
        // untapered one unless it is the small last chunk.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let rows = 1 + (seed % 50_000) as usize;
            let row_bytes = 1 + ((seed >> 20) % 20_000) as usize;
            let chunk_bytes = 1 + ((seed >> 40) % (64 << 20)) as usize;
            let c = chunk_rows(rows, row_bytes, chunk_bytes);
            for taper in [false, true] {
                let v = chunk_sizes(rows, row_bytes, chunk_bytes, taper);
                assert!(
                    covers(&v, rows),
                    "{rows} {row_bytes} {chunk_bytes} {taper}: {v:?}"
                );
                let (last, body) = v.split_last().expect("at least one chunk");
                assert!(body.iter().all(|&n| n <= c), "{v:?} (chunk {c})");
                assert!(*last <= c.max(2 * MIN_CHUNK_ROWS), "{v:?} (chunk {c})");
            }
        }
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
}
