//! Host-side input tensors: element types, borrowed views over raw little-endian bytes, and
//! conversion to f32. Inputs stay in the dtype they arrived in until a backend consumes them.
//! Also safetensors serialisation ([`serialize`], [`serialize_raw`]), shared by the model's
//! writer and the offline-mode files (here rather than in `io.rs` so `model.rs` need not import
//! `io.rs`, which imports the model).

use std::collections::HashMap;

use half::{bf16, f16};

use crate::error::{Error, Result};

mod host_bytes;
#[cfg(target_arch = "x86_64")]
mod scan_avx2;
mod scan_words;
mod widen;

pub use host_bytes::HostBytes;

/// Element type of an input or weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Maps a safetensors dtype, if it is one the engine accepts for features or weights.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// The safetensors dtype.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(format!(
                "unknown dtype {other:?} (expected f32, f16 or bf16)"
            )),
        }
    }
}

/// A borrowed row-major `[rows, cols]` matrix of little-endian elements of `dtype`.
///
/// The byte slice need not be aligned (safetensors data and network frames often are not).
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// Element type.
    pub dtype: DType,
    /// Number of rows (samples).
    pub rows: usize,
    /// Number of columns (features).
    pub cols: usize,
    /// `rows * cols * dtype.size()` bytes.
    pub bytes: &'a [u8],
}

impl<'a> MatRef<'a> {
    /// Builds a view, checking that the byte length matches the shape. Returns `None` on mismatch.
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: &'a [u8]) -> Option<Self> {
        let n = rows.checked_mul(cols)?.checked_mul(dtype.size())?;
        (n == bytes.len()).then_some(MatRef {
            dtype,
            rows,
            cols,
            bytes,
        })
    }

    /// A view over an f32 slice.
    pub fn from_f32(rows: usize, cols: usize, data: &'a [f32]) -> Option<Self> {
        Self::new(DType::F32, rows, cols, bytemuck::cast_slice(data))
    }

    /// A view over an f16 slice.
    pub fn from_f16(rows: usize, cols: usize, data: &'a [f16]) -> Option<Self> {
        Self::new(DType::F16, rows, cols, bytemuck::cast_slice(data))
    }

    /// A view over a bf16 slice.
    pub fn from_bf16(rows: usize, cols: usize, data: &'a [bf16]) -> Option<Self> {
        Self::new(DType::BF16, rows, cols, bytemuck::cast_slice(data))
    }

    /// Bytes of row `r` (caller guarantees `r < rows`).
    #[inline]
    pub fn row_bytes(&self, r: usize) -> &'a [u8] {
        let w = self.cols * self.dtype.size();
        &self.bytes[r * w..(r + 1) * w]
    }

    /// Sub-view of rows `[start, start + n)` (caller guarantees the range is inside).
    pub fn rows_slice(&self, start: usize, n: usize) -> MatRef<'a> {
        let w = self.cols * self.dtype.size();
        MatRef {
            dtype: self.dtype,
            rows: n,
            cols: self.cols,
            bytes: &self.bytes[start * w..(start + n) * w],
        }
    }

    /// The data as `&[f32]` without copying, when the dtype is f32 and the bytes are aligned.
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        if self.dtype == DType::F32 {
            bytemuck::try_cast_slice(self.bytes).ok()
        } else {
            None
        }
    }

    /// Converts row `r` to f32 into `out` (`out.len() == cols`).
    #[inline]
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        bytes_to_f32(self.dtype, self.row_bytes(r), out);
    }

    /// Element `(r, c)` as f64 (slow path, for references and error reports).
    pub fn get_f64(&self, r: usize, c: usize) -> f64 {
        let s = self.dtype.size();
        let off = (r * self.cols + c) * s;
        let b = &self.bytes[off..off + s];
        match self.dtype {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            DType::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
            DType::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
        }
    }

    /// Column of the first NaN or Inf in row `r`, if any.
    pub fn non_finite_in_row(&self, r: usize) -> Option<usize> {
        find_non_finite_bytes(self.dtype, self.row_bytes(r))
    }
}

/// Converts little-endian bytes of `dtype` to f32 (`out.len()` elements).
#[inline]
pub fn bytes_to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            // F16C in one loop (`widen.rs`), else `half`'s runtime-detected path for aligned
            // data (8 values per call); the scalar software conversion is ~10x slower.
            #[cfg(target_endian = "little")]
            if widen::f16_bytes_to_f32(bytes, out) {
                return;
            }
            #[cfg(target_endian = "little")]
            if let Ok(h) = bytemuck::try_cast_slice::<u8, f16>(bytes) {
                if h.len() == out.len() {
                    use half::slice::HalfFloatSliceExt;
                    h.convert_to_f32_slice(out);
                    return;
                }
            }
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::BF16 => {
            // bf16 is the top half of an f32: widening is a shift.
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
    }
}

