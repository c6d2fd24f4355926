//! Downloads straight into page-locked output memory (docs/DESIGN.md section 6.7).
//!
//! The engine's output pool locks the output buffers it recycles with the backend's
//! [`super::pinned::CudaPageLock`] and records them in [`registry`]. Per chunk,
//! [`direct_outputs`] says which of the chunk's two result regions (its rows of `fused`, its rows
//! of `weights`) lie inside one locked range, and [`downloads`] lists the chunk's
//! device-to-host copies: a direct region straight from the slot's device output into the
//! caller's memory (no host drain for it), everything else into the slot's pinned staging, as
//! before. With nothing locked the plan is today's single copy of the whole output slot.

use super::plan::Layout;
use crate::backend::host_lock::registry;

/// Where a download writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dst {
    /// The slot's pinned staging, at the download's own offset (staging mirrors the device
    /// layout); drained into the caller's outputs afterwards.
    Staging,
    /// The chunk's rows of the caller's `fused`.
    Fused,
    /// The chunk's rows of the caller's `weights`.
    Weights,
}

/// One device-to-host copy out of the slot's device output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Download {
    pub src_off: usize,
    pub len: usize,
    pub dst: Dst,
}

/// Which of a chunk's result regions the device writes straight into the caller's memory:
/// `[fused, weights]`, each when its bytes (the chunk's rows, non-empty) lie inside one range
/// `locked` knows.
pub(super) fn direct_outputs(
    fused: &[f32],
    weights: &[f32],
    locked: impl Fn(usize, usize) -> bool,
) -> [bool; 2] {
    let inside = |v: &[f32]| !v.is_empty() && locked(v.as_ptr() as usize, std::mem::size_of_val(v));
    [inside(fused), inside(weights)]
}

/// [`direct_outputs`] against the process's locked ranges.
pub(super) fn direct_outputs_now(fused: &[f32], weights: &[f32]) -> [bool; 2] {
    let ranges = registry();
    if ranges.is_empty() {
        return [false; 2];
    }
    direct_outputs(fused, weights, |s, l| ranges.contains(s, l))
}

/// The copies that bring a chunk's results back from its device output laid out as `l`
/// (`fused_bytes` at offset 0, `weights_bytes` at `l.w_off`): nothing direct gives one copy
/// of the whole `l.out_bytes` into staging; otherwise one copy per region, into the caller's
/// memory when direct, into staging (at the same offset) when not. In address order, disjoint.
pub(super) fn downloads(
    l: &Layout,
    fused_bytes: usize,
    weights_bytes: usize,
    direct: [bool; 2],
) -> Vec<Download> {
    if direct == [false; 2] {
        return vec![Download {
            src_off: 0,
            len: l.out_bytes,
            dst: Dst::Staging,
        }];
    }
    let pick = |d: bool, to: Dst| if d { to } else { Dst::Staging };
    [
        Download {
            src_off: 0,
            len: fused_bytes,
            dst: pick(direct[0], Dst::Fused),
        },
        Download {
            src_off: l.w_off,
            len: weights_bytes,
            dst: pick(direct[1], Dst::Weights),
        },
    ]
    .into_iter()
    .filter(|c| c.len > 0)
    .collect()
}

