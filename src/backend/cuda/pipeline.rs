//! The batch pipeline's launch sequence: pinned staging, three streams, double buffering (the
//! chunk plan it follows is `plan.rs`).
//!
//! A batch is cut into chunks of up to 32 MiB of input (`CHUNK_BYTES`), and into at least two
//! once it holds 16 MiB (`SPLIT_BYTES`), so that its copies overlap its compute. Chunk k uses slot
//! `k % SLOTS` (pinned input staging, device input, device output, pinned output) and goes
//! through
//!
//! ```text
//! host:     stage k (memcpy into pinned, all cores)      drain k-1 (pinned -> caller's outputs)
//! h2d:      copy k (one cuMemcpyHtoDAsync: inputs + mask; `pinned.rs`: matrices in locked
//!           batch memory are copied from there instead, each with its own copy)
//! compute:  wait h2d(k); M cuBLAS GEMMs -> h (f32, or the inputs' half dtype); epilogue -> out
//! d2h:      wait compute(k); copy out slot (fused + weights) to pinned (`pinned_out.rs`: rows
//!           in locked output memory are copied there instead, and not drained)
//! ```
//!
//! The host queues chunk k, then drains chunk k-1 and stages chunk k+1 while the GPU copies and
//! computes chunk k, so the copy engine moves chunk k+1 while the SMs work on chunk k, and
//! results flow back on their own stream. Reuse of a slot is ordered by events: staging k waits
//! for h2d(k-SLOTS) (host), h2d(k) waits for compute(k-SLOTS) (device), compute(k) waits for
//! d2h(k-SLOTS) (device). The single `h` scratch is only touched by the compute stream, in order.
//! Every buffer is sized up front for the chunk plan and only grows.

use std::ffi::c_void;
use std::time::Instant;

use cudarc::driver::result as dr;
use cudarc::driver::sys::CUstream;
use rayon::prelude::*;

use super::blas::Blas;
use super::epilogue_plan::{epilogue_plan, EpilogueKind};
use super::kernels::Kernels;
use super::mem::{de, DeviceBuf, Event, GrowOnly, PinnedBuf};
use super::pinned::{direct_inputs_now, uploads, Src};
use super::pinned_out::{direct_outputs_now, download_bytes, downloads, Dst};
use super::plan::{layout, HPath, Plan};
use super::weights::DeviceHead;
use crate::backend::api::RunStats;
use crate::batch::{BatchRef, OutputsMut};
use crate::tensor::{bytes_to_f32, DType};

/// Pipeline depth (double buffering).
pub(crate) const SLOTS: usize = 2;
/// Host copies are cut into pieces of this size, spread over the rayon pool: one thread cannot
/// fill (or drain) pinned memory at the rate the copy engine moves it.
const PIECE_BYTES: usize = 256 << 10;

/// The three streams, as raw handles (owned by the backend's cudarc streams).
#[derive(Clone, Copy)]
pub(crate) struct Streams {
    pub h2d: CUstream,
    pub compute: CUstream,
    pub d2h: CUstream,
}

struct Slot {
    pin_in: PinnedBuf,
    pin_out: PinnedBuf,
    dev_in: DeviceBuf,
    dev_out: DeviceBuf,
    h2d_start: Event,
    h2d_done: Event,
    compute_start: Event,
    gemm_done: Event,
    compute_done: Event,
    d2h_start: Event,
    d2h_done: Event,
    /// Whether the slot's chunk's `[fused, weights]` rows were downloaded straight into the
    /// caller's locked memory (`pinned_out.rs`), so that the drain skips them.
    out_direct: [bool; 2],
}

/// Buffers and events of the pipeline.
pub(crate) struct Pipeline {
    slots: Vec<Slot>,
    h: DeviceBuf,
    /// Times of the whole-head runs since the backend's `take_run_stats`.
    pub stats: RunStats,
}

/// One piece of host copying.
enum Piece<'a> {
    /// Same dtype: a plain copy.
    Copy(&'a mut [u8], &'a [u8]),
    /// Widening to f32 while staging (`dst` holds as many f32 as `src` holds `DType` values).
    Widen(DType, &'a mut [u8], &'a [u8]),
}

impl Piece<'_> {
    fn copy(self) -> Result<(), String> {
        match self {
            Piece::Copy(d, s) => d.copy_from_slice(s),
            Piece::Widen(t, d, s) => {
                let f: &mut [f32] = bytemuck::try_cast_slice_mut(d)
                    .map_err(|e| format!("staging buffer misaligned: {e}"))?;
                bytes_to_f32(t, s, f);
            }
        }
        Ok(())
    }
}