/// Elements per call of the block test (only a failed block is searched element by element):
/// 256 cost the ingest check ~600 instructions more a sample (docs/PERF.md session 13).
const BLOCK: usize = 4096;

/// Index of the first NaN/Inf element in little-endian bytes of `dtype`.
///
/// An IEEE value is non-finite exactly when all its exponent bits are set. With `e` its masked
/// exponent bits, `e + (lowest exponent bit)` carries into the bit above the exponent exactly
/// when they are all set, and never further; so a block is scanned 64 bits at a time (two f32
/// or four f16/bf16 lanes per word, no carry between lanes) with an AND, an ADD and an OR per
/// word, which the compiler vectorises on any x86-64 (SSE2 has no unsigned 32-bit `max`, which
/// the earlier fold of maxima needed): 2x (f32) and 3x (f16) its speed (docs/PERF.md,
/// 2026-12-04). Where the CPU has AVX2, each block is tested four words per instruction
/// (`scan_avx2.rs`, 1.7x the SSE2 loop: docs/PERF.md, session 12). The exact position is only
/// searched for in a block that failed.
pub fn find_non_finite_bytes(dtype: DType, bytes: &[u8]) -> Option<usize> {
    let es = dtype.size();
    // (exponent mask, its lowest bit, the bit above it) repeated over each lane of a u64.
    let (mask, add, top): (u64, u64, u64) = match dtype {
        DType::F32 => (
            0x7f80_0000_7f80_0000,
            0x0080_0000_0080_0000,
            0x8000_0000_8000_0000,
        ),
        DType::F16 => (
            0x7c00_7c00_7c00_7c00,
            0x0400_0400_0400_0400,
            0x8000_8000_8000_8000,
        ),
        DType::BF16 => (
            0x7f80_7f80_7f80_7f80,
            0x0080_0080_0080_0080,
            0x8000_8000_8000_8000,
        ),
    };
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    for (bi, block) in bytes.chunks(BLOCK * es).enumerate() {
        #[cfg(target_arch = "x86_64")]
        let bad = if avx2 {
            // SAFETY: the CPU has AVX2 (checked above).
            Some(unsafe { scan_avx2::block_has_non_finite(block, mask, add, top) })
        } else {
            None
        };
        #[cfg(not(target_arch = "x86_64"))]
        let bad = None;
        let bad = bad.unwrap_or_else(|| scan_words::block_has_non_finite(block, mask, add, top));
        if bad {
            let pos = match dtype {
                DType::F32 => block.chunks_exact(4).position(|b| {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
                }),
                DType::F16 => block
                    .chunks_exact(2)
                    .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00),
                DType::BF16 => block
                    .chunks_exact(2)
                    .position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80),
            };
            return pos.map(|p| bi * BLOCK + p);
        }
    }
    None
}

/// Appends `src` to `dst` and scans it for NaN/Inf in the same pass: each 64 KiB chunk is
/// scanned right after it is copied, while it is still in cache, so the scan costs no second
/// trip to memory (docs/DESIGN.md section 4). On the first non-finite element, `dst` is cut back
/// to its length before the call (nothing of `src` is left in it) and that element's index in
/// `src` is returned.
pub fn copy_finite(dtype: DType, src: &[u8], dst: &mut Vec<u8>) -> Result<(), usize> {
    // A multiple of every element size and of the scan's 256-element blocks.
    const CHUNK: usize = 64 << 10;
    let start = dst.len();
    dst.reserve(src.len());
    for (ci, chunk) in src.chunks(CHUNK).enumerate() {
        dst.extend_from_slice(chunk);
        let copied = &dst[dst.len() - chunk.len()..];
        if let Some(i) = find_non_finite_bytes(dtype, copied) {
            dst.truncate(start);
            return Err(ci * CHUNK / dtype.size() + i);
        }
    }
    Ok(())
}

/// An owned row-major matrix in its wire dtype (what the engine queues).
#[derive(Debug, Clone, PartialEq)]
pub struct HostMat {
    /// Element type.
    pub dtype: DType,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Little-endian element bytes (any alignment).
    pub bytes: HostBytes,
}

impl HostMat {
    /// Borrowed view.
    pub fn view(&self) -> MatRef<'_> {
        MatRef {
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            bytes: &self.bytes,
        }
    }

    /// From f32 values.
    pub fn from_f32(rows: usize, cols: usize, data: &[f32]) -> Self {
        HostMat {
            dtype: DType::F32,
            rows,
            cols,
            bytes: bytemuck::cast_slice(data).to_vec().into(),
        }
    }

    /// From f32 values, rounded to `dtype`.
    pub fn from_f32_as(dtype: DType, rows: usize, cols: usize, data: &[f32]) -> Self {
        let bytes = match dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
            DType::BF16 => data
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect(),
        };
        HostMat {
            dtype,
            rows,
            cols,
            bytes: bytes.into(),
        }
    }
}

