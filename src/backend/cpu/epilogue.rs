//! The fused epilogue for one row block: bias, tanh score, masked softmax, weighted sum and
//! LayerNorm, each row walked once while its activations are in cache.
//!
//! Written as plain loops over 8-wide chunks with explicit lane accumulators so the compiler
//! vectorises them (float reductions are otherwise kept sequential). Compiled twice: once for
//! the baseline target and once with AVX2+FMA, picked at run time.

use crate::model::FusionHead;

const LANES: usize = 8;

/// tanh via a [13/6] rational approximation (the one Eigen uses for float), accurate to a few
/// ulp over the clamped range; branch-free so it vectorises.
const TANH_CLAMP: f32 = 7.905_311;
// Coefficients as published (Eigen's float tanh); the compiler rounds them to f32.
#[allow(clippy::excessive_precision)]
/// Numerator coefficients, highest power first (odd powers 13..1, times x at the end).
const TANH_A: [f32; 7] = [
    -2.760_768_5e-16,
    2.000_188e-13,
    -8.604_671_5e-11,
    5.122_297e-8,
    1.485_722_4e-5,
    6.372_619_3e-4,
    4.893_524_6e-3,
];
#[allow(clippy::excessive_precision)]
/// Denominator coefficients, highest power first (even powers 6..0).
const TANH_B: [f32; 4] = [
    1.198_258_4e-6,
    1.185_347_1e-4,
    2.268_434_6e-3,
    4.893_525_2e-3,
];

#[inline(always)]
fn tanh_fast(x: f32) -> f32 {
    let x = x.clamp(-TANH_CLAMP, TANH_CLAMP);
    let x2 = x * x;
    let mut p = TANH_A[0];
    for a in &TANH_A[1..] {
        p = p * x2 + a;
    }
    p *= x;
    let mut q = TANH_B[0];
    for b in &TANH_B[1..] {
        q = q * x2 + b;
    }
    p / q
}

