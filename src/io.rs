//! Offline mode files (docs/DESIGN.md section 3): reading a features file into a [`Batch`] and writing the
//! `fused` / `weights` result file. Output is written to a temporary file and renamed into place
//! only after everything succeeded, so an error never leaves an output behind.

use std::io::Write;
use std::path::Path;

use crate::batch::{Batch, Outputs};
use crate::error::{shape_str, Error, Result};
use crate::model::FusionHead;
use crate::tensor::{serialize, serialize_raw, DType, HostMat};

/// Parses a features file (one `[B, d_m]` tensor per modality, optional `mask` `[B, M]` U8/BOOL)
/// against `head`. `context` names the source in errors.
pub fn read_input(bytes: &[u8], head: &FusionHead, context: &str) -> Result<Batch> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        context: context.to_string(),
        reason: e.to_string(),
    })?;
    let m = head.num_modalities();
    // Unknown names first: a typo in a tensor name is the most useful thing to report.
    let mut names = st.names();
    names.sort();
    for name in &names {
        if *name != "mask" && head.modality_index(name).is_none() {
            return Err(Error::InputUnknownTensor {
                name: name.to_string(),
                known: head.modality_list(),
            });
        }
    }
    // B from the first modality tensor that exists (in head order).
    let rows = head.modalities.iter().find_map(|md| {
        st.tensor(&md.name)
            .ok()
            .and_then(|t| t.shape().first().copied())
    });
    let rows_str = rows.map_or("B".to_string(), |b| b.to_string());
    let mut inputs = Vec::with_capacity(m);
    for md in &head.modalities {
        let expected = format!("[{rows_str}, {}]", md.width);
        let t = st.tensor(&md.name).map_err(|_| Error::InputMissingTensor {
            name: md.name.clone(),
            expected: expected.clone(),
        })?;
        let dtype = DType::from_safetensors(t.dtype()).ok_or_else(|| Error::InputDtype {
            name: md.name.clone(),
            expected: "F32, F16 or BF16".into(),
            actual: format!("{:?}", t.dtype()),
        })?;
        let shape = t.shape();
        if shape.len() != 2 || Some(shape[0]) != rows || shape[1] != md.width {
            return Err(Error::InputShape {
                name: md.name.clone(),
                expected,
                actual: shape_str(shape),
            });
        }
        inputs.push(HostMat {
            dtype,
            rows: shape[0],
            cols: shape[1],
            bytes: t.data().to_vec().into(),
        });
    }
    let rows = rows.unwrap_or(0);
    if rows == 0 {
        return Err(Error::EmptyBatch);
    }
    let mask = match st.tensor("mask") {
        Ok(t) => {
            if !matches!(t.dtype(), safetensors::Dtype::U8 | safetensors::Dtype::BOOL) {
                return Err(Error::InputDtype {
                    name: "mask".into(),
                    expected: "U8 or BOOL".into(),
                    actual: format!("{:?}", t.dtype()),
                });
            }
            if t.shape() != [rows, m] {
                return Err(Error::InputShape {
                    name: "mask".into(),
                    expected: shape_str(&[rows, m]),
                    actual: shape_str(t.shape()),
                });
            }
            t.data().to_vec()
        }
        Err(_) => vec![1u8; rows * m],
    };
    let batch = Batch { rows, inputs, mask };
    batch.view().validate(head)?;
    Ok(batch)
}

/// Reads a features file from disk.
pub fn read_input_file(path: &Path, head: &FusionHead) -> Result<Batch> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_input(&bytes, head, &path.display().to_string())
}

/// Serialises a features file (the inverse of [`read_input`]); `mask` is written as U8 when asked.
pub fn write_input_bytes(head: &FusionHead, batch: &Batch, with_mask: bool) -> Result<Vec<u8>> {
    let shapes: Vec<[usize; 2]> = batch.inputs.iter().map(|x| [x.rows, x.cols]).collect();
    let mask_shape = [batch.rows, head.num_modalities()];
    let mut items: Vec<(&str, safetensors::Dtype, &[usize], &[u8])> = head
        .modalities
        .iter()
        .zip(&batch.inputs)
        .zip(&shapes)
        .map(|((md, x), s)| {
            (
                md.name.as_str(),
                x.dtype.to_safetensors(),
                &s[..],
                &x.bytes[..],
            )
        })
        .collect();
    if with_mask {
        items.push((
            "mask",
            safetensors::Dtype::U8,
            &mask_shape[..],
            &batch.mask[..],
        ));
    }
    serialize_raw(items.into_iter(), None)
}

/// Serialises the result file: `fused` `[B, D]` F32 and `weights` `[B, M]` F32.
pub fn output_bytes(head: &FusionHead, rows: usize, out: &Outputs) -> Result<Vec<u8>> {
    let fs = [rows, head.dim];
    let ws = [rows, head.num_modalities()];
    serialize(
        [
            (
                "fused",
                DType::F32,
                &fs[..],
                bytemuck::cast_slice::<f32, u8>(&out.fused),
            ),
            (
                "weights",
                DType::F32,
                &ws[..],
                bytemuck::cast_slice::<f32, u8>(&out.weights),
            ),
        ]
        .into_iter(),
        None,
    )
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| "output".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(io_err)
}
