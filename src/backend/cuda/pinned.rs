//! Uploads straight from page-locked batch memory (docs/DESIGN.md sections 2.5 and 6.7).
//!
//! [`CudaPageLock`] is the backend's [`HostPageLock`]: `cuMemHostRegister` with
//! `CU_MEMHOSTREGISTER_PORTABLE` (pinned memory to every context), `cuMemHostUnregister`. The
//! engine's buffer pool locks the batch buffers it recycles with it and records them in
//! [`registry`]. Per chunk, [`direct_inputs`] says which modality matrices the copy engine reads
//! from the batch's own memory (the chunk's rows lie in one locked range and need no widening)
//! and [`uploads`] lists the chunk's host-to-device copies: those matrices straight from the
//! batch, everything else (the other matrices, the mask) from the slot's pinned staging as
//! before. With nothing locked the plan is today's single copy of the whole staged chunk. The
//! engine's output pool locks recycled outputs with the same lock; the download side is
//! `pinned_out.rs`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::libs;
use super::mem::de;
use super::plan::Layout;
use crate::backend::host_lock::{registry, HostPageLock};
use crate::batch::BatchRef;
use crate::tensor::DType;

/// Page-locks host memory for every CUDA context of the process.
pub(crate) struct CudaPageLock {
    /// A context to bind on the calling thread (the calls need a current context); kept alive
    /// until every range is unlocked.
    ctx: Arc<CudaContext>,
}

impl CudaPageLock {
    /// The lock for the device of `ctx` (for batch inputs and recycled outputs alike); `None`
    /// with `FUSION_CUDA_LOCK_BATCHES=0` (an experiment knob: every batch input and every
    /// result is staged, as before).
    pub fn for_context(ctx: &Arc<CudaContext>) -> Option<Arc<dyn HostPageLock>> {
        if std::env::var("FUSION_CUDA_LOCK_BATCHES").as_deref() == Ok("0") {
            return None;
        }
        Some(Arc::new(CudaPageLock { ctx: ctx.clone() }))
    }
}

impl HostPageLock for CudaPageLock {
    fn lock(&self, start: usize, len: usize) -> bool {
        let r = libs::guard("cuMemHostRegister", || {
            self.ctx
                .bind_to_thread()
                .map_err(|e| de("cuCtxSetCurrent", e))?;
            // SAFETY: registering accesses no memory through the pointer: the driver pins the
            // pages of `[start, start + len)`, a live allocation its owner keeps alive until
            // `unlock` (HostPageLock's contract), and fails on a range that is not mapped.
            unsafe {
                sys::cuMemHostRegister_v2(
                    start as *mut c_void,
                    len,
                    sys::CU_MEMHOSTREGISTER_PORTABLE,
                )
            }
            .result()
            .map_err(|e| de(&format!("cuMemHostRegister({len} B)"), e))
        });
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("batch buffer stays pageable: {e}");
                false
            }
        }
    }

    fn unlock(&self, start: usize, _len: usize) {
        // `CUDA_ERROR_DEINITIALIZED`: the driver is being torn down with the process (a buffer
        // dropped after `exit` began, by an embedder that outlives its engine), and its page
        // locks go with it: nothing is left to undo, nothing to warn about.
        let deinit =
            |e: &cudarc::driver::DriverError| e.0 == sys::CUresult::CUDA_ERROR_DEINITIALIZED;
        let r = libs::guard("cuMemHostUnregister", || {
            match self.ctx.bind_to_thread() {
                Err(e) if deinit(&e) => return Ok(()),
                r => r.map_err(|e| de("cuCtxSetCurrent", e))?,
            }
            // SAFETY: `start` is the base address of a successful registration not undone yet
            // (HostPageLock's contract); unregistering accesses no memory through it.
            match unsafe { sys::cuMemHostUnregister(start as *mut c_void) }.result() {
                Err(e) if deinit(&e) => Ok(()),
                r => r.map_err(|e| de("cuMemHostUnregister", e)),
            }
        });
        if let Err(e) = r {
            tracing::warn!("unlocking a batch buffer: {e}");
        }
    }
}