/// Serialises `(name, dtype, shape, bytes)` tensors to safetensors bytes.
pub fn serialize<'a>(
    tensors: impl Iterator<Item = (&'a str, DType, &'a [usize], &'a [u8])>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    serialize_raw(
        tensors.map(|(n, d, s, b)| (n, d.to_safetensors(), s, b)),
        metadata,
    )
}

/// Serialises tensors of any safetensors dtype.
pub fn serialize_raw<'a>(
    tensors: impl Iterator<Item = (&'a str, safetensors::Dtype, &'a [usize], &'a [u8])>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(d, s.to_vec(), b)
                .map(|v| (n.to_string(), v))
                .map_err(|e| Error::Safetensors {
                    context: format!("tensor \"{n}\""),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, metadata).map_err(|e| Error::Safetensors {
        context: "output".into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Little-endian bytes of `n` elements with `bits` at the given positions and the largest
    /// finite value (all exponent bits but the lowest set) everywhere else.
    fn encode(dtype: DType, n: usize, at: &[(usize, u32)]) -> Vec<u8> {
        let max_finite: u32 = match dtype {
            DType::F32 => 0x7f7f_ffff,
            DType::F16 => 0x7bff,
            DType::BF16 => 0x7f7f,
        };
        let mut v = vec![max_finite; n];
        for (i, (p, bits)) in at.iter().enumerate() {
            v[*p] = *bits;
            // Alternate signs of the finite neighbours too: -max is finite as well.
            if i % 2 == 1 && *p > 0 {
                v[*p - 1] |= if dtype == DType::F32 {
                    0x8000_0000
                } else {
                    0x8000
                };
            }
        }
        v.iter()
            .flat_map(|&x| match dtype {
                DType::F32 => x.to_le_bytes().to_vec(),
                _ => (x as u16).to_le_bytes().to_vec(),
            })
            .collect()
    }

    #[test]
    fn copy_finite_copies_everything_or_nothing() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let bad: u32 = match dtype {
                DType::F32 => 0x7fc0_0000,
                DType::F16 => 0x7c00,
                DType::BF16 => 0xff80,
            };
            // Past one 64 KiB chunk, so a bad element in a later chunk is found too.
            let n = (200 << 10) / dtype.size() + 3;
            let good = encode(dtype, n, &[]);
            let mut dst = vec![9u8; 5];
            assert_eq!(copy_finite(dtype, &good, &mut dst), Ok(()));
            assert_eq!(&dst[..5], &[9u8; 5]);
            assert_eq!(&dst[5..], &good[..]);
            for p in [0, 1, n / 2, (64 << 10) / dtype.size(), n - 1] {
                let bytes = encode(dtype, n, &[(p, bad)]);
                let mut dst = vec![9u8; 5];
                assert_eq!(
                    copy_finite(dtype, &bytes, &mut dst),
                    Err(p),
                    "{dtype} p={p}"
                );
                assert_eq!(dst, vec![9u8; 5], "nothing of a bad source stays behind");
            }
        }
        let mut dst = Vec::new();
        assert_eq!(copy_finite(DType::F32, &[], &mut dst), Ok(()));
        assert!(dst.is_empty());
    }

    #[test]
    fn finds_the_first_nan_or_inf_across_block_boundaries() {
        let cases: [(DType, [u32; 3]); 3] = [
            (DType::F32, [0x7fc0_0000, 0x7f80_0000, 0xff80_0000]),
            (DType::F16, [0x7e00, 0x7c00, 0xfc00]),
            (DType::BF16, [0x7fc0, 0x7f80, 0xff80]),
        ];
        let big = 2 * BLOCK + 7;
        let sizes = [1, 255, 256, 257, 1000, BLOCK - 1, BLOCK, BLOCK + 1, big];
        for (dtype, specials) in cases {
            for n in sizes {
                assert_eq!(find_non_finite_bytes(dtype, &encode(dtype, n, &[])), None);
                for &bits in &specials {
                    let (last, before) = (n - 1, n.saturating_sub(2));
                    let at = [0, n / 2, before, last, 255, 256, BLOCK - 1, BLOCK];
                    for p in at {
                        if p >= n {
                            continue;
                        }
                        let later = (p + 300).min(n - 1);
                        let bytes = encode(dtype, n, &[(p, bits), (later, specials[0])]);
                        assert_eq!(
                            find_non_finite_bytes(dtype, &bytes),
                            Some(p),
                            "{dtype} n={n} p={p} bits={bits:#x}"
                        );
                    }
                }
            }
        }
    }
}
