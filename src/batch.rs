//! A batch of samples as every backend consumes it: one `[B, d_m]` matrix per modality in the
//! head's order (each in its own wire dtype) plus a `[B, M]` presence mask, and the
//! caller-provided outputs (`fused` `[B, D]`, `weights` `[B, M]`, both f32).

use crate::error::{shape_str, Error, Result};
use crate::model::FusionHead;
use crate::tensor::{HostMat, MatRef};

/// Borrowed batch: what `Backend::run` takes.
#[derive(Debug, Clone)]
pub struct BatchRef<'a> {
    /// Number of samples B.
    pub rows: usize,
    /// One `[B, d_m]` matrix per modality, in the head's modality order.
    pub inputs: Vec<MatRef<'a>>,
    /// `[B, M]` presence mask, 1 = present, 0 = absent.
    pub mask: &'a [u8],
}

impl<'a> BatchRef<'a> {
    /// True when modality `m` of sample `r` is present.
    #[inline]
    pub fn present(&self, r: usize, m: usize) -> bool {
        self.mask[r * self.inputs.len() + m] != 0
    }

    /// Checks shapes against the head, mask values, that every sample has a modality, and that
    /// every present value is finite. Absent rows are never read, so they are not checked.
    pub fn validate(&self, head: &FusionHead) -> Result<()> {
        self.validate_shapes(head)?;
        let m = head.num_modalities();
        self.validate_mask(0..self.rows)?;
        for (i, x) in self.inputs.iter().enumerate() {
            let rows = (0..self.rows).filter(|r| self.mask[r * m + i] != 0);
            if let Some((row, col)) = x.find_non_finite(rows) {
                return Err(Error::InputNonFinite {
                    name: head.modalities[i].name.clone(),
                    row,
                    col,
                });
            }
        }
        Ok(())
    }

    /// The error for a row whose result came out non-finite (backends that check their outputs
    /// instead of scanning every input first): the first NaN/Inf among its present inputs, or,
    /// when they are all finite, an f32 overflow of the projection.
    pub fn non_finite_error(&self, head: &FusionHead, row: usize) -> Error {
        for (i, x) in self.inputs.iter().enumerate() {
            if self.present(row, i) {
                if let Some(col) = crate::tensor::find_non_finite_bytes(x.dtype, x.row_bytes(row)) {
                    return Error::InputNonFinite {
                        name: head.modalities[i].name.clone(),
                        row,
                        col,
                    };
                }
            }
        }
        Error::InputOverflow { row }
    }

    /// Checks that the mask rows in `rows` hold only 0/1 and mark at least one modality each.
    pub fn validate_mask(&self, rows: std::ops::Range<usize>) -> Result<()> {
        let m = self.inputs.len();
        for r in rows {
            let mut any = false;
            for (c, v) in self.mask[r * m..(r + 1) * m].iter().enumerate() {
                match *v {
                    0 => {}
                    1 => any = true,
                    value => {
                        return Err(Error::BadMask {
                            row: r,
                            col: c,
                            value,
                        })
                    }
                }
            }
            if !any {
                return Err(Error::NoModality { row: r });
            }
        }
        Ok(())
    }

    /// Checks only the shapes (B > 0, one input per modality of the right width, mask size).
    pub fn validate_shapes(&self, head: &FusionHead) -> Result<()> {
        if self.rows == 0 {
            return Err(Error::EmptyBatch);
        }
        let m = head.num_modalities();
        if self.inputs.len() != m {
            return Err(Error::Config(format!(
                "batch has {} inputs, the head has {m} modalities",
                self.inputs.len()
            )));
        }
        for (x, md) in self.inputs.iter().zip(&head.modalities) {
            if x.rows != self.rows || x.cols != md.width {
                return Err(Error::InputShape {
                    name: md.name.clone(),
                    expected: shape_str(&[self.rows, md.width]),
                    actual: shape_str(&[x.rows, x.cols]),
                });
            }
        }
        if self.mask.len() != self.rows * m {
            return Err(Error::InputShape {
                name: "mask".into(),
                expected: shape_str(&[self.rows, m]),
                actual: format!("{} elements", self.mask.len()),
            });
        }
        Ok(())
    }

    /// Rows `[start, start + n)` as a batch of their own.
    pub fn slice(&self, start: usize, n: usize) -> BatchRef<'a> {
        let m = self.inputs.len();
        BatchRef {
            rows: n,
            inputs: self.inputs.iter().map(|x| x.rows_slice(start, n)).collect(),
            mask: &self.mask[start * m..(start + n) * m],
        }
    }
}

/// Owned batch, as queued by the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Number of samples.
    pub rows: usize,
    /// One matrix per modality.
    pub inputs: Vec<HostMat>,
    /// `[B, M]` mask.
    pub mask: Vec<u8>,
}

impl Batch {
    /// Borrowed view.
    pub fn view(&self) -> BatchRef<'_> {
        BatchRef {
            rows: self.rows,
            inputs: self.inputs.iter().map(|x| x.view()).collect(),
            mask: &self.mask,
        }
    }
}

/// Caller-provided outputs.
#[derive(Debug)]
pub struct OutputsMut<'a> {
    /// `[B, D]` fused vectors.
    pub fused: &'a mut [f32],
    /// `[B, M]` attention weights.
    pub weights: &'a mut [f32],
}

impl OutputsMut<'_> {
    /// Checks the buffer sizes for `rows` samples of `head`.
    pub fn check(&self, head: &FusionHead, rows: usize) -> Result<()> {
        let (d, m) = (head.dim, head.num_modalities());
        if self.fused.len() != rows * d {
            return Err(Error::OutputSize {
                name: "fused",
                expected: rows * d,
                actual: self.fused.len(),
            });
        }
        if self.weights.len() != rows * m {
            return Err(Error::OutputSize {
                name: "weights",
                expected: rows * m,
                actual: self.weights.len(),
            });
        }
        Ok(())
    }
}

/// Owned outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// `[B, D]`.
    pub fused: Vec<f32>,
    /// `[B, M]`.
    pub weights: Vec<f32>,
}

impl Outputs {
    /// Zeroed outputs for `rows` samples of `head`.
    pub fn zeros(head: &FusionHead, rows: usize) -> Outputs {
        Outputs {
            fused: vec![0.0; rows * head.dim],
            weights: vec![0.0; rows * head.num_modalities()],
        }
    }

    /// Mutable view.
    pub fn as_mut(&mut self) -> OutputsMut<'_> {
        OutputsMut {
            fused: &mut self.fused,
            weights: &mut self.weights,
        }
    }
}
