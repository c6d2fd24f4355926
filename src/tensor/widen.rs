//! Widening f16 to f32 with the CPU's conversion instructions, one call per slice.
//!
//! `half`'s slice conversion calls its F16C routine once per 8 values through a function
//! pointer, copying each chunk through arrays: on a `samples` frame of f16 features that was
//! ~16% of the server's CPU (docs/PERF.md, 2026-12-04 session 12). Here the loop runs inside
//! one function compiled for F16C (8 values per `vcvtph2ps`), detected at run time.

/// Converts the little-endian f16 values in `bytes` to `out` (`out.len()` values, `bytes`
/// holding at least `2 * out.len()`), any alignment. False when the CPU lacks F16C (the caller
/// converts another way); nothing is written then.
pub(super) fn f16_bytes_to_f32(bytes: &[u8], out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if bytes.len() / 2 >= out.len() && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has F16C (and AVX, which F16C implies), checked just above, and
            // `bytes` holds at least `out.len()` values.
            unsafe { f16c(bytes, out) };
            return true;
        }
    }
    let _ = (bytes, out);
    false
}

/// # Safety
/// The CPU must support F16C and AVX; `bytes.len() >= 2 * out.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16c(bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let n = out.len();
    let full = n / 8 * 8;
    let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < full {
        // SAFETY: values i..i + 8 exist in both slices (i + 8 <= full <= n, and `bytes` holds
        // at least n values); unaligned loads and stores are allowed.
        unsafe {
            let h = _mm_loadu_si128(src.add(2 * i).cast::<__m128i>());
            _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for (o, b) in out[full..]
        .iter_mut()
        .zip(bytes[2 * full..].chunks_exact(2))
    {
        *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn every_f16_value_widens_exactly_at_any_offset_and_length() {
        // All 65,536 bit patterns (NaNs compared by bits class), from an odd byte offset.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut bytes = vec![0u8];
        bytes.extend(all.iter().flat_map(|v| v.to_le_bytes()));
        let src = &bytes[1..];
        let mut out = vec![0f32; all.len()];
        if !f16_bytes_to_f32(src, &mut out) {
            eprintln!("skipped: this CPU has no F16C");
            return;
        }
        for (v, o) in all.iter().zip(&out) {
            let want = f16::from_bits(*v).to_f32();
            assert!(
                want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()),
                "{v:#06x}: {want} vs {o}"
            );
        }
        // Lengths that are not multiples of 8 (the tail), and a too-short source refused.
        for n in [0, 1, 7, 8, 9, 23] {
            let mut out = vec![-1f32; n];
            assert!(f16_bytes_to_f32(&src[..2 * n], &mut out));
            for (i, o) in out.iter().enumerate() {
                assert_eq!(o.to_bits(), f16::from_bits(all[i]).to_f32().to_bits());
            }
        }
        let mut out = vec![-1f32; 4];
        assert!(!f16_bytes_to_f32(&src[..6], &mut out));
        assert_eq!(out, [-1.0; 4]);
    }
}
