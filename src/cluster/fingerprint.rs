//! The head fingerprint (docs/DESIGN.md section 11): gateway and workers must run the same head,
//! so every batch carries a 64-bit hash of its modality order and weights, and a worker whose
//! own hash differs refuses the batch. SHA-256 over a canonical encoding (names, widths, D, eps,
//! weight dtype, then every parameter's f32 bits in a fixed order), first 8 bytes, little-endian:
//! stable across machines and builds, independent of how the file was laid out.

use sha2::{Digest, Sha256};

use crate::model::FusionHead;

/// The head's fingerprint.
pub fn fingerprint(head: &FusionHead) -> u64 {
    let mut h = Sha256::new();
    h.update(b"fusion-head-v1");
    h.update((head.modalities.len() as u64).to_le_bytes());
    for m in &head.modalities {
        h.update((m.name.len() as u64).to_le_bytes());
        h.update(m.name.as_bytes());
        h.update((m.width as u64).to_le_bytes());
    }
    h.update((head.dim as u64).to_le_bytes());
    h.update(head.eps.to_bits().to_le_bytes());
    h.update(head.weight_dtype.name().as_bytes());
    let vectors = head.proj_weight.iter().chain(&head.proj_bias);
    for v in vectors.chain([&head.gate, &head.norm_weight, &head.norm_bias]) {
        h.update((v.len() as u64).to_le_bytes());
        for x in v {
            h.update(x.to_bits().to_le_bytes());
        }
    }
    let d = h.finalize();
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    u64::from_le_bytes(a)
}

/// As printed in logs: 16 hex digits.
pub fn hex(fp: u64) -> String {
    format!("{fp:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_sensitive() {
        let a = FusionHead::embedded();
        assert_eq!(fingerprint(&a), fingerprint(&FusionHead::embedded()));
        let mut b = FusionHead::embedded();
        b.gate[0] += 1.0;
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut c = FusionHead::embedded();
        c.modalities.swap(0, 1);
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_eq!(hex(1).len(), 16);
    }
}