/// Where an upload reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Src {
    /// The slot's pinned staging, at the upload's own offset (staging mirrors the device
    /// layout).
    Staging,
    /// The chunk's rows of batch input `i`, in the batch's memory.
    Input(usize),
}

/// One host-to-device copy into the slot's device input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Upload {
    pub dst_off: usize,
    pub len: usize,
    pub src: Src,
}

/// Which of the chunk `[r0, r0 + n)`'s matrices the device copies straight from the batch:
/// those the GEMM reads in their own dtype whose rows lie inside one range `locked` knows.
pub(super) fn direct_inputs(
    batch: &BatchRef<'_>,
    r0: usize,
    n: usize,
    gemm_dtype: &[DType],
    locked: impl Fn(usize, usize) -> bool,
) -> Vec<bool> {
    batch
        .inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let rows = x.rows_slice(r0, n).bytes;
            gemm_dtype.get(i) == Some(&x.dtype) && locked(rows.as_ptr() as usize, rows.len())
        })
        .collect()
}

/// [`direct_inputs`] against the process's locked ranges.
pub(super) fn direct_inputs_now(
    batch: &BatchRef<'_>,
    r0: usize,
    n: usize,
    gemm_dtype: &[DType],
) -> Vec<bool> {
    let ranges = registry();
    if ranges.is_empty() {
        return vec![false; batch.inputs.len()];
    }
    direct_inputs(batch, r0, n, gemm_dtype, |s, l| ranges.contains(s, l))
}

