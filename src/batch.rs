//! A batch of samples as every backend consumes it: one `[B, d_m]` matrix per modality in the
//! head's order (each in its own wire dtype) plus a `[B, M]` presence mask, and the
//! caller-provided outputs (`fused` `[B, D]`, `weights` `[B, M]`, both f32).

use crate::error::{shape_str, Error, Result};
use crate::model::FusionHead;
use crate::tensor::{HostMat, MatRef};

/// Inputs of at least this many bytes are scanned for NaN/Inf over the rayon pool.
const PAR_SCAN_BYTES: usize = 1 << 20;
/// Fewest rows per task of that scan.
const SCAN_ROWS: usize = 64;

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
        self.validate_mask(0..self.rows)?;
        for (i, x) in self.inputs.iter().enumerate() {
            let bad = |r: usize| {
                self.present(r, i)
                    .then(|| x.non_finite_in_row(r).map(|c| (r, c)))
                    .flatten()
            };
            // Large inputs over the rayon pool (a single thread scans ~6-9 GB/s: ~10 ms for a
            // B = 8192 batch of the embedded head); `find_map_first` keeps the first bad row.
            let found = if x.bytes.len() >= PAR_SCAN_BYTES {
                use rayon::prelude::*;
                (0..self.rows)
                    .into_par_iter()
                    .with_min_len(SCAN_ROWS)
                    .find_map_first(bad)
            } else {
                (0..self.rows).find_map(bad)
            };
            if let Some((row, col)) = found {
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
                if let Some(col) = x.non_finite_in_row(row) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch large enough for the parallel scan, finite except where the test puts NaN/Inf.
    fn batch(rows: usize, widths: &[usize]) -> (FusionHead, Batch) {
        let dims: Vec<(String, usize)> = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| (format!("m{i}"), w))
            .collect();
        let head = FusionHead::random(&dims, 8, 1e-5, 1);
        let inputs = widths
            .iter()
            .map(|&w| {
                let v: Vec<f32> = (0..rows * w).map(|k| (k % 97) as f32 * 0.01).collect();
                HostMat::from_f32(rows, w, &v)
            })
            .collect();
        let mask = vec![1u8; rows * widths.len()];
        (head, Batch { rows, inputs, mask })
    }

    fn poison(b: &mut Batch, m: usize, row: usize, col: usize, value: f32) {
        let w = b.inputs[m].cols;
        let at = (row * w + col) * 4;
        b.inputs[m].bytes.to_mut()[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn scan_reports_the_first_bad_row_of_the_first_bad_modality() {
        // 3000 x 200 f32 = 2.4 MB per input: scanned in parallel.
        let (head, mut b) = batch(3000, &[200, 100]);
        assert!(b.inputs[0].bytes.len() >= PAR_SCAN_BYTES);
        b.view().validate(&head).expect("finite");
        poison(&mut b, 1, 2999, 5, f32::INFINITY);
        poison(&mut b, 1, 1234, 99, f32::NAN);
        poison(&mut b, 1, 2500, 0, f32::NAN);
        match b.view().validate(&head) {
            Err(Error::InputNonFinite { name, row, col }) => {
                assert_eq!((name.as_str(), row, col), ("m1", 1234, 99))
            }
            other => panic!("expected m1 row 1234, got {other:?}"),
        }
        // A bad value in an earlier modality wins, whatever its row.
        poison(&mut b, 0, 2998, 7, f32::NEG_INFINITY);
        match b.view().validate(&head) {
            Err(Error::InputNonFinite { name, row, col }) => {
                assert_eq!((name.as_str(), row, col), ("m0", 2998, 7))
            }
            other => panic!("expected m0 row 2998, got {other:?}"),
        }
        // Absent values are never read.
        b.mask[2998 * 2] = 0;
        for r in [1234, 2500, 2999] {
            b.mask[r * 2 + 1] = 0;
        }
        b.view()
            .validate(&head)
            .expect("bad values only where absent");
    }

    #[test]
    fn small_inputs_are_scanned_inline_with_the_same_answer() {
        let (head, mut b) = batch(10, &[4, 3]);
        assert!(b.inputs[0].bytes.len() < PAR_SCAN_BYTES);
        poison(&mut b, 0, 7, 2, f32::NAN);
        poison(&mut b, 0, 3, 1, f32::INFINITY);
        assert!(matches!(
            b.view().validate(&head),
            Err(Error::InputNonFinite { row: 3, col: 1, .. })
        ));
    }
}
