//! Projections of narrow heads (D <= [`MAX_NARROW_DIM`]) without the GEMM crate.
//!
//! For a few output columns the `gemm` crate's microkernels are badly shaped (16 rows x 6
//! columns, load-bound, after packing the inputs), and f16 inputs are widened into a scratch
//! matrix first: with the D = 8 test head, 66% of a batch's time went to the microkernel and
//! 14% to the widening (`perf`, docs/PERF.md session 14). Here each pair of rows is read once,
//! straight from the batch (f32, or f16 widened in registers), against eight weight rows at a
//! time: 16 accumulators of 16 lanes, one FMA per weight vector and row, a horizontal sum per
//! output at the end. AVX-512F only; elsewhere the GEMM path runs as before.
//!
//! Weights are the head's own layout (`[D, d_m]`, an output's weights contiguous), padded to
//! a multiple of 8 output rows with zeros ([`NarrowWeights`]), so every group has 8 rows.

use crate::tensor::DType;

/// Widest head the narrow kernel takes; wider ones keep the GEMM (which wins from D = 32 on:
/// there each row's inputs are reused across many outputs).
pub(super) const MAX_NARROW_DIM: usize = 16;

/// Output rows per group (one accumulator per row and output).
const GROUP: usize = 8;

/// One modality's projection weights for the narrow kernel.
pub(super) struct NarrowWeights {
    /// `[groups * 8, k]`, output `o`'s weights at `o * k`; rows past `d` are zeros.
    w: Vec<f32>,
    k: usize,
    d: usize,
}

impl NarrowWeights {
    /// From the head's `[d, k]` row-major projection, when this CPU runs the narrow kernel and
    /// the head is narrow enough.
    pub(super) fn new(w: &[f32], d: usize, k: usize) -> Option<NarrowWeights> {
        if d == 0 || d > MAX_NARROW_DIM || k == 0 || w.len() != d * k || !available() {
            return None;
        }
        let mut padded = vec![0f32; d.div_ceil(GROUP) * GROUP * k];
        padded[..d * k].copy_from_slice(w);
        Some(NarrowWeights { w: padded, k, d })
    }

    /// `dst[r * d + o] = sum_c x[r][c] * w[o][c]` for the `n` rows of `x` (row stride `k`, in
    /// `dtype`). False, with `dst` untouched, for a dtype it does not read (bf16: the caller
    /// widens and runs the GEMM) or sizes that do not match.
    pub(super) fn project(&self, dtype: DType, x: &[u8], n: usize, dst: &mut [f32]) -> bool {
        let (k, d) = (self.k, self.d);
        if dst.len() != n * d || x.len() != n * k * dtype.size() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if available() {
            let f16 = match dtype {
                DType::F32 => false,
                DType::F16 => true,
                DType::BF16 => return false,
            };
            // SAFETY: AVX-512F was detected; `x` holds n rows of k values of `dtype` and
            // `dst` n rows of d (both checked above); `self.w` holds groups * 8 rows of k.
            unsafe { project_avx512(&self.w, k, d, f16, x.as_ptr(), n, dst) };
            return true;
        }
        let _ = (x, dst);
        false
    }
}

/// Whether this CPU runs the narrow kernel.
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// # Safety
/// AVX-512F; `x` points at `n` rows of `k` values (f16 when `f16`, else f32), any alignment;
/// `w` holds `d.div_ceil(8) * 8` rows of `k` f32; `dst.len() == n * d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn project_avx512(
    w: &[f32],
    k: usize,
    d: usize,
    f16: bool,
    x: *const u8,
    n: usize,
    dst: &mut [f32],
) {
    let size = if f16 { 2 } else { 4 };
    let row = |r: usize| {
        // SAFETY: r < n, so the row starts inside the batch (caller's contract).
        unsafe { x.add(r * k * size) }
    };
    for g in 0..d.div_ceil(GROUP) {
        let wg = &w[g * GROUP * k..(g + 1) * GROUP * k];
        let outs = GROUP.min(d - g * GROUP);
        let mut r = 0;
        while r < n {
            let pair = r + 1 < n;
            // A lone last row is computed as a pair with itself; its copy is discarded.
            let r1 = if pair { r + 1 } else { r };
            // SAFETY: rows r and r1 are < n; wg holds 8 rows of k (caller's contract).
            let (s0, s1) = unsafe { dot8x2(wg, k, f16, row(r), row(r1)) };
            dst[r * d + g * GROUP..r * d + g * GROUP + outs].copy_from_slice(&s0[..outs]);
            if pair {
                dst[r1 * d + g * GROUP..r1 * d + g * GROUP + outs].copy_from_slice(&s1[..outs]);
            }
            r += 2;
        }
    }
}

