//! How the epilogue kernel is launched for a head (kernels/fusion_epilogue.cu): which kernel
//! (`FUSION_CUDA_EPILOGUE`: block per row, warp per row, warp per row with 16-byte loads; see
//! docs/DESIGN.md section 2.5), its block, shared memory and flags. Pure arithmetic: the
//! launch itself is in `pipeline.rs`.

use super::kernels::Kernels;
use crate::tensor::DType;

/// Epilogue flags (kernels/fusion_epilogue.cu).
pub(super) const Z_IN_SHARED: i32 = 1;
pub(super) const H_IN_SHARED: i32 = 2;

/// How the epilogue is launched for one head.
pub(super) struct EpiloguePlan {
    pub(super) func: cudarc::driver::sys::CUfunction,
    pub(super) name: &'static str,
    pub(super) rows_per_block: u32,
    pub(super) block: u32,
    pub(super) smem: u32,
    pub(super) flags: i32,
}

/// Warps (rows) per block of the warp-per-row epilogue.
pub(super) const WARP_ROWS: usize = 8;

/// Which epilogue kernel runs (`FUSION_CUDA_EPILOGUE`; kernels/fusion_epilogue.cu).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EpilogueKind {
    /// One block per row, any D (unset, empty or `block`): the default, the one measured on
    /// an H200 (docs/PERF.md "GPU").
    Block,
    /// One warp per row, one element a load (`warp`): agrees with the reference under host
    /// emulation and passed `selftest` and tests/cuda_backend.rs on an H200 (session 6), but was
    /// not faster there overall (its epilogue 9-14% faster at B = 8192, 0.021 against 0.012 ms
    /// at B = 1024).
    Warp,
    /// One warp per row, 16 bytes a load (`vec`), where D is a multiple of the elements one
    /// load brings (4 f32, 8 f16/bf16); else as [`EpilogueKind::Warp`]. Written for the f16
    /// head's epilogue, which moved ~0.3 TB/s on an H200 (docs/PERF.md, session 14): checked by
    /// host emulation and NVRTC, not yet run on a GPU.
    Vec,
}

impl EpilogueKind {
    /// `FUSION_CUDA_EPILOGUE` (read once); an unknown value is an error.
    pub(super) fn from_env() -> Result<EpilogueKind, String> {
        static V: std::sync::OnceLock<Result<EpilogueKind, String>> = std::sync::OnceLock::new();
        V.get_or_init(|| EpilogueKind::parse(std::env::var("FUSION_CUDA_EPILOGUE").ok().as_deref()))
            .clone()
    }

    /// [`EpilogueKind::from_env`] for the variable's value (`None`: unset).
    fn parse(v: Option<&str>) -> Result<EpilogueKind, String> {
        match v.map(str::trim) {
            None | Some("") | Some("block") => Ok(EpilogueKind::Block),
            Some("warp") => Ok(EpilogueKind::Warp),
            Some("vec") => Ok(EpilogueKind::Vec),
            Some(other) => Err(format!(
                "FUSION_CUDA_EPILOGUE={other}: expected block, warp or vec"
            )),
        }
    }
}