/// Bytes `plan` copies, and those of them written straight into the caller's memory.
pub(super) fn download_bytes(plan: &[Download]) -> (u64, u64) {
    plan.iter().fold((0, 0), |(all, direct), c| {
        let len = c.len as u64;
        (
            all + len,
            direct + if c.dst == Dst::Staging { 0 } else { len },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::plan::layout;
    use super::*;
    use crate::tensor::DType;

    const WIDTHS: [usize; 3] = [37, 5, 129];
    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
    const DIM: usize = 67;

    #[test]
    fn nothing_direct_is_one_copy_of_the_whole_output_slot() {
        let l = layout(33, &WIDTHS, &DTYPES, DIM);
        let d = downloads(&l, 33 * DIM * 4, 33 * 3 * 4, [false, false]);
        let all = Download {
            src_off: 0,
            len: l.out_bytes,
            dst: Dst::Staging,
        };
        assert_eq!(d, vec![all]);
        assert_eq!(download_bytes(&d), (l.out_bytes as u64, 0));
    }

    #[test]
    fn each_direct_region_is_copied_into_the_callers_memory_and_the_other_staged() {
        let n = 33;
        let l = layout(n, &WIDTHS, &DTYPES, DIM);
        let (fb, wb) = (n * DIM * 4, n * 3 * 4);
        let fused = |dst| Download {
            src_off: 0,
            len: fb,
            dst,
        };
        let weights = |dst| Download {
            src_off: l.w_off,
            len: wb,
            dst,
        };
        assert_eq!(
            downloads(&l, fb, wb, [true, false]),
            vec![fused(Dst::Fused), weights(Dst::Staging)]
        );
        assert_eq!(
            downloads(&l, fb, wb, [false, true]),
            vec![fused(Dst::Staging), weights(Dst::Weights)]
        );
        let both = downloads(&l, fb, wb, [true, true]);
        assert_eq!(both, vec![fused(Dst::Fused), weights(Dst::Weights)]);
        assert_eq!(download_bytes(&both), ((fb + wb) as u64, (fb + wb) as u64));
        // The alignment padding between the regions is not copied once regions are split.
        assert!(l.w_off > fb);
        assert_eq!(
            download_bytes(&downloads(&l, fb, wb, [true, false])),
            ((fb + wb) as u64, fb as u64)
        );
    }

    #[test]
    fn every_plan_covers_both_regions_once_inside_the_output_slot() {
        for n in [1, 2, 33, 4096] {
            let l = layout(n, &WIDTHS, &DTYPES, DIM);
            let (fb, wb) = (n * DIM * 4, n * 3 * 4);
            for direct in [[false, false], [true, false], [false, true], [true, true]] {
                let p = downloads(&l, fb, wb, direct);
                for w in p.windows(2) {
                    assert!(w[0].src_off + w[0].len <= w[1].src_off, "{p:?}");
                }
                assert!(p
                    .iter()
                    .all(|c| c.len > 0 && c.src_off + c.len <= l.out_bytes));
                for (off, len, dst, d) in [
                    (0, fb, Dst::Fused, direct[0]),
                    (l.w_off, wb, Dst::Weights, direct[1]),
                ] {
                    let from = p
                        .iter()
                        .find(|c| c.src_off <= off && off + len <= c.src_off + c.len);
                    let want = if d { dst } else { Dst::Staging };
                    assert_eq!(from.map(|c| c.dst), Some(want), "{n} {direct:?}");
                    if d {
                        assert_eq!(from.map(|c| (c.src_off, c.len)), Some((off, len)));
                    }
                }
            }
        }
    }

    #[test]
    fn direct_is_decided_per_chunk_from_the_chunks_rows() {
        // 10 rows of D = 6 and M = 2 in chunks of 4: [0, 4), [4, 8) and the partial [8, 10).
        let (rows, d, m) = (10, 6, 2);
        let fused = vec![0f32; rows * d];
        let weights = vec![0f32; rows * m];
        // Locked: rows [0, 6) of `fused` (a range that ends inside chunk 1) and all of
        // `weights`.
        let f0 = fused.as_ptr() as usize;
        let locked = [
            (f0, 6 * d * 4),
            (weights.as_ptr() as usize, weights.len() * 4),
        ];
        let is_locked =
            |s: usize, l: usize| locked.iter().any(|&(ls, ll)| ls <= s && s + l <= ls + ll);
        let plan: Vec<[bool; 2]> = [(0, 4), (4, 4), (8, 2)]
            .iter()
            .map(|&(r0, n)| {
                direct_outputs(
                    &fused[r0 * d..(r0 + n) * d],
                    &weights[r0 * m..(r0 + n) * m],
                    is_locked,
                )
            })
            .collect();
        assert_eq!(plan, vec![[true, true], [false, true], [false, true]]);
        // Nothing locked: all staged; empty regions are never direct.
        assert_eq!(direct_outputs(&fused, &weights, |_, _| false), [false; 2]);
        assert_eq!(direct_outputs(&[], &weights, |_, _| true), [false, true]);
        // A region that only starts inside a locked range is staged.
        let tail = |s: usize, l: usize| s >= f0 + 4 && s + l <= f0 + fused.len() * 4 - 4;
        assert_eq!(direct_outputs(&fused, &[], tail), [false, false]);
        assert_eq!(
            direct_outputs(&fused[1..rows * d - 1], &[], tail),
            [true, false]
        );
    }
}