/// Two rows against eight weight rows: `(x0 . w[o], x1 . w[o])` for o in 0..8.
///
/// # Safety
/// AVX-512F; `x0` and `x1` point at `k` values (f16 when `f16`, else f32), any alignment; `w`
/// holds 8 rows of `k` f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot8x2(
    w: &[f32],
    k: usize,
    f16: bool,
    x0: *const u8,
    x1: *const u8,
) -> ([f32; GROUP], [f32; GROUP]) {
    use std::arch::x86_64::*;
    debug_assert!(w.len() >= GROUP * k);
    let load = |x: *const u8, c: usize| {
        // SAFETY: c + 16 <= k, so values c..c + 16 of the row exist (caller's contract);
        // unaligned loads are allowed.
        unsafe {
            if f16 {
                _mm512_cvtph_ps(_mm256_loadu_si256(x.add(2 * c).cast::<__m256i>()))
            } else {
                _mm512_loadu_ps(x.add(4 * c).cast::<f32>())
            }
        }
    };
    let mut a0 = [_mm512_setzero_ps(); GROUP];
    let mut a1 = [_mm512_setzero_ps(); GROUP];
    let wp = w.as_ptr();
    let full = k / 16 * 16;
    let mut c = 0;
    while c < full {
        let (v0, v1) = (load(x0, c), load(x1, c));
        for o in 0..GROUP {
            // SAFETY: o * k + c + 16 <= 8 * k <= w.len().
            let wv = unsafe { _mm512_loadu_ps(wp.add(o * k + c)) };
            a0[o] = _mm512_fmadd_ps(v0, wv, a0[o]);
            a1[o] = _mm512_fmadd_ps(v1, wv, a1[o]);
        }
        c += 16;
    }
    let mut s0 = [0f32; GROUP];
    let mut s1 = [0f32; GROUP];
    for o in 0..GROUP {
        s0[o] = _mm512_reduce_add_ps(a0[o]);
        s1[o] = _mm512_reduce_add_ps(a1[o]);
    }
    // The last k % 16 values, scalar.
    let value = |x: *const u8, c: usize| {
        // SAFETY: c < k (caller's contract); read_unaligned allows any alignment.
        unsafe {
            if f16 {
                half::f16::from_bits(x.add(2 * c).cast::<u16>().read_unaligned()).to_f32()
            } else {
                x.add(4 * c).cast::<f32>().read_unaligned()
            }
        }
    };
    for c in full..k {
        let (v0, v1) = (value(x0, c), value(x1, c));
        for o in 0..GROUP {
            s0[o] += v0 * w[o * k + c];
            s1[o] += v1 * w[o * k + c];
        }
    }
    (s0, s1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every shape edge (rows odd and even, widths with and without a 16-value tail, D up to
    /// 16 with and without padding) in f32 and f16, against a float64 reference.
    #[test]
    fn matches_a_float64_reference_at_every_edge() {
        if !available() {
            eprintln!("skipping: no AVX-512F on this CPU (the GEMM path runs instead)");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        for &(n, k, d) in &[
            (1, 16, 8),
            (2, 1, 1),
            (3, 17, 8),
            (5, 128, 3),
            (256, 1024, 8),
            (7, 768, 16),
            (4, 40, 9),
        ] {
            let w: Vec<f32> = (0..d * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let nw = NarrowWeights::new(&w, d, k).expect("narrow");
            for dtype in [DType::F32, DType::F16] {
                let vals: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let (bytes, exact): (Vec<u8>, Vec<f64>) = match dtype {
                    DType::F16 => {
                        let h: Vec<half::f16> =
                            vals.iter().map(|&v| half::f16::from_f32(v)).collect();
                        (
                            bytemuck::cast_slice(&h).to_vec(),
                            h.iter().map(|v| f64::from(v.to_f32())).collect(),
                        )
                    }
                    _ => (
                        bytemuck::cast_slice(&vals).to_vec(),
                        vals.iter().map(|&v| f64::from(v)).collect(),
                    ),
                };
                // From an odd address: rows of a frame need not be aligned.
                let mut shifted = vec![0u8; bytes.len() + 1];
                shifted[1..].copy_from_slice(&bytes);
                let mut dst = vec![f32::NAN; n * d];
                assert!(nw.project(dtype, &shifted[1..], n, &mut dst));
                for r in 0..n {
                    for o in 0..d {
                        let want: f64 = (0..k)
                            .map(|c| exact[r * k + c] * f64::from(w[o * k + c]))
                            .sum();
                        let got = f64::from(dst[r * d + o]);
                        let tol = 1e-5 * (1.0 + (k as f64).sqrt() * 2.0);
                        assert!(
                            (got - want).abs() <= tol,
                            "n {n} k {k} d {d} {dtype:?} row {r} out {o}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_read() {
        let w = vec![0.5f32; 8 * 16];
        if let Some(nw) = NarrowWeights::new(&w, 8, 16) {
            let mut dst = vec![7.0f32; 8];
            assert!(!nw.project(DType::BF16, &[0u8; 32], 1, &mut dst), "bf16");
            assert!(
                !nw.project(DType::F32, &[0u8; 60], 1, &mut dst),
                "short row"
            );
            assert!(dst.iter().all(|&v| v == 7.0), "dst untouched");
        }
        assert!(
            NarrowWeights::new(&vec![0.0; 17 * 4], 17, 4).is_none(),
            "too wide"
        );
        assert!(NarrowWeights::new(&w, 8, 15).is_none(), "sizes disagree");
    }
}
