//! One block of the NaN/Inf scan ([`super::find_non_finite_bytes`]) with AVX2: four 64-bit
//! words per instruction instead of the two that the crate's x86-64 baseline (SSE2) gives the
//! compiler. The test is the word test of `find_non_finite_bytes`: with `e` a lane's masked
//! exponent bits, `e + (lowest exponent bit)` sets the bit above the exponent exactly when all
//! of them are set.

/// Whether `block` holds a lane whose exponent bits (`mask`) are all set; `add` is the lowest
/// exponent bit of each lane and `top` the bit above the exponent of each lane.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn block_has_non_finite(block: &[u8], mask: u64, add: u64, top: u64) -> bool {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi64, _mm256_and_si256, _mm256_loadu_si256, _mm256_or_si256,
        _mm256_set1_epi64x, _mm256_setzero_si256, _mm256_testz_si256,
    };
    let (m, a, t) = (
        _mm256_set1_epi64x(mask as i64),
        _mm256_set1_epi64x(add as i64),
        _mm256_set1_epi64x(top as i64),
    );
    let whole = block.len() / 32 * 32;
    let mut acc = _mm256_setzero_si256();
    let mut i = 0;
    while i < whole {
        // SAFETY: bytes i..i + 32 are in `block` (i + 32 <= whole <= block.len()); unaligned
        // loads are allowed.
        let v = unsafe { _mm256_loadu_si256(block.as_ptr().add(i).cast::<__m256i>()) };
        acc = _mm256_or_si256(acc, _mm256_add_epi64(_mm256_and_si256(v, m), a));
        i += 32;
    }
    // The rest (under 32 bytes): the word test.
    _mm256_testz_si256(acc, t) == 0
        || super::scan_words::block_has_non_finite(&block[whole..], mask, add, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The AVX2 block test agrees with the 64-bit word test on random blocks of every length up
    /// to a few hundred bytes (tails included), finite or with a special value anywhere.
    #[test]
    fn agrees_with_the_word_test() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        // (mask, add, top) of f32 and of f16 lanes, as find_non_finite_bytes uses them.
        let kinds = [
            (
                0x7f80_0000_7f80_0000u64,
                0x0080_0000_0080_0000u64,
                0x8000_0000_8000_0000u64,
                4usize,
            ),
            (
                0x7c00_7c00_7c00_7c00,
                0x0400_0400_0400_0400,
                0x8000_8000_8000_8000,
                2,
            ),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (mask, add, top, es) in kinds {
            for len in (0..300).step_by(es) {
                for trial in 0..20 {
                    // Finite values: exponent bits never all set.
                    let mut b: Vec<u8> = (0..len).map(|_| rng.random::<u8>() & 0x3f).collect();
                    if trial % 2 == 1 && len > 0 {
                        let at = rng.random_range(0..len / es) * es;
                        let special: &[u8] = if es == 4 {
                            &[1, 0, 0x80, 0x7f]
                        } else {
                            &[1, 0x7c]
                        };
                        b[at..at + es].copy_from_slice(special);
                    }
                    let want = super::super::scan_words::block_has_non_finite(&b, mask, add, top);
                    // SAFETY: AVX2 is present (checked above).
                    let got = unsafe { block_has_non_finite(&b, mask, add, top) };
                    assert_eq!(got, want, "len {len} trial {trial}");
                    assert_eq!(want, trial % 2 == 1 && len > 0, "len {len} trial {trial}");
                }
            }
        }
    }
}
