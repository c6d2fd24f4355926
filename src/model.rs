//! The fusion head's parameters (docs/DESIGN.md section 2): loading and validating a `.safetensors` file,
//! the embedded default head, and random heads for tests and `selftest`.
//!
//! Parameters are kept as f32 in the PyTorch layout (`proj.<m>.weight` is `[D, d_m]`), whatever
//! dtype the file stored; `weight_dtype` remembers the stored dtype for reporting.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rand::{Rng, SeedableRng};

use crate::error::{shape_str, Error, Result};
use crate::tensor::{bytes_to_f32, find_non_finite_bytes, DType};

/// Default LayerNorm epsilon when the metadata has none.
pub const DEFAULT_EPS: f64 = 1e-5;

/// Modalities of the embedded default head.
pub const DEFAULT_MODALITIES: [(&str, usize); 3] =
    [("vision", 1024), ("text", 768), ("audio", 128)];
/// Common width of the embedded default head.
pub const DEFAULT_DIM: usize = 512;
/// Seed of the embedded default head's weights.
pub const DEFAULT_SEED: u64 = 0x00F0_5104;

/// One input modality of a head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modality {
    /// Name (`vision`, `text`, ...), as in `proj.<name>.weight`.
    pub name: String,
    /// Input width d_m.
    pub width: usize,
}

/// Where a head came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadSource {
    /// The built-in seeded head.
    Embedded,
    /// Loaded from this file.
    File(String),
    /// Generated (tests, selftest) with this seed.
    Random(u64),
}

impl std::fmt::Display for HeadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadSource::Embedded => f.write_str("embedded default head"),
            HeadSource::File(p) => write!(f, "{p}"),
            HeadSource::Random(s) => write!(f, "random head (seed {s})"),
        }
    }
}

/// A head's learned parameters (f32, PyTorch layout), generated or loaded, before they are
/// put together with the head's shape in [`FusionHead::assemble`].
struct Params {
    proj_weight: Vec<Vec<f32>>,
    proj_bias: Vec<Vec<f32>>,
    gate: Vec<f32>,
    norm_weight: Vec<f32>,
    norm_bias: Vec<f32>,
}

/// A validated fusion head.
#[derive(Debug, Clone)]
pub struct FusionHead {
    /// Modalities in order.
    pub modalities: Vec<Modality>,
    /// Common width D.
    pub dim: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// `proj.<m>.weight`, `[D, d_m]` row-major, one per modality.
    pub proj_weight: Vec<Vec<f32>>,
    /// `proj.<m>.bias`, `[D]`, one per modality.
    pub proj_bias: Vec<Vec<f32>>,
    /// `gate.weight` as a `[D]` vector (the attention query q).
    pub gate: Vec<f32>,
    /// `norm.weight` (gamma), `[D]`.
    pub norm_weight: Vec<f32>,
    /// `norm.bias` (beta), `[D]`.
    pub norm_bias: Vec<f32>,
    /// Dtype the weights were stored in.
    pub weight_dtype: DType,
    /// Where the head came from.
    pub source: HeadSource,
}

impl FusionHead {
    /// Number of modalities M.
    pub fn num_modalities(&self) -> usize {
        self.modalities.len()
    }

    /// Sum of input widths.
    pub fn total_width(&self) -> usize {
        self.modalities.iter().map(|m| m.width).sum()
    }

    /// Index of a modality by name.
    pub fn modality_index(&self, name: &str) -> Option<usize> {
        self.modalities.iter().position(|m| m.name == name)
    }

    /// Floating-point operations of the projections for a batch of `b` (2 per multiply-add).
    pub fn proj_flops(&self, b: usize) -> f64 {
        2.0 * b as f64 * self.dim as f64 * self.total_width() as f64
    }

