//! CPU fallback backend: multithreaded, projections through the `gemm` crate (runtime-dispatched
//! SIMD microkernels), and the epilogue fused per row block.
//!
//! The batch is cut into row blocks small enough that a block's projected activations
//! (`M x rows x D` f32) stay in the core's cache. Each block, on one pool thread: checks its
//! mask, runs the M projection GEMMs into a thread-local scratch, then walks each row once:
//! bias + tanh score per present modality, masked softmax, weighted sum written straight into
//! the output row, LayerNorm in place, and a finiteness check of the finished row (a NaN/Inf
//! input poisons its whole row, so this replaces a separate sweep over the inputs; the input is
//! only searched to name the offending column). The activations are produced and consumed while
//! hot instead of being swept five more times as a layer-by-layer framework does.
//!
//! - `device.rs`: the CPU as a device (model, threads, SIMD level).
//! - `mod.rs` (here): [`CpuBackend`]: the head prepared for the CPU, row blocks, projections.
//! - `epilogue.rs`: the fused per-row epilogue (score, masked softmax, weighted sum, LayerNorm).
//! - `narrow.rs`: the projections of heads with D <= 16 (AVX-512F), instead of the GEMM.

use std::cell::RefCell;
use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::api::{Backend, DeviceInfo};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;
use crate::tensor::bytes_to_f32;

mod device;
mod epilogue;
mod narrow;

use device::default_threads;
pub use device::device_info;

/// Largest row block. 256 rows x 3 modalities x 512 x 4 B = 1.5 MiB of activations, which
/// stays in a 2 MiB L2; larger blocks amortise the GEMM's weight packing better (measured:
/// 64 rows 169, 128 rows 192, 256 rows 209 GFLOP/s whole head at B = 1024, docs/PERF.md).
const MAX_BLOCK_ROWS: usize = 256;

/// Batches whose projections take fewer multiply-adds than this (~0.1-0.3 ms on one core) run
/// on the calling thread alone, without the pool: waking the pool's workers costs more than
/// they save there, and after every job they spin in `sched_yield` before sleeping, taking the
/// cores a server's connection tasks need (a `perf` profile of `serve` with the D = 8 test
/// head, batches of 256: 23% of the server's CPU in that spin; docs/PERF.md).
const PARALLEL_MIN_MACS: usize = 1 << 23;

/// A head prepared for the CPU: projection weights transposed to `[d_m, D]` so each GEMM
/// streams the weight rows contiguously, and for a narrow head (D <= 16, AVX-512F) the
/// weights of the narrow kernel, per modality.
struct Prepared {
    head: Arc<FusionHead>,
    wt: Vec<Vec<f32>>,
    narrow: Vec<Option<narrow::NarrowWeights>>,
}

/// The CPU backend: its own rayon pool (so several CPU "devices" in the engine each own their
/// threads) and a prepared head.
pub struct CpuBackend {
    info: DeviceInfo,
    pool: rayon::ThreadPool,
    threads: usize,
    prepared: Option<Prepared>,
}

thread_local! {
    /// Per-thread scratch: projected activations and converted (non-f32) inputs. Grows to the
    /// largest block seen, so steady state allocates nothing.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's scratch buffers, taken out of [`SCRATCH`] for the call. Re-entrant:
/// a parallel GEMM inside `f` makes this thread wait in rayon, which may run another block's task
/// here meanwhile; that task finds the slot empty and works in fresh buffers (a `borrow_mut`
/// held across `f` panicked with "already borrowed" on a 16-core machine). The larger set is
/// kept afterwards.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    let (mut h, mut xs) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let r = f(&mut h, &mut xs);
    SCRATCH.with(|s| {
        let mut kept = s.borrow_mut();
        if h.capacity() + xs.capacity() >= kept.0.capacity() + kept.1.capacity() {
            *kept = (h, xs);
        }
    });
    r
}

impl CpuBackend {
    /// A CPU device with `threads` workers (default: all cores).
    pub fn new(index: usize, threads: Option<usize>) -> Result<CpuBackend> {
        let threads = threads.unwrap_or_else(default_threads).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("fusion-cpu{index}-{i}"))
            .build()
            .map_err(|e| Error::BackendUnavailable {
                backend: "cpu".into(),
                reason: format!("cannot start {threads} threads: {e}"),
            })?;
        Ok(CpuBackend {
            info: device_info(index, Some(threads)),
            pool,
            threads,
            prepared: None,
        })
    }

    /// Threads a batch of `rows` rows is worth: 1 (the calling thread, no pool) when its
    /// projections are small ([`PARALLEL_MIN_MACS`]), else the pool's.
    fn threads_for(&self, head: &FusionHead, rows: usize) -> usize {
        let width: usize = head.modalities.iter().map(|m| m.width).sum();
        if rows.saturating_mul(width).saturating_mul(head.dim) < PARALLEL_MIN_MACS {
            1
        } else {
            self.threads
        }
    }

    /// Runs only the M projection GEMMs for the batch (no bias, no epilogue), on the same row
    /// blocks and threads as [`Backend::run`]. This is the "projections alone" yardstick that
    /// `bench` reports the whole head against.
    fn projections_only(&mut self, batch: &BatchRef<'_>) -> Result<()> {
        let p = self.prepared.as_ref().ok_or_else(no_head)?;
        batch.validate_shapes(&p.head)?;
        let threads = self.threads_for(&p.head, batch.rows);
        let block = block_rows(batch.rows, threads);
        let nblocks = batch.rows.div_ceil(block);
        let par = nblocks < threads;
        let one = |bi: usize| {
            let r0 = bi * block;
            let n = block.min(batch.rows - r0);
            with_scratch(|h, xs| project_block(p, batch, r0, n, h, xs, par))
        };
        if threads == 1 {
            (0..nblocks).for_each(one);
        } else {
            self.pool
                .install(|| (0..nblocks).into_par_iter().for_each(one));
        }
        Ok(())
    }
}