/// Runs the pieces over the rayon pool (inline when there is only one).
fn copy_in_pieces(pieces: Vec<Piece<'_>>) -> Result<(), String> {
    if pieces.len() <= 1 {
        return pieces.into_iter().try_for_each(Piece::copy);
    }
    pieces.into_par_iter().try_for_each(Piece::copy)
}

/// Cuts `dst.copy_from_slice(src)` into pieces of about [`PIECE_BYTES`].
fn copy_pieces<'a>(out: &mut Vec<Piece<'a>>, dst: &'a mut [u8], src: &'a [u8]) {
    out.extend(
        dst.chunks_mut(PIECE_BYTES)
            .zip(src.chunks(PIECE_BYTES))
            .map(|(d, s)| Piece::Copy(d, s)),
    );
}

impl Pipeline {
    /// Creates the slots' events (buffers start empty).
    pub fn new(ctx: &std::sync::Arc<cudarc::driver::CudaContext>) -> Result<Pipeline, String> {
        let mut slots = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            slots.push(Slot {
                pin_in: PinnedBuf::new(ctx, true),
                pin_out: PinnedBuf::new(ctx, false),
                dev_in: DeviceBuf::new(ctx),
                dev_out: DeviceBuf::new(ctx),
                h2d_start: Event::new(ctx)?,
                h2d_done: Event::new(ctx)?,
                compute_start: Event::new(ctx)?,
                gemm_done: Event::new(ctx)?,
                compute_done: Event::new(ctx)?,
                d2h_start: Event::new(ctx)?,
                d2h_done: Event::new(ctx)?,
                out_direct: [false; 2],
            });
        }
        Ok(Pipeline {
            slots,
            h: DeviceBuf::new(ctx),
            stats: RunStats::default(),
        })
    }

    /// Sizes every buffer for `plan` (streams must be idle).
    fn reserve(&mut self, dh: &DeviceHead, plan: &Plan) -> Result<(), String> {
        let head = &dh.head;
        let widths: Vec<usize> = head.modalities.iter().map(|m| m.width).collect();
        let l = layout(plan.chunk, &widths, &plan.gemm_dtype, head.dim);
        for s in &mut self.slots {
            s.pin_in.reserve(l.in_bytes)?;
            s.dev_in.reserve(l.in_bytes)?;
            s.pin_out.reserve(l.out_bytes)?;
            s.dev_out.reserve(l.out_bytes)?;
        }
        self.h
            .reserve(head.num_modalities() * plan.chunk * head.dim * plan.h_dtype.size())
    }

    /// Runs the head on `batch` into `out` (`with_epilogue`), or only the projections
    /// (`out == None`), with `h` in the dtype `path` gives. The batch was validated by the
    /// caller. Returns, when everything is done, the dtype `h` was written in.
    #[allow(clippy::too_many_arguments)]
    pub fn run_chunks(
        &mut self,
        dh: &mut DeviceHead,
        blas: &mut Blas,
        kernels: &Kernels,
        streams: Streams,
        smem_limit: usize,
        epilogue: EpilogueKind,
        batch: &BatchRef<'_>,
        mut out: Option<OutputsMut<'_>>,
        path: HPath,
    ) -> Result<DType, String> {
        let plan = Plan::for_batch(dh, batch, path)?;
        let hsize = plan.h_dtype.size();
        self.reserve(dh, &plan)?;
        let head = dh.head.clone();
        let (d, m) = (head.dim, head.num_modalities());
        let widths: Vec<usize> = head.modalities.iter().map(|md| md.width).collect();
        let nchunks = plan.nchunks();
        let [bias, gate, gamma, beta] = dh.params();
        let epi = epilogue_plan(kernels, epilogue, d, m, smem_limit, plan.h_dtype)?;
        let (mut stage_ms, mut wait_ms, mut drain_ms) = (0.0, 0.0, 0.0);
        let mut direct_bytes = 0u64;

        for k in 0..nchunks + 1 {
            if k < nchunks {
                let (r0, n, l) = plan.chunk_at(k, &widths, d);
                let s = &mut self.slots[k % SLOTS];
                // Matrices in page-locked batch memory are copied from there, not staged
                // (docs/DESIGN.md section 6.7).
                let direct = direct_inputs_now(batch, r0, n, &plan.gemm_dtype);
                let x_bytes: Vec<usize> = (0..m)
                    .map(|i| n * widths[i] * plan.gemm_dtype[i].size())
                    .collect();

                // Stage chunk k (the slot's previous upload must have left the staging buffer).
                let t = Instant::now();
                s.h2d_done.sync()?;
                let t = lap(&mut wait_ms, t);
                {
                    let pin = s.pin_in.bytes_mut(l.in_bytes)?;
                    let (xs, rest) = pin.split_at_mut(l.mask_off);
                    rest[..n * m].copy_from_slice(&batch.mask[r0 * m..(r0 + n) * m]);
                    let mut pieces = Vec::new();
                    let mut xs = xs;
                    let mut at = 0;
                    for (i, x) in batch.inputs.iter().enumerate() {
                        let dt = plan.gemm_dtype[i];
                        let (_, tail) = xs.split_at_mut(l.x_off[i] - at);
                        let (dst, tail) = tail.split_at_mut(n * widths[i] * dt.size());
                        at = l.x_off[i] + dst.len();
                        xs = tail;
                        if direct[i] {
                            continue;
                        }
                        let src = x.rows_slice(r0, n).bytes;
                        if dt == x.dtype {
                            copy_pieces(&mut pieces, dst, src);
                        } else {
                            // Widen whole rows per piece.
                            let rows = (PIECE_BYTES / (widths[i] * 4)).max(1);
                            pieces.extend(
                                dst.chunks_mut(rows * widths[i] * 4)
                                    .zip(src.chunks(rows * widths[i] * x.dtype.size()))
                                    .map(|(d, s)| Piece::Widen(x.dtype, d, s)),
                            );
                        }
                    }
                    copy_in_pieces(pieces)?;
                }
                stage_ms += t.elapsed().as_secs_f64() * 1e3;

                // Upload, after the compute stream is done reading this slot's previous chunk.
                s.compute_done.wait_on(streams.h2d)?;
                s.h2d_start.record(streams.h2d)?;
                let pin = s.pin_in.bytes(l.in_bytes)?;
                for u in uploads(&l, &x_bytes, &direct) {
                    let src = match u.src {
                        Src::Staging => pin.get(u.dst_off..u.dst_off + u.len),
                        Src::Input(i) => batch.inputs.get(i).map(|x| x.rows_slice(r0, n).bytes),
                    }
                    .filter(|src| src.len() == u.len)
                    .ok_or_else(|| format!("upload plan out of bounds: {u:?}"))?;
                    if u.src != Src::Staging {
                        direct_bytes += u.len as u64;
                    }
                    // SAFETY: the destination `[dst_off, dst_off + len)` lies inside the chunk's
                    // `l.in_bytes` (the plan's invariant) of the slot's device buffer, sized for
                    // the plan's largest chunk. A staged source is the slot's pinned staging,
                    // not written again before `h2d_done` (recorded next) has been waited on.
                    // A direct source is the batch's own memory, which this run only borrows
                    // shared (nothing writes it) and which outlives every copy: each chunk's
                    // compute waits for its `h2d_done`, and the run returns only after the last
                    // drain (or the final synchronize) waited for the compute stream; on an
                    // error `CudaDevice::execute` synchronises every stream before the batch's
                    // borrow ends (docs/DESIGN.md section 6.7).
                    unsafe {
                        dr::memcpy_htod_async(s.dev_in.ptr() + u.dst_off as u64, src, streams.h2d)
                    }
                    .map_err(|e| de("cuMemcpyHtoDAsync", e))?;
                }
                s.h2d_done.record(streams.h2d)?;

                // Projections (and epilogue) on the compute stream.
                s.h2d_done.wait_on(streams.compute)?;
                s.d2h_done.wait_on(streams.compute)?;
                s.compute_start.record(streams.compute)?;
                for (i, md) in head.modalities.iter().enumerate() {
                    if !(r0..r0 + n).any(|r| batch.mask[r * m + i] != 0) {
                        continue; // absent from the whole chunk: the epilogue never reads it
                    }
                    let dt = plan.gemm_dtype[i];
                    let w = dh
                        .weight(dt, i)
                        .ok_or_else(|| format!("weights of modality {i} not uploaded in {dt:?}"))?;
                    // SAFETY: w is D x d_m of `dt` (DeviceHead), x is n x d_m of `dt` at its
                    // layout offset inside dev_in, h's modality block is n x D of `h_dtype`
                    // inside `h` (sized M * chunk * D * hsize); all stay allocated until the
                    // streams are synchronised (end of this run or the error path).
                    unsafe {
                        blas.project(
                            dt,
                            plan.h_dtype,
                            n,
                            d,
                            md.width,
                            w,
                            s.dev_in.ptr() + l.x_off[i] as u64,
                            self.h.ptr() + (i * n * d * hsize) as u64,
                        )?;
                    }
                }
                s.gemm_done.record(streams.compute)?;
                if out.is_some() {
                    let y = s.dev_out.ptr();
                    let wts = y + l.w_off as u64;
                    let mask = s.dev_in.ptr() + l.mask_off as u64;
                    let mut args = EpilogueArgs {
                        h: self.h.ptr(),
                        bias,
                        gate,
                        gamma,
                        beta,
                        mask,
                        y,
                        w: wts,
                        n: n as i32,
                        d: d as i32,
                        m: m as i32,
                        eps: head.eps as f32,
                        flags: epi.flags,
                    };
                    let mut params = args.params();
                    // SAFETY: the argument list matches the signature every epilogue kernel
                    // shares (8 pointers, 3 ints, a float, an int); every pointer addresses a
                    // live buffer of the size the kernel indexes for n rows (h: M*n*D elements
                    // of `plan.h_dtype`, the dtype the chosen kernel reads,
                    // params: M*D + 3D f32, mask: n*M bytes, y/w: n*D and n*M f32). The grid
                    // covers n rows at `rows_per_block`; block and shared memory are what
                    // `epilogue_plan` computed for this kernel within the device's limit, and
                    // the function lives as long as `kernels`.
                    unsafe {
                        dr::launch_kernel(
                            epi.func,
                            ((n as u32).div_ceil(epi.rows_per_block), 1, 1),
                            (epi.block, 1, 1),
                            epi.smem,
                            streams.compute,
                            &mut params,
                        )
                    }
                    .map_err(|e| de(&format!("launching {}", epi.name), e))?;
                }
                s.compute_done.record(streams.compute)?;

                if let Some(o) = out.as_mut() {
                    // Rows in page-locked output memory are copied straight there, not staged
                    // (docs/DESIGN.md section 6.7).
                    let (f, w) = ((r0 * d)..((r0 + n) * d), (r0 * m)..((r0 + n) * m));
                    let (Some(fr), Some(wr)) = (o.fused.get(f.clone()), o.weights.get(w.clone()))
                    else {
                        return Err(format!("outputs too small for rows {r0}..{}", r0 + n));
                    };
                    s.out_direct = direct_outputs_now(fr, wr);
                    s.compute_done.wait_on(streams.d2h)?;
                    s.d2h_start.record(streams.d2h)?;
                    for c in downloads(&l, n * d * 4, n * m * 4, s.out_direct) {
                        let dst: Option<&mut [u8]> = match c.dst {
                            Dst::Staging => s
                                .pin_out
                                .bytes_mut(l.out_bytes)?
                                .get_mut(c.src_off..c.src_off + c.len),
                            Dst::Fused => Some(bytemuck::cast_slice_mut(&mut o.fused[f.clone()])),
                            Dst::Weights => {
                                Some(bytemuck::cast_slice_mut(&mut o.weights[w.clone()]))
                            }
                        };
                        let dst = dst
                            .filter(|dst| dst.len() == c.len)
                            .ok_or_else(|| format!("download plan out of bounds: {c:?}"))?;
                        // SAFETY: the source `[src_off, src_off + len)` lies inside the chunk's
                        // `l.out_bytes` (the plan's invariant) of the slot's device output,
                        // sized for the plan's largest chunk. A staged destination is the
                        // slot's pinned staging, which the host reads only after `d2h_done`
                        // (recorded next) and does not write. A direct destination is the
                        // chunk's rows of the caller's outputs, page-locked (recorded in the
                        // registry by the pool that owns the buffer, which unlocks it only
                        // before freeing it) and mutably borrowed by this run, which writes
                        // only other rows before it returns; it returns only after syncing
                        // every chunk's `d2h_done` in the drain, and on an error
                        // `CudaDevice::execute` synchronises every stream before the borrow
                        // ends (docs/DESIGN.md section 6.7).
                        unsafe {
                            dr::memcpy_dtoh_async(
                                dst,
                                s.dev_out.ptr() + c.src_off as u64,
                                streams.d2h,
                            )
                        }
                        .map_err(|e| de("cuMemcpyDtoHAsync", e))?;
                    }
                    s.d2h_done.record(streams.d2h)?;
                }
            }

            // Drain chunk k-1 while chunk k is in flight.
            if k >= 1 {
                if let Some(out) = out.as_mut() {
                    let j = k - 1;
                    let (r0, n, l) = plan.chunk_at(j, &widths, d);
                    let s = &self.slots[j % SLOTS];
                    let t = Instant::now();
                    // Also the wait for the rows downloaded straight into `out`: every chunk is
                    // drained before the run returns.
                    s.d2h_done.sync()?;
                    let t = lap(&mut wait_ms, t);
                    let src = s.pin_out.bytes(l.out_bytes)?;
                    let mut pieces = Vec::new();
                    if !s.out_direct[0] {
                        copy_pieces(
                            &mut pieces,
                            bytemuck::cast_slice_mut(&mut out.fused[r0 * d..(r0 + n) * d]),
                            &src[..n * d * 4],
                        );
                    }
                    if !s.out_direct[1] {
                        pieces.push(Piece::Copy(
                            bytemuck::cast_slice_mut(&mut out.weights[r0 * m..(r0 + n) * m]),
                            &src[l.w_off..l.w_off + n * m * 4],
                        ));
                    }
                    copy_in_pieces(pieces)?;
                    drain_ms += t.elapsed().as_secs_f64() * 1e3;
                    // Every event of chunk j is complete now (d2h waited on compute, compute on
                    // h2d): add its device times.
                    let st = &mut self.stats;
                    st.h2d_bytes += l.in_bytes as u64;
                    st.h2d_ms += s.h2d_done.elapsed_since(&s.h2d_start)?;
                    st.gemm_ms += s.gemm_done.elapsed_since(&s.compute_start)?;
                    st.epilogue_ms += s.compute_done.elapsed_since(&s.gemm_done)?;
                    let (all, direct) =
                        download_bytes(&downloads(&l, n * d * 4, n * m * 4, s.out_direct));
                    st.d2h_bytes += all;
                    st.d2h_direct_bytes += direct;
                    st.d2h_ms += s.d2h_done.elapsed_since(&s.d2h_start)?;
                }
            }
        }
        if out.is_none() {
            // SAFETY: live stream of the current context.
            unsafe { dr::stream::synchronize(streams.compute) }
                .map_err(|e| de("cuStreamSynchronize", e))?;
        } else {
            let st = &mut self.stats;
            st.runs += 1;
            st.half_h_runs += u64::from(plan.h_dtype != DType::F32);
            st.epilogue_kernel = Some(epi.name);
            st.h2d_direct_bytes += direct_bytes;
            st.host_stage_ms += stage_ms;
            st.host_wait_ms += wait_ms;
            st.host_drain_ms += drain_ms;
        }
        Ok(plan.h_dtype)
    }
}