/// `h += b` over a row, returning `q . tanh(h)`.
#[inline(always)]
fn bias_score(h: &mut [f32], b: &[f32], q: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut hc = h.chunks_exact_mut(LANES);
    let mut bc = b.chunks_exact(LANES);
    let mut qc = q.chunks_exact(LANES);
    for ((hh, bb), qq) in (&mut hc).zip(&mut bc).zip(&mut qc) {
        for l in 0..LANES {
            let t = hh[l] + bb[l];
            hh[l] = t;
            acc[l] += qq[l] * tanh_fast(t);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for ((hh, bb), qq) in hc
        .into_remainder()
        .iter_mut()
        .zip(bc.remainder())
        .zip(qc.remainder())
    {
        let t = *hh + bb;
        *hh = t;
        s += qq * tanh_fast(t);
    }
    s
}

/// AVX2+FMA version of [`bias_score`]: 8 lanes per step, same approximation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn bias_score_avx2(h: &mut [f32], b: &[f32], q: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = h.len().min(b.len()).min(q.len());
    let chunks = n / LANES;
    let mut acc = _mm256_setzero_ps();
    let hi = _mm256_set1_ps(TANH_CLAMP);
    let lo = _mm256_set1_ps(-TANH_CLAMP);
    let c = |v: f32| _mm256_set1_ps(v);
    for i in 0..chunks {
        let o = i * LANES;
        // SAFETY: o + 8 <= chunks * 8 <= n, and n is at most each slice's length, so the
        // unaligned 8-float loads and the store stay inside `h`, `b` and `q`.
        let (hv, bv, qv) = unsafe {
            (
                _mm256_loadu_ps(h.as_ptr().add(o)),
                _mm256_loadu_ps(b.as_ptr().add(o)),
                _mm256_loadu_ps(q.as_ptr().add(o)),
            )
        };
        let t = _mm256_add_ps(hv, bv);
        // SAFETY: as above, o + 8 <= h.len().
        unsafe { _mm256_storeu_ps(h.as_mut_ptr().add(o), t) };
        let x = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
        let x2 = _mm256_mul_ps(x, x);
        let mut p = c(TANH_A[0]);
        for a in &TANH_A[1..] {
            p = _mm256_fmadd_ps(p, x2, c(*a));
        }
        p = _mm256_mul_ps(p, x);
        let mut d = c(TANH_B[0]);
        for bq in &TANH_B[1..] {
            d = _mm256_fmadd_ps(d, x2, c(*bq));
        }
        acc = _mm256_fmadd_ps(qv, _mm256_div_ps(p, d), acc);
    }
    let mut lanes = [0f32; LANES];
    // SAFETY: `lanes` is exactly 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut s: f32 = lanes.iter().sum();
    for j in chunks * LANES..n {
        let t = h[j] + b[j];
        h[j] = t;
        s += q[j] * tanh_fast(t);
    }
    s
}

/// AVX-512 version of [`bias_score`]: 16 lanes per step, same approximation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn bias_score_avx512(h: &mut [f32], b: &[f32], q: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    const W: usize = 16;
    let n = h.len().min(b.len()).min(q.len());
    let chunks = n / W;
    let mut acc = _mm512_setzero_ps();
    let hi = _mm512_set1_ps(TANH_CLAMP);
    let lo = _mm512_set1_ps(-TANH_CLAMP);
    let c = |v: f32| _mm512_set1_ps(v);
    // acc += q * tanh(t), 16 lanes.
    let step = |t: __m512, qv: __m512, acc: __m512| {
        let x = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
        let x2 = _mm512_mul_ps(x, x);
        let mut p = c(TANH_A[0]);
        for a in &TANH_A[1..] {
            p = _mm512_fmadd_ps(p, x2, c(*a));
        }
        p = _mm512_mul_ps(p, x);
        let mut d = c(TANH_B[0]);
        for bq in &TANH_B[1..] {
            d = _mm512_fmadd_ps(d, x2, c(*bq));
        }
        _mm512_fmadd_ps(qv, _mm512_div_ps(p, d), acc)
    };
    for i in 0..chunks {
        let o = i * W;
        // SAFETY: o + 16 <= chunks * 16 <= n, and n is at most each slice's length, so the
        // unaligned 16-float loads and the store stay inside `h`, `b` and `q`.
        let (hv, bv, qv) = unsafe {
            (
                _mm512_loadu_ps(h.as_ptr().add(o)),
                _mm512_loadu_ps(b.as_ptr().add(o)),
                _mm512_loadu_ps(q.as_ptr().add(o)),
            )
        };
        let t = _mm512_add_ps(hv, bv);
        // SAFETY: as above, o + 16 <= h.len().
        unsafe { _mm512_storeu_ps(h.as_mut_ptr().add(o), t) };
        acc = step(t, qv, acc);
    }
    // The last n % 16 values in one masked step (a D = 8 head is all tail: scalar, it was ~6%
    // of `serve`'s CPU with the test head). Masked-off lanes read as 0 and are not stored; their
    // q is 0, so they add nothing.
    let rem = n - chunks * W;
    if rem > 0 {
        let o = chunks * W;
        let k: __mmask16 = ((1u32 << rem) - 1) as u16;
        // SAFETY: rem < 16 lanes from o: o + rem == n <= each slice's length, and masked-off
        // lanes are neither read nor written (masked loads and stores do not fault on them).
        let (hv, bv, qv) = unsafe {
            (
                _mm512_maskz_loadu_ps(k, h.as_ptr().add(o)),
                _mm512_maskz_loadu_ps(k, b.as_ptr().add(o)),
                _mm512_maskz_loadu_ps(k, q.as_ptr().add(o)),
            )
        };
        let t = _mm512_add_ps(hv, bv);
        // SAFETY: as above, only lanes o..n of `h` are written.
        unsafe { _mm512_mask_storeu_ps(h.as_mut_ptr().add(o), k, t) };
        acc = step(t, qv, acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// `z += a * h`.
#[inline(always)]
fn axpy(z: &mut [f32], a: f32, h: &[f32]) {
    for (zz, hh) in z.iter_mut().zip(h) {
        *zz += a * hh;
    }
}

/// In-place LayerNorm with affine parameters.
#[inline(always)]
fn layer_norm(z: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = z.len();
    let mut acc = [0f32; LANES];
    let mut zc = z.chunks_exact(LANES);
    for c in &mut zc {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mean = (acc.iter().sum::<f32>() + zc.remainder().iter().sum::<f32>()) / d as f32;
    let mut acc = [0f32; LANES];
    let mut zc = z.chunks_exact(LANES);
    for c in &mut zc {
        for l in 0..LANES {
            let t = c[l] - mean;
            acc[l] += t * t;
        }
    }
    let var = (acc.iter().sum::<f32>()
        + zc.remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>())
        / d as f32;
    let rstd = 1.0 / (var + eps).sqrt();
    for ((zz, g), b) in z.iter_mut().zip(gamma).zip(beta) {
        *zz = (*zz - mean) * rstd * g + b;
    }
}

/// Epilogue over a block. `h` is `[M, n, D]` projected activations without bias; `present` is
/// the block's `[n, M]` mask (validated: 0/1, at least one 1 per row).
#[inline(always)]
fn block(
    head: &FusionHead,
    h: &mut [f32],
    n: usize,
    present: &[u8],
    fused: &mut [f32],
    weights: &mut [f32],
    score: impl Fn(&mut [f32], &[f32], &[f32]) -> f32,
) -> Option<usize> {
    let d = head.dim;
    let m = head.num_modalities();
    let eps = head.eps as f32;
    // Scores are a handful per row: keep them in f64 for the softmax.
    let mut s = [0f64; 16];
    let mut s_heap = Vec::new();
    let scores: &mut [f64] = if m <= s.len() {
        &mut s[..m]
    } else {
        s_heap.resize(m, 0.0);
        &mut s_heap
    };
    for r in 0..n {
        let mrow = &present[r * m..(r + 1) * m];
        let mut smax = f64::NEG_INFINITY;
        for i in 0..m {
            if mrow[i] != 0 {
                let hr = &mut h[(i * n + r) * d..(i * n + r + 1) * d];
                let v = score(hr, &head.proj_bias[i], &head.gate) as f64;
                scores[i] = v;
                smax = smax.max(v);
            }
        }
        let mut sum = 0f64;
        for i in 0..m {
            if mrow[i] != 0 {
                let e = (scores[i] - smax).exp();
                scores[i] = e;
                sum += e;
            } else {
                scores[i] = 0.0;
            }
        }
        let z = &mut fused[r * d..(r + 1) * d];
        z.fill(0.0);
        let wrow = &mut weights[r * m..(r + 1) * m];
        for i in 0..m {
            let a = scores[i] / sum;
            wrow[i] = a as f32;
            if mrow[i] != 0 {
                axpy(z, a as f32, &h[(i * n + r) * d..(i * n + r + 1) * d]);
            }
        }
        layer_norm(z, &head.norm_weight, &head.norm_bias, eps);
        // A NaN/Inf in a present input makes its whole projected row non-finite, and every
        // present row reaches z through `axpy` (even at weight 0: 0 * NaN = NaN), so checking
        // the finished row catches bad inputs (and f32 overflow) without another input sweep.
        if !all_finite(z) || !all_finite(wrow) {
            return Some(r);
        }
    }
    None
}

/// True when no element is NaN or Inf (branch-free, vectorised).
#[inline(always)]
fn all_finite(v: &[f32]) -> bool {
    v.iter().fold(0u32, |acc, x| {
        acc | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000)
    }) == 0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(
    head: &FusionHead,
    h: &mut [f32],
    n: usize,
    present: &[u8],
    fused: &mut [f32],
    weights: &mut [f32],
) -> Option<usize> {
    // Calling an AVX2 function from an AVX2 context needs no `unsafe`.
    block(head, h, n, present, fused, weights, |h, b, q| {
        bias_score_avx2(h, b, q)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn block_avx512(
    head: &FusionHead,
    h: &mut [f32],
    n: usize,
    present: &[u8],
    fused: &mut [f32],
    weights: &mut [f32],
) -> Option<usize> {
    block(head, h, n, present, fused, weights, |h, b, q| {
        bias_score_avx512(h, b, q)
    })
}

/// The epilogue variant for this CPU.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kernel {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    pub(crate) fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Generic
    }

    /// Runs the epilogue over a block; returns the first row whose output is not finite.
    pub(crate) fn run(
        self,
        head: &FusionHead,
        h: &mut [f32],
        n: usize,
        present: &[u8],
        fused: &mut [f32],
        weights: &mut [f32],
    ) -> Option<usize> {
        match self {
            Kernel::Generic => block(head, h, n, present, fused, weights, bias_score),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is only constructed by `detect` after checking that the CPU
            // supports AVX2 and FMA, the features `block_avx2` is compiled for.
            Kernel::Avx2 => unsafe { block_avx2(head, h, n, present, fused, weights) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only constructed by `detect` after checking for AVX-512F.
            Kernel::Avx512 => unsafe { block_avx512(head, h, n, present, fused, weights) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tanh_fast;

    #[test]
    fn tanh_fast_matches_std_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let e = (tanh_fast(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(e);
            x += 0.000_37;
        }
        // Under 8 ulp of 1.0 (6e-8 each), far inside the 1e-5 relative budget of the head.
        assert!(worst < 5e-7, "max abs error {worst}");
        assert_eq!(tanh_fast(0.0), 0.0);
        assert!((tanh_fast(1e-6) - 1e-6).abs() < 1e-12);
    }
}