    /// Modality names joined by commas.
    pub fn modality_list(&self) -> String {
        self.modalities
            .iter()
            .map(|m| format!("\"{}\"", m.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The embedded default head: vision=1024, text=768, audio=128, D=512, seeded weights.
    pub fn embedded() -> FusionHead {
        let dims: Vec<(String, usize)> = DEFAULT_MODALITIES
            .iter()
            .map(|(n, w)| (n.to_string(), *w))
            .collect();
        let mut head = FusionHead::random(&dims, DEFAULT_DIM, DEFAULT_EPS, DEFAULT_SEED);
        head.source = HeadSource::Embedded;
        head
    }

    /// A head with PyTorch-like initialisation (uniform in +-1/sqrt(fan_in)) and non-trivial
    /// LayerNorm affine parameters, from `seed`.
    pub fn random(dims: &[(String, usize)], dim: usize, eps: f64, seed: u64) -> FusionHead {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut proj_weight = Vec::with_capacity(dims.len());
        let mut proj_bias = Vec::with_capacity(dims.len());
        for (_, w) in dims {
            let bound = 1.0 / (*w.max(&1) as f32).sqrt();
            proj_weight.push(
                (0..dim * w)
                    .map(|_| rng.random_range(-bound..=bound))
                    .collect(),
            );
            proj_bias.push((0..dim).map(|_| rng.random_range(-bound..=bound)).collect());
        }
        // A gate scaled up from nn.Linear's default so that attention weights are far from
        // uniform: a head whose softmax is flat would hide score bugs.
        let gbound = 4.0 / (dim.max(1) as f32).sqrt();
        let params = Params {
            proj_weight,
            proj_bias,
            gate: (0..dim)
                .map(|_| rng.random_range(-gbound..=gbound))
                .collect(),
            norm_weight: (0..dim).map(|_| rng.random_range(0.5..=1.5)).collect(),
            norm_bias: (0..dim).map(|_| rng.random_range(-0.1..=0.1)).collect(),
        };
        let modalities = dims
            .iter()
            .map(|(n, w)| Modality {
                name: n.clone(),
                width: *w,
            })
            .collect();
        FusionHead::assemble(
            modalities,
            dim,
            eps,
            params,
            DType::F32,
            HeadSource::Random(seed),
        )
    }

    /// The one place a head is put together from its parts (generated or loaded and checked).
    fn assemble(
        modalities: Vec<Modality>,
        dim: usize,
        eps: f64,
        params: Params,
        weight_dtype: DType,
        source: HeadSource,
    ) -> FusionHead {
        FusionHead {
            modalities,
            dim,
            eps,
            proj_weight: params.proj_weight,
            proj_bias: params.proj_bias,
            gate: params.gate,
            norm_weight: params.norm_weight,
            norm_bias: params.norm_bias,
            weight_dtype,
            source,
        }
    }

    /// Rounds every parameter to `dtype` (and records it), as if the head had been stored so.
    pub fn rounded_to(mut self, dtype: DType) -> FusionHead {
        let round = |v: &mut Vec<f32>| {
            for x in v.iter_mut() {
                *x = match dtype {
                    DType::F32 => *x,
                    DType::F16 => half::f16::from_f32(*x).to_f32(),
                    DType::BF16 => half::bf16::from_f32(*x).to_f32(),
                }
            }
        };
        self.proj_weight.iter_mut().for_each(round);
        self.proj_bias.iter_mut().for_each(round);
        round(&mut self.gate);
        round(&mut self.norm_weight);
        round(&mut self.norm_bias);
        self.weight_dtype = dtype;
        self
    }

    /// Loads and validates a head from a `.safetensors` file.
    pub fn load(path: &Path) -> Result<FusionHead> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut head = FusionHead::from_bytes(&bytes, &path.display().to_string())?;
        head.source = HeadSource::File(path.display().to_string());
        Ok(head)
    }

    /// Loads the head from `path`, or the embedded head when `None`.
    pub fn load_or_embedded(path: Option<&Path>) -> Result<FusionHead> {
        match path {
            Some(p) => FusionHead::load(p),
            None => Ok(FusionHead::embedded()),
        }
    }

    /// Parses and validates a head from safetensors bytes. `context` names the source in errors.
    pub fn from_bytes(bytes: &[u8], context: &str) -> Result<FusionHead> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
            context: context.to_string(),
            reason: e.to_string(),
        })?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
                context: context.to_string(),
                reason: e.to_string(),
            })?;
        let empty = HashMap::new();
        let md = meta.metadata().as_ref().unwrap_or(&empty);

        // Modalities from the projections present in the file.
        let mut proj_names: BTreeMap<String, ()> = BTreeMap::new();
        for name in st.names() {
            if let Some(rest) = name.strip_prefix("proj.") {
                let m = rest
                    .strip_suffix(".weight")
                    .or_else(|| rest.strip_suffix(".bias"));
                match m {
                    Some(m) if !m.is_empty() && !m.contains('.') => {
                        proj_names.insert(m.to_string(), ());
                    }
                    _ => {
                        return Err(Error::ModelUnexpectedTensor {
                            name: name.to_string(),
                            reason: "expected proj.<modality>.weight or proj.<modality>.bias"
                                .into(),
                        })
                    }
                }
            } else if !matches!(name, "gate.weight" | "norm.weight" | "norm.bias") {
                return Err(Error::ModelUnexpectedTensor {
                    name: name.to_string(),
                    reason: "not a parameter of the fusion head (proj.*, gate.weight, norm.*)"
                        .into(),
                });
            }
        }
        let names: Vec<String> = match md.get("modalities") {
            Some(list) => {
                let names: Vec<String> = list
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if names.is_empty() {
                    return Err(Error::ModelMetadata {
                        key: "modalities".into(),
                        reason: format!("{list:?} names no modality"),
                    });
                }
                for (i, n) in names.iter().enumerate() {
                    if names[..i].contains(n) {
                        return Err(Error::ModelMetadata {
                            key: "modalities".into(),
                            reason: format!("modality \"{n}\" is listed twice"),
                        });
                    }
                    if n == "mask" {
                        return Err(Error::ModelMetadata {
                            key: "modalities".into(),
                            reason: "\"mask\" is reserved for the presence mask".into(),
                        });
                    }
                }
                for p in proj_names.keys() {
                    if !names.contains(p) {
                        return Err(Error::ModelUnexpectedTensor {
                            name: format!("proj.{p}.weight"),
                            reason: format!(
                                "modality \"{p}\" is not in metadata modalities {list:?}"
                            ),
                        });
                    }
                }
                names
            }
            None => proj_names.keys().cloned().collect(),
        };
        if names.is_empty() {
            return Err(Error::ModelMissingTensor {
                name: "proj.<modality>.weight".into(),
                expected: "[D, d_m] for at least one modality".into(),
            });
        }
        let eps = match md.get("eps") {
            Some(s) => {
                let v: f64 = s.trim().parse().map_err(|_| Error::ModelMetadata {
                    key: "eps".into(),
                    reason: format!("{s:?} is not a number"),
                })?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::ModelMetadata {
                        key: "eps".into(),
                        reason: format!("{s:?} must be a positive finite number"),
                    });
                }
                v
            }
            None => DEFAULT_EPS,
        };

        let mut dtypes = Vec::new();
        let mut get = |name: &str, expected: &[Option<usize>]| -> Result<(Vec<usize>, Vec<f32>)> {
            let exp_str = || {
                let parts: Vec<String> = expected
                    .iter()
                    .map(|e| e.map_or("?".to_string(), |v| v.to_string()))
                    .collect();
                format!("[{}]", parts.join(", "))
            };
            let t = st.tensor(name).map_err(|_| Error::ModelMissingTensor {
                name: name.to_string(),
                expected: exp_str(),
            })?;
            let dtype = DType::from_safetensors(t.dtype()).ok_or_else(|| Error::ModelDtype {
                name: name.to_string(),
                actual: format!("{:?}", t.dtype()),
            })?;
            let shape = t.shape().to_vec();
            let ok = shape.len() == expected.len()
                && shape
                    .iter()
                    .zip(expected)
                    .all(|(s, e)| e.is_none_or(|e| e == *s) && *s > 0);
            if !ok {
                return Err(Error::ModelShape {
                    name: name.to_string(),
                    expected: exp_str(),
                    actual: shape_str(&shape),
                });
            }
            if let Some(i) = find_non_finite_bytes(dtype, t.data()) {
                return Err(Error::ModelNonFinite {
                    name: name.to_string(),
                    index: i,
                });
            }
            let n: usize = shape.iter().product();
            let mut v = vec![0f32; n];
            bytes_to_f32(dtype, t.data(), &mut v);
            dtypes.push(dtype);
            Ok((shape, v))
        };

        // D from the gate (or the first projection if the gate is the problem, reported below).
        let (gshape, gate) = get("gate.weight", &[Some(1), None])?;
        let dim = gshape[1];
        let mut modalities = Vec::new();
        let mut proj_weight = Vec::new();
        let mut proj_bias = Vec::new();
        for n in &names {
            let (wshape, w) = get(&format!("proj.{n}.weight"), &[Some(dim), None])?;
            let (_, b) = get(&format!("proj.{n}.bias"), &[Some(dim)])?;
            modalities.push(Modality {
                name: n.clone(),
                width: wshape[1],
            });
            proj_weight.push(w);
            proj_bias.push(b);
        }
        let (_, norm_weight) = get("norm.weight", &[Some(dim)])?;
        let (_, norm_bias) = get("norm.bias", &[Some(dim)])?;
        // Report the widest stored dtype (mixed files happen when only some layers were cast).
        let weight_dtype = if dtypes.contains(&DType::F32) {
            DType::F32
        } else if dtypes.contains(&DType::BF16) {
            DType::BF16
        } else {
            DType::F16
        };
        let params = Params {
            proj_weight,
            proj_bias,
            gate,
            norm_weight,
            norm_bias,
        };
        let source = HeadSource::File(context.to_string());
        Ok(FusionHead::assemble(
            modalities,
            dim,
            eps,
            params,
            weight_dtype,
            source,
        ))
    }

    /// Serialises the head as safetensors bytes in `dtype`, with `modalities` and `eps` metadata
    /// (what `safetensors.torch.save_file(model.state_dict(), ...)` produces).
    pub fn to_safetensors(&self, dtype: DType) -> Result<Vec<u8>> {
        let d = self.dim;
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (i, m) in self.modalities.iter().enumerate() {
            tensors.push((
                format!("proj.{}.weight", m.name),
                vec![d, m.width],
                self.proj_weight[i].clone(),
            ));
            tensors.push((
                format!("proj.{}.bias", m.name),
                vec![d],
                self.proj_bias[i].clone(),
            ));
        }
        tensors.push(("gate.weight".into(), vec![1, d], self.gate.clone()));
        tensors.push(("norm.weight".into(), vec![d], self.norm_weight.clone()));
        tensors.push(("norm.bias".into(), vec![d], self.norm_bias.clone()));
        let mut meta = HashMap::new();
        meta.insert(
            "modalities".to_string(),
            self.modalities
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        meta.insert("eps".to_string(), format!("{:e}", self.eps));
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(n, s, v)| {
                let m = crate::tensor::HostMat::from_f32_as(dtype, 1, v.len(), &v);
                (n, s, m.bytes.into_owned())
            })
            .collect();
        crate::tensor::serialize(
            encoded
                .iter()
                .map(|(n, s, b)| (n.as_str(), dtype, s.as_slice(), b.as_slice())),
            Some(meta),
        )
    }
}
