//! The float64 reference of the fusion head (docs/DESIGN.md section 2), written for clarity, not speed.
//! Every backend is checked against it by the tests and by `fusion-engine selftest`.

use crate::batch::BatchRef;
use crate::model::FusionHead;

/// Reference outputs in f64.
#[derive(Debug, Clone)]
pub struct Reference {
    /// `[B, D]`.
    pub fused: Vec<f64>,
    /// `[B, M]`.
    pub weights: Vec<f64>,
}

/// Computes the head in f64 for a batch (assumed valid: see `BatchRef::validate`).
pub fn reference(head: &FusionHead, batch: &BatchRef<'_>) -> Reference {
    let (d, m) = (head.dim, head.num_modalities());
    let mut fused = vec![0f64; batch.rows * d];
    let mut weights = vec![0f64; batch.rows * m];
    let mut h = vec![vec![0f64; d]; m];
    let mut s = vec![f64::NEG_INFINITY; m];
    for r in 0..batch.rows {
        for (i, md) in head.modalities.iter().enumerate() {
            s[i] = f64::NEG_INFINITY;
            if !batch.present(r, i) {
                continue;
            }
            let x: Vec<f64> = (0..md.width)
                .map(|c| batch.inputs[i].get_f64(r, c))
                .collect();
            let w = &head.proj_weight[i];
            for (o, ho) in h[i].iter_mut().enumerate() {
                let row = &w[o * md.width..(o + 1) * md.width];
                *ho = head.proj_bias[i][o] as f64
                    + row.iter().zip(&x).map(|(a, b)| *a as f64 * b).sum::<f64>();
            }
            s[i] = h[i]
                .iter()
                .zip(&head.gate)
                .map(|(hv, q)| *q as f64 * hv.tanh())
                .sum();
        }
        let smax = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s
            .iter()
            .map(|v| if v.is_finite() { (v - smax).exp() } else { 0.0 })
            .collect();
        let sum: f64 = e.iter().sum();
        let a: Vec<f64> = e.iter().map(|v| v / sum).collect();
        let mut z = vec![0f64; d];
        for i in 0..m {
            if a[i] != 0.0 {
                for (zj, hj) in z.iter_mut().zip(&h[i]) {
                    *zj += a[i] * hj;
                }
            }
        }
        let mean = z.iter().sum::<f64>() / d as f64;
        let var = z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + head.eps).sqrt();
        for j in 0..d {
            fused[r * d + j] =
                (z[j] - mean) * rstd * head.norm_weight[j] as f64 + head.norm_bias[j] as f64;
        }
        weights[r * m..(r + 1) * m].copy_from_slice(&a);
    }
    Reference { fused, weights }
}

/// `||out - reference|| / ||reference||` (infinite when `out` holds NaN/Inf).
pub fn rel_error(out: &[f32], reference: &[f64]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = out
        .iter()
        .zip(reference)
        .map(|(o, r)| (*o as f64 - r).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|r| r * r).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