/// The epilogue `kind` asks for, where it fits the head (D up to 1024 and the M scores in
/// shared memory for the warp-per-row ones, D a multiple of the load's elements for `vec`),
/// else the block-per-row one; reading `h` in `h_dtype`. Every buffer the kernel reads or
/// writes starts 256-byte aligned (device allocations, `align256` offsets), so with D a
/// multiple of the load's elements every row of `h`, `bias`, `y` is 16-byte aligned too.
pub(super) fn epilogue_plan(
    kernels: &Kernels,
    kind: EpilogueKind,
    d: usize,
    m: usize,
    smem_limit: usize,
    h_dtype: DType,
) -> Result<EpiloguePlan, String> {
    let hi = super::kernels::h_index(h_dtype);
    let warp = |func: Option<&cudarc::driver::CudaFunction>, name: &'static str| {
        func.map(|f| EpiloguePlan {
            func: f.cu_function(),
            name,
            rows_per_block: WARP_ROWS as u32,
            block: (32 * WARP_ROWS) as u32,
            smem: (4 * WARP_ROWS * m) as u32,
            flags: 0,
        })
    };
    if kind == EpilogueKind::Vec {
        if let Some(i) = vec_variant(d, m, smem_limit, h_dtype) {
            let f = kernels.epilogue_vec.get(i).and_then(|v| v.get(hi));
            if let Some(p) = warp(f, super::kernels::EPILOGUE_VEC[i][hi]) {
                return Ok(p);
            }
        }
    }
    if kind != EpilogueKind::Block {
        if let Some(i) = warp_variant(d, m, smem_limit) {
            let f = kernels.epilogue_warp.get(i).and_then(|v| v.get(hi));
            if let Some(p) = warp(f, super::kernels::EPILOGUE_WARP[i][hi]) {
                return Ok(p);
            }
        }
    }
    let (block, smem, flags) = epilogue_shape(d, m, smem_limit)?;
    let func = kernels
        .epilogue
        .get(hi)
        .ok_or_else(|| format!("no epilogue kernel for h in {h_dtype:?}"))?;
    Ok(EpiloguePlan {
        func: func.cu_function(),
        name: super::kernels::EPILOGUE[hi],
        rows_per_block: 1,
        block,
        smem,
        flags,
    })
}

/// Index into `EPILOGUE_WARP` of the smallest warp-per-row variant for D, if one fits.
pub(super) fn warp_variant(d: usize, m: usize, smem_limit: usize) -> Option<usize> {
    if 4 * WARP_ROWS * m > smem_limit {
        return None;
    }
    super::kernels::WARP_PER_LANE
        .iter()
        .position(|&per_lane| d <= 32 * per_lane)
}

/// Index into `EPILOGUE_VEC` of the smallest 16-byte-load variant for D and `h` in `h_dtype`,
/// if one fits: D a multiple of the elements one 16-byte load of `h` brings.
pub(super) fn vec_variant(d: usize, m: usize, smem_limit: usize, h_dtype: DType) -> Option<usize> {
    if 4 * WARP_ROWS * m > smem_limit || !d.is_multiple_of(16 / h_dtype.size()) {
        return None;
    }
    super::kernels::VEC_PER_LANE
        .iter()
        .position(|&per_lane| d <= 32 * per_lane)
}

