//! Agreement of backends with the float64 reference on fresh random heads and inputs, over a set
//! of cases covering the edge cases of docs/DESIGN.md section 2.6 (odd sizes, B = 1, one modality, all-but-one absent,
//! f16/bf16 inputs and weights, a large eps). Used by `fusion-engine selftest` and the tests.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::backend::{Backend, BackendKind};
use crate::batch::{Batch, Outputs};
use crate::model::FusionHead;
use crate::reference::{reference, rel_error};
use crate::tensor::{DType, HostMat};

/// Which modalities are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskMode {
    /// Every modality present.
    All,
    /// Each modality present with probability 1/2, at least one per row.
    Random,
    /// Only modality `i` present in every row.
    Only(usize),
}

/// A random batch for `head` with `rows` samples in `dtype` (standard normal features).
pub fn random_batch(
    head: &FusionHead,
    rows: usize,
    dtype: DType,
    mask: MaskMode,
    rng: &mut impl Rng,
) -> Batch {
    let m = head.num_modalities();
    let inputs = head
        .modalities
        .iter()
        .map(|md| {
            let v: Vec<f32> = (0..rows * md.width)
                .map(|_| StandardNormal.sample(rng))
                .collect();
            HostMat::from_f32_as(dtype, rows, md.width, &v)
        })
        .collect();
    let mut maskv = vec![0u8; rows * m];
    for r in 0..rows {
        let row = &mut maskv[r * m..(r + 1) * m];
        match mask {
            MaskMode::All => row.fill(1),
            MaskMode::Only(i) => row[i.min(m - 1)] = 1,
            MaskMode::Random => {
                for v in row.iter_mut() {
                    *v = rng.random_bool(0.5) as u8;
                }
                if row.iter().all(|v| *v == 0) {
                    row[rng.random_range(0..m)] = 1;
                }
            }
        }
    }
    Batch {
        rows,
        inputs,
        mask: maskv,
    }
}

/// One agreement case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Short name.
    pub name: &'static str,
    /// Modality widths.
    pub widths: Vec<usize>,
    /// Common width D.
    pub dim: usize,
    /// Batch size.
    pub rows: usize,
    /// Input dtype.
    pub input: DType,
    /// Weight dtype.
    pub weights: DType,
    /// Mask mode.
    pub mask: MaskMode,
    /// LayerNorm eps.
    pub eps: f64,
}

impl Case {
    /// Tolerance (docs/DESIGN.md section 2.4) for this case on a backend: f32 everything: 1e-5 CPU, 1e-4 GPU; otherwise 1e-2.
    pub fn tolerance(&self, kind: BackendKind) -> f64 {
        if self.input == DType::F32 && self.weights == DType::F32 {
            if kind == BackendKind::Cpu {
                1e-5
            } else {
                1e-4
            }
        } else {
            1e-2
        }
    }

    /// Builds the random head for this case.
    pub fn head(&self, seed: u64) -> FusionHead {
        let names = [
            "vision", "text", "audio", "depth", "imu", "lidar", "thermal", "extra",
        ];
        let dims: Vec<(String, usize)> = self
            .widths
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let n = names.get(i).map_or(format!("m{i}"), |s| s.to_string());
                (n, *w)
            })
            .collect();
        FusionHead::random(&dims, self.dim, self.eps, seed).rounded_to(self.weights)
    }
}

/// The standard case list.
pub fn standard_cases() -> Vec<Case> {
    let c = |name, widths: &[usize], dim, rows, input, weights, mask, eps| Case {
        name,
        widths: widths.to_vec(),
        dim,
        rows,
        input,
        weights,
        mask,
        eps,
    };
    use DType::*;
    vec![
        c(
            "default-shape",
            &[1024, 768, 128],
            512,
            64,
            F32,
            F32,
            MaskMode::All,
            1e-5,
        ),
        c(
            "odd-sizes-masked",
            &[37, 5, 129],
            67,
            33,
            F32,
            F32,
            MaskMode::Random,
            1e-5,
        ),
        c("batch-1", &[300, 20], 96, 1, F32, F32, MaskMode::All, 1e-5),
        c("one-modality", &[19], 8, 17, F32, F32, MaskMode::All, 1e-5),
        c(
            "all-but-one-absent",
            &[64, 48, 16, 8],
            40,
            21,
            F32,
            F32,
            MaskMode::Only(2),
            1e-5,
        ),
        c(
            "large-eps",
            &[33, 65],
            130,
            9,
            F32,
            F32,
            MaskMode::Random,
            0.5,
        ),
        c(
            "f16-inputs",
            &[1024, 768, 128],
            512,
            40,
            F16,
            F32,
            MaskMode::Random,
            1e-5,
        ),
        c(
            "bf16-inputs",
            &[250, 3, 66],
            100,
            23,
            BF16,
            F32,
            MaskMode::Random,
            1e-5,
        ),
        c(
            "f16-weights",
            &[129, 31],
            65,
            12,
            F16,
            F16,
            MaskMode::All,
            1e-5,
        ),
        c(
            "bf16-weights",
            &[64, 64, 64],
            64,
            5,
            BF16,
            BF16,
            MaskMode::Random,
            1e-5,
        ),
        c(
            "big-batch",
            &[70, 33, 9],
            48,
            1037,
            F32,
            F32,
            MaskMode::Random,
            1e-5,
        ),
    ]
}

/// Result of one case on one backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    /// Device id (`cpu:0`).
    pub device: String,
    /// Case name.
    pub case: String,
    /// Relative error of `fused`.
    pub fused_err: f64,
    /// Relative error of `weights`.
    pub weights_err: f64,
    /// Tolerance.
    pub tol: f64,
    /// Pass or fail.
    pub pass: bool,
    /// Error message when the backend failed to run.
    pub error: Option<String>,
}

/// Runs one case on a backend with fresh randomness from `seed`.
pub fn run_case(backend: &mut impl Backend, case: &Case, seed: u64) -> CaseResult {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let head = Arc::new(case.head(rng.random()));
    let batch = random_batch(&head, case.rows, case.input, case.mask, &mut rng);
    let kind = backend.info().kind;
    let device = backend.info().id();
    let tol = case.tolerance(kind);
    let mut out = Outputs::zeros(&head, case.rows);
    let res = backend
        .upload(head.clone())
        .and_then(|_| backend.run(&batch.view(), out.as_mut()));
    match res {
        Ok(()) => {
            let r = reference(&head, &batch.view());
            let fe = rel_error(&out.fused, &r.fused);
            let we = rel_error(&out.weights, &r.weights);
            CaseResult {
                device,
                case: case.name.into(),
                fused_err: fe,
                weights_err: we,
                tol,
                pass: fe <= tol && we <= tol,
                error: None,
            }
        }
        Err(e) => CaseResult {
            device,
            case: case.name.into(),
            fused_err: f64::INFINITY,
            weights_err: f64::INFINITY,
            tol,
            pass: false,
            error: Some(e.to_string()),
        },
    }
}
