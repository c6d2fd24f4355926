//! wgpu backend: the fusion head as WGSL compute shaders on any adapter wgpu reaches (Vulkan,
//! Metal, DX12, GL), lavapipe included.
//!
//! In flow order:
//! - [`adapter`]: discovery; every adapter is listed with its backend and driver, and no adapter
//!   is a reason, never a panic.
//! - [`device`]: [`device::WgpuDevice`], the opened device and queue (full adapter limits,
//!   SHADER_F16 when offered) and its error capture.
//! - [`choice`]: the kernel path and tile the environment asks for.
//! - [`kernels`]: `shaders/fusion_proj.wgsl` (register-blocked tiled GEMM for every modality in
//!   one dispatch, vec4 loads, no bounds checks in the K loop, with bias and the score's partial
//!   sums fused in; f32 or f16 inputs and weights), `shaders/fusion_proj_coop.wgsl` (the same on
//!   cooperative matrices, where the adapter has them) and `shaders/fusion_epilogue.wgsl`
//!   (masked softmax, weighted sum, LayerNorm), compiled once per variant and cached.
//! - [`weights`]: the head's parameters, padded to whole tiles, uploaded once per head.
//! - [`pool`]: grow-only device buffers and the ring of staging slots, reused by every batch.
//! - [`run`]: chunk sizing, packing and readback helpers.
//! - [`stream`]: a batch's chunks through the staging ring, overlapped.
//! - [`runner`]: [`runner::WgpuRunner`], everything one opened adapter holds: head upload,
//!   chunked runs, bind group cache.
//! - `mod.rs` (here): [`WgpuBackend`], the [`Backend`] over a boxed runner.
//!
//! Inputs: f32 as is; f16 stays f16 in device memory when the adapter has SHADER_F16 (accumulation
//! is f32), otherwise it is widened on the host like bf16.
//!
//! Environment: `FUSION_WGPU_KERNEL` = `auto` | `f32` (tiled, f32 weights: the default) | `f16`
//! (tiled, f16 weights and inputs, f32 accumulation, tolerance 1e-2; needs SHADER_F16) | `coop`
//! (f16 on cooperative matrices; falls back to `f16`, then `f32`); `FUSION_WGPU_TILE` = `auto` |
//! `small` (`64x64x16`) | `large` (`128x128x8`). `devices` prints the path each adapter uses.

use std::sync::Arc;

use crate::backend::api::{Backend, DeviceInfo, OpenOptions};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::Result;
use crate::model::FusionHead;

mod adapter;
mod choice;
mod device;
mod kernels;
mod pool;
mod run;
mod runner;
mod stream;
mod weights;

pub use adapter::discover;
pub use kernels::{shader_sources, KernelChoice, Path, Tile};

use runner::WgpuRunner;

/// One wgpu adapter with an uploaded head. The device state is boxed so that [`AnyBackend`]
/// stays small.
///
/// [`AnyBackend`]: crate::backend::AnyBackend
pub struct WgpuBackend(Box<WgpuRunner>);

impl WgpuBackend {
    /// Opens adapter `index` (in [`discover`] order).
    pub fn new(index: usize, opts: &OpenOptions) -> Result<WgpuBackend> {
        WgpuRunner::new(index, opts).map(|s| WgpuBackend(Box::new(s)))
    }

    /// Caps the samples per chunk (tests use it to force splitting; the adapter's limits may
    /// impose fewer). At least 1.
    pub fn set_max_chunk_rows(&mut self, rows: usize) {
        self.0.max_chunk_rows = rows.max(1);
    }

    /// Forces a GEMM tile shape (`None`: chosen per chunk).
    pub fn set_tile(&mut self, tile: Option<Tile>) {
        self.0.tile = tile;
    }

    /// Allows or forbids keeping f16 inputs in f16 on the device (default: allowed).
    pub fn set_f16_storage(&mut self, on: bool) {
        self.0.f16_storage = on;
    }

    /// True when f16 inputs stay f16 on the device (the adapter has SHADER_F16 and it is allowed).
    pub fn f16_storage(&self) -> bool {
        self.0.f16_storage()
    }

    /// Chooses the projection path (as `FUSION_WGPU_KERNEL` does); returns the path the device
    /// runs, which falls back when the choice needs what the adapter lacks.
    pub fn set_kernel(&mut self, choice: KernelChoice) -> Path {
        let r = &mut self.0;
        let (path, fallback) = Path::resolve(choice, r.gpu_f16(), r.gpu_coop());
        r.path = path;
        r.fallback = fallback;
        path
    }

    /// The projection path in use.
    pub fn path(&self) -> Path {
        self.0.path
    }

    /// Why the chosen path fell back, when it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.0.fallback.as_deref()
    }

    /// True when the device times its passes (TIMESTAMP_QUERY).
    pub fn timestamps(&self) -> bool {
        self.0.gpu_timestamps()
    }

    /// Buffers and query sets created since the device was opened: constant once batches of a
    /// size have run (steady state allocates nothing).
    pub fn buffers_created(&self) -> u64 {
        self.0.buffers_created()
    }
}

impl Backend for WgpuBackend {
    fn info(&self) -> &DeviceInfo {
        &self.0.info
    }

    fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        self.0.upload(head)
    }

    fn head(&self) -> Option<&Arc<FusionHead>> {
        self.0.head.as_ref().map(|h| &h.head)
    }

    fn run(&mut self, batch: &BatchRef<'_>, out: OutputsMut<'_>) -> Result<()> {
        self.0.run_batch(batch, out)
    }

    fn run_projections_only(&mut self, batch: &BatchRef<'_>) -> Result<bool> {
        self.0.run_projections_only(batch)
    }

    fn take_run_stats(&mut self) -> Option<crate::backend::api::RunStats> {
        self.0.take_run_stats()
    }
}