fn no_head() -> Error {
    Error::Config("no head uploaded to the cpu backend".into())
}

/// Rows per block: at most `MAX_BLOCK_ROWS`, and small enough that every thread gets a block.
fn block_rows(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads).clamp(1, MAX_BLOCK_ROWS)
}

/// Projects rows `[r0, r0 + n)` of every modality into `h` (`[M, n, D]`, no bias).
/// `parallel` lets the GEMM itself use the pool (for batches too small to give every thread a
/// block of its own).
fn project_block(
    p: &Prepared,
    batch: &BatchRef<'_>,
    r0: usize,
    n: usize,
    h: &mut Vec<f32>,
    xs: &mut Vec<f32>,
    parallel: bool,
) {
    let d = p.head.dim;
    let m = p.head.num_modalities();
    if h.len() < m * n * d {
        h.resize(m * n * d, 0.0);
    }
    for (i, md) in p.head.modalities.iter().enumerate() {
        let k = md.width;
        let x = batch.inputs[i].rows_slice(r0, n);
        // Skip a modality absent from every row of the block.
        if (0..n).all(|r| !batch.present(r0 + r, i)) {
            continue;
        }
        let dst = &mut h[i * n * d..(i + 1) * n * d];
        if let Some(nw) = &p.narrow[i] {
            if nw.project(x.dtype, x.bytes, n, dst) {
                continue;
            }
        }
        let lhs: &[f32] = match x.as_f32() {
            Some(v) => v,
            None => {
                if xs.len() < n * k {
                    xs.resize(n * k, 0.0);
                }
                bytes_to_f32(x.dtype, x.bytes, &mut xs[..n * k]);
                &xs[..n * k]
            }
        };
        let wt = &p.wt[i];
        debug_assert_eq!(lhs.len(), n * k);
        debug_assert_eq!(wt.len(), k * d);
        // SAFETY: dst is n x d (row stride d), lhs is n x k (row stride k), rhs is k x d (row
        // stride d); all three slices have exactly those lengths (h was resized above, lhs comes
        // from a view whose length the batch validation checked, wt from `upload`), so every
        // offset gemm computes from these strides and sizes is in bounds. read_dst = false, so
        // dst's previous contents are ignored.
        unsafe {
            gemm::gemm(
                n,
                d,
                k,
                dst.as_mut_ptr(),
                1,
                d as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                wt.as_ptr(),
                1,
                d as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                if parallel {
                    gemm::Parallelism::Rayon(0)
                } else {
                    gemm::Parallelism::None
                },
            );
        }
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        let d = head.dim;
        let wt = head
            .modalities
            .iter()
            .zip(&head.proj_weight)
            .map(|(md, w)| {
                let k = md.width;
                let mut t = vec![0f32; k * d];
                for o in 0..d {
                    for c in 0..k {
                        t[c * d + o] = w[o * k + c];
                    }
                }
                t
            })
            .collect();
        let narrow = head
            .modalities
            .iter()
            .zip(&head.proj_weight)
            .map(|(md, w)| narrow::NarrowWeights::new(w, d, md.width))
            .collect();
        self.prepared = Some(Prepared { head, wt, narrow });
        Ok(())
    }

    fn head(&self) -> Option<&Arc<FusionHead>> {
        self.prepared.as_ref().map(|p| &p.head)
    }

    fn run_projections_only(&mut self, batch: &BatchRef<'_>) -> Result<bool> {
        self.projections_only(batch).map(|_| true)
    }

    fn run(&mut self, batch: &BatchRef<'_>, out: OutputsMut<'_>) -> Result<()> {
        let p = self.prepared.as_ref().ok_or_else(no_head)?;
        let head = &*p.head;
        batch.validate_shapes(head)?;
        out.check(head, batch.rows)?;
        let (d, m) = (head.dim, head.num_modalities());
        let threads = self.threads_for(head, batch.rows);
        let block = block_rows(batch.rows, threads);
        let nblocks = batch.rows.div_ceil(block);
        let par = nblocks < threads;
        let kernel = epilogue::Kernel::detect();
        let one = |(bi, (fused, weights)): (usize, (&mut [f32], &mut [f32]))| {
            let r0 = bi * block;
            let n = fused.len() / d;
            batch.validate_mask(r0..r0 + n)?;
            let bad = with_scratch(|h, xs| {
                project_block(p, batch, r0, n, h, xs, par);
                let present = &batch.mask[r0 * m..(r0 + n) * m];
                kernel.run(head, &mut h[..m * n * d], n, present, fused, weights)
            });
            match bad {
                Some(r) => Err(batch.non_finite_error(head, r0 + r)),
                None => Ok(()),
            }
        };
        if threads == 1 {
            out.fused
                .chunks_mut(block * d)
                .zip(out.weights.chunks_mut(block * m))
                .enumerate()
                .try_for_each(one)?;
        } else {
            self.pool.install(|| {
                out.fused
                    .par_chunks_mut(block * d)
                    .zip(out.weights.par_chunks_mut(block * m))
                    .enumerate()
                    .try_for_each(one)
            })?;
        }
        debug_assert_eq!(nblocks, batch.rows.div_ceil(block));
        Ok(())
    }
}