/// Block size, dynamic shared memory and flags for the block-per-row epilogue.
pub(super) fn epilogue_shape(
    d: usize,
    m: usize,
    smem_limit: usize,
) -> Result<(u32, u32, i32), String> {
    // About 4 elements per thread, 1 to 8 warps.
    let block = (d.div_ceil(4).div_ceil(32) * 32).clamp(32, 256) as u32;
    let base = 4 * (32 + 2 * m);
    if base > smem_limit {
        return Err(format!(
            "{m} modalities need {base} B of shared memory, the GPU has {smem_limit}"
        ));
    }
    let mut smem = base;
    let mut flags = 0;
    if base + 4 * d <= smem_limit {
        smem += 4 * d;
        flags |= Z_IN_SHARED;
        if smem + 4 * m * d <= smem_limit {
            smem += 4 * m * d;
            flags |= H_IN_SHARED;
        }
    }
    Ok((block, smem as u32, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warp_variant_is_the_smallest_that_holds_d() {
        assert_eq!(warp_variant(512, 3, 48 << 10), Some(2));
        assert_eq!(warp_variant(513, 3, 48 << 10), Some(3));
        assert_eq!(warp_variant(1, 1, 48 << 10), Some(0));
        assert_eq!(warp_variant(128, 1, 48 << 10), Some(0));
        assert_eq!(warp_variant(1024, 8, 48 << 10), Some(3));
        assert_eq!(warp_variant(1025, 3, 48 << 10), None);
        // Too many modalities for the scores in shared memory: block-per-row.
        assert_eq!(warp_variant(64, 2000, 48 << 10), None);
    }

    #[test]
    fn vec_variant_needs_whole_16_byte_loads() {
        use DType::*;
        // The default head (D = 512): vec16 for every dtype.
        for t in [F32, F16, BF16] {
            assert_eq!(vec_variant(512, 3, 48 << 10, t), Some(1), "{t:?}");
        }
        // Smallest that holds D, 8 elements a lane at least.
        assert_eq!(vec_variant(8, 1, 48 << 10, F16), Some(0));
        assert_eq!(vec_variant(256, 1, 48 << 10, F32), Some(0));
        assert_eq!(vec_variant(264, 1, 48 << 10, F16), Some(1));
        assert_eq!(vec_variant(1024, 1, 48 << 10, BF16), Some(2));
        // D not a multiple of the load's elements (4 f32, 8 halves), too large, too many scores.
        assert_eq!(vec_variant(100, 1, 48 << 10, F32), Some(0));
        assert_eq!(vec_variant(100, 1, 48 << 10, F16), None);
        assert_eq!(vec_variant(514, 1, 48 << 10, F32), None);
        assert_eq!(vec_variant(1032, 1, 48 << 10, F16), None);
        assert_eq!(vec_variant(64, 2000, 48 << 10, F32), None);
    }

    #[test]
    fn fusion_cuda_epilogue_values() {
        assert_eq!(EpilogueKind::parse(None), Ok(EpilogueKind::Block));
        assert_eq!(EpilogueKind::parse(Some(" block")), Ok(EpilogueKind::Block));
        assert_eq!(EpilogueKind::parse(Some("warp")), Ok(EpilogueKind::Warp));
        assert_eq!(EpilogueKind::parse(Some("vec\n")), Ok(EpilogueKind::Vec));
        let e = EpilogueKind::parse(Some("fast")).expect_err("not a kind");
        assert!(e.contains("FUSION_CUDA_EPILOGUE=fast"), "{e}");
    }

    #[test]
    fn every_h_dtype_has_its_kernels() {
        use super::super::kernels::{
            h_index, EPILOGUE, EPILOGUE_VEC, EPILOGUE_WARP, VEC_PER_LANE, WARP_PER_LANE,
        };
        for (i, t) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            assert_eq!(h_index(t), i);
            let suffix = format!("_{}", t.name());
            assert!(EPILOGUE[i].ends_with(&suffix), "{}", EPILOGUE[i]);
            for (j, pl) in WARP_PER_LANE.iter().enumerate() {
                assert_eq!(
                    EPILOGUE_WARP[j][i],
                    format!("fusion_epilogue_warp{pl}{suffix}")
                );
            }
            for (j, pl) in VEC_PER_LANE.iter().enumerate() {
                assert_eq!(
                    EPILOGUE_VEC[j][i],
                    format!("fusion_epilogue_vec{pl}{suffix}")
                );
            }
        }
    }

    #[test]
    fn epilogue_shape_fits_shared_memory() {
        // Default head: everything in shared memory.
        let (b, s, f) = epilogue_shape(512, 3, 48 << 10).expect("fits");
        assert_eq!((b, f), (128, Z_IN_SHARED | H_IN_SHARED));
        assert_eq!(s as usize, 4 * (32 + 6 + 512 + 3 * 512));
        // Huge D: z falls back to the output row, h is re-read.
        let (b, s, f) = epilogue_shape(20_000, 3, 48 << 10).expect("fits");
        assert_eq!((b, f), (256, 0));
        assert_eq!(s as usize, 4 * 38);
        // Tiny D: one warp.
        assert_eq!(epilogue_shape(8, 1, 48 << 10).expect("fits").0, 32);
    }
}