/// Adds the time since `t` to `acc` and returns now.
fn lap(acc: &mut f64, t: Instant) -> Instant {
    let now = Instant::now();
    *acc += (now - t).as_secs_f64() * 1e3;
    now
}

/// The epilogue's kernel arguments, laid out so their addresses can be passed to cuLaunchKernel.
#[repr(C)]
struct EpilogueArgs {
    h: u64,
    bias: u64,
    gate: u64,
    gamma: u64,
    beta: u64,
    mask: u64,
    y: u64,
    w: u64,
    n: i32,
    d: i32,
    m: i32,
    eps: f32,
    flags: i32,
}

impl EpilogueArgs {
    /// Pointers to each argument, in the kernel's parameter order. Valid while `self` is not
    /// moved (cuLaunchKernel copies the values before returning).
    fn params(&mut self) -> [*mut c_void; 13] {
        [
            &mut self.h as *mut u64 as *mut c_void,
            &mut self.bias as *mut u64 as *mut c_void,
            &mut self.gate as *mut u64 as *mut c_void,
            &mut self.gamma as *mut u64 as *mut c_void,
            &mut self.beta as *mut u64 as *mut c_void,
            &mut self.mask as *mut u64 as *mut c_void,
            &mut self.y as *mut u64 as *mut c_void,
            &mut self.w as *mut u64 as *mut c_void,
            &mut self.n as *mut i32 as *mut c_void,
            &mut self.d as *mut i32 as *mut c_void,
            &mut self.m as *mut i32 as *mut c_void,
            &mut self.eps as *mut f32 as *mut c_void,
            &mut self.flags as *mut i32 as *mut c_void,
        ]
    }
}
