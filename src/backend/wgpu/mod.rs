//! wgpu backend: the fusion head as WGSL compute shaders on any adapter wgpu reaches (Vulkan,
//! Metal, DX12, GL), lavapipe included.
//!
//! In flow order:
//! - [`adapter`]: discovery; every adapter is listed with its backend and driver, and no adapter
//!   is a reason, never a panic.
//! - [`device`]: [`device::WgpuDevice`], the opened device and queue (full adapter limits,
//!   SHADER_F16 when offered) and its error capture.
//! - [`kernels`]: `shaders/fusion_proj.wgsl` (tiled GEMM for every modality in one dispatch, with
//!   bias and the score's partial sums fused in) and `shaders/fusion_epilogue.wgsl` (masked
//!   softmax, weighted sum, LayerNorm), compiled once per variant and cached.
//! - [`weights`]: the head's parameters, uploaded once per head.
//! - [`pool`]: grow-only device and staging buffers reused by every batch.
//! - [`run`]: chunk sizing, packing and readback helpers.
//! - [`runner`]: [`runner::WgpuRunner`], everything one opened adapter holds: head upload,
//!   chunked runs, bind group cache.
//! - `mod.rs` (here): [`WgpuBackend`], the [`Backend`] over a boxed runner.
//!
//! Inputs: f32 as is; f16 stays f16 in device memory when the adapter has SHADER_F16 (accumulation
//! is f32), otherwise it is widened on the host like bf16.

use std::sync::Arc;

use crate::backend::api::{Backend, DeviceInfo, OpenOptions};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::Result;
use crate::model::FusionHead;

mod adapter;
mod device;
mod kernels;
mod pool;
mod run;
mod runner;
mod weights;

pub use adapter::discover;
pub use kernels::Tile;

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
}
