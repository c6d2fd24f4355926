//! The portable NaN/Inf block test of `find_non_finite_bytes`: 64 bits at a time. Its own
//! module so that `scan_avx2.rs`, which runs it on a block's tail, needs nothing of the parent.

/// Whether `block` holds a lane whose exponent bits (`mask`) are all set, 64 bits at a time
/// (see `find_non_finite_bytes` in the parent module; `scan_avx2.rs` is the same test with
/// AVX2, and this one does its tail).
pub(super) fn block_has_non_finite(block: &[u8], mask: u64, add: u64, top: u64) -> bool {
    let lanes = |acc: u64, w: u64| acc | (w & mask).wrapping_add(add);
    let mut words = block.chunks_exact(8);
    let acc = words.by_ref().fold(0u64, |acc, b| {
        lanes(
            acc,
            u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        )
    });
    // A short tail, zero-padded: zero lanes are finite.
    let mut tail = [0u8; 8];
    let rest = words.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    lanes(acc, u64::from_le_bytes(tail)) & top != 0
}