/// The copies that fill a chunk's device input laid out as `l`, where matrix `i` is
/// `x_bytes[i]` long: one per direct matrix, one per run of consecutive staged regions
/// (alignment padding included) and the mask always from staging. In address order, disjoint;
/// nothing direct gives one copy of the whole `l.in_bytes`.
pub(super) fn uploads(l: &Layout, x_bytes: &[usize], direct: &[bool]) -> Vec<Upload> {
    let mut out = Vec::new();
    let mut run: Option<usize> = None;
    for (i, (&off, &len)) in l.x_off.iter().zip(x_bytes).enumerate() {
        if direct.get(i).copied().unwrap_or(false) {
            if let Some(s) = run.take() {
                out.push(Upload {
                    dst_off: s,
                    len: off - s,
                    src: Src::Staging,
                });
            }
            out.push(Upload {
                dst_off: off,
                len,
                src: Src::Input(i),
            });
        } else if run.is_none() {
            run = Some(off);
        }
    }
    let s = run.unwrap_or(l.mask_off);
    out.push(Upload {
        dst_off: s,
        len: l.in_bytes - s,
        src: Src::Staging,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::super::plan::layout;
    use super::*;
    use crate::tensor::MatRef;

    const WIDTHS: [usize; 3] = [37, 5, 129];
    const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    fn sizes(n: usize) -> Vec<usize> {
        WIDTHS
            .iter()
            .zip(DTYPES)
            .map(|(w, t)| n * w * t.size())
            .collect()
    }

    #[test]
    fn nothing_direct_is_one_copy_of_the_whole_chunk() {
        let l = layout(33, &WIDTHS, &DTYPES, 67);
        let u = uploads(&l, &sizes(33), &[false; 3]);
        let all = Upload {
            dst_off: 0,
            len: l.in_bytes,
            src: Src::Staging,
        };
        assert_eq!(u, vec![all]);
    }

    #[test]
    fn direct_matrices_split_the_staged_runs() {
        let n = 33;
        let (l, x) = (layout(n, &WIDTHS, &DTYPES, 67), sizes(n));
        let staged = |a: usize, b: usize| Upload {
            dst_off: a,
            len: b - a,
            src: Src::Staging,
        };
        let direct = |i: usize| Upload {
            dst_off: l.x_off[i],
            len: x[i],
            src: Src::Input(i),
        };
        assert_eq!(
            uploads(&l, &x, &[false, true, false]),
            vec![
                staged(0, l.x_off[1]),
                direct(1),
                staged(l.x_off[2], l.in_bytes)
            ]
        );
        assert_eq!(
            uploads(&l, &x, &[true, true, true]),
            vec![
                direct(0),
                direct(1),
                direct(2),
                staged(l.mask_off, l.in_bytes)
            ]
        );
        assert_eq!(
            uploads(&l, &x, &[true, false, false]),
            vec![direct(0), staged(l.x_off[1], l.in_bytes)]
        );
    }

    #[test]
    fn every_plan_fills_each_region_once_from_the_right_source() {
        for n in [1, 2, 33, 4096] {
            let (l, x) = (layout(n, &WIDTHS, &DTYPES, 67), sizes(n));
            for bits in 0..8u32 {
                let direct: Vec<bool> = (0..3).map(|i| bits >> i & 1 == 1).collect();
                let u = uploads(&l, &x, &direct);
                // In order and disjoint, inside the chunk's input.
                for w in u.windows(2) {
                    assert!(w[0].dst_off + w[0].len <= w[1].dst_off, "{u:?}");
                }
                assert!(u
                    .iter()
                    .all(|c| c.len > 0 && c.dst_off + c.len <= l.in_bytes));
                // The mask comes from staging.
                let mask = u.last().copied();
                assert_eq!(mask.map(|c| c.dst_off + c.len), Some(l.in_bytes));
                assert_eq!(mask.map(|c| c.src), Some(Src::Staging));
                // Each matrix: exactly from the batch when direct, inside a staged copy else.
                for i in 0..3 {
                    let (a, b) = (l.x_off[i], l.x_off[i] + x[i]);
                    let from = u.iter().find(|c| c.dst_off <= a && b <= c.dst_off + c.len);
                    if direct[i] {
                        assert_eq!(
                            from.map(|c| (c.dst_off, c.len, c.src)),
                            Some((a, x[i], Src::Input(i)))
                        );
                    } else {
                        assert_eq!(from.map(|c| c.src), Some(Src::Staging), "{i} {direct:?}");
                    }
                }
                let direct_bytes: usize = u
                    .iter()
                    .filter(|c| c.src != Src::Staging)
                    .map(|c| c.len)
                    .sum();
                let want: usize = (0..3).filter(|&i| direct[i]).map(|i| x[i]).sum();
                assert_eq!(direct_bytes, want);
            }
        }
    }

    #[test]
    fn direct_is_decided_per_chunk_from_the_chunks_rows() {
        // 10 rows in chunks of 4: [0, 4), [4, 8) and the partial last [8, 10).
        let (rows, a_w, b_w) = (10, 6, 3);
        let a = vec![0u8; rows * a_w * 4];
        let b = vec![0u8; rows * b_w * 2];
        let mask = vec![1u8; rows * 2];
        let batch = BatchRef {
            rows,
            inputs: vec![
                MatRef {
                    dtype: DType::F32,
                    rows,
                    cols: a_w,
                    bytes: &a,
                },
                MatRef {
                    dtype: DType::F16,
                    rows,
                    cols: b_w,
                    bytes: &b,
                },
            ],
            mask: &mask,
        };
        // Locked: rows [0, 6) of `a` (a range that ends inside chunk 1) and all of `b`.
        let a0 = a.as_ptr() as usize;
        let locked = [(a0, 6 * a_w * 4), (b.as_ptr() as usize, b.len())];
        let is_locked =
            |s: usize, l: usize| locked.iter().any(|&(ls, ll)| ls <= s && s + l <= ls + ll);
        let f32_f16 = [DType::F32, DType::F16];
        let plan: Vec<Vec<bool>> = [(0, 4), (4, 4), (8, 2)]
            .iter()
            .map(|&(r0, n)| direct_inputs(&batch, r0, n, &f32_f16, is_locked))
            .collect();
        assert_eq!(
            plan,
            vec![vec![true, true], vec![false, true], vec![false, true]]
        );
        // A matrix the GEMM reads widened to f32 is staged (widened on the host) even when locked.
        let widened = direct_inputs(&batch, 8, 2, &[DType::F32, DType::F32], is_locked);
        assert_eq!(widened, vec![false, false]);
        // Nothing locked: all staged.
        assert_eq!(
            direct_inputs(&batch, 0, 4, &f32_f16, |_, _| false),
            vec![false, false]
        );
    }
}
