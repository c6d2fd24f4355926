//! The device state behind [`WgpuBackend`](super::WgpuBackend): kernel path and tile choice,
//! head upload, chunked runs through the staging ring ([`stream`](super::stream)), run
//! statistics, and the bind group cache.

use std::sync::Arc;

use crate::backend::api::{DeviceInfo, OpenOptions, RunStats};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;
use crate::tensor::DType;

use super::adapter;
use super::choice::{env_choices, KERNEL_ENV};
use super::device::{device_error, WgpuDevice};
use super::kernels::{self, Kernels, Path, ProjVariant, Tile, XType};
use super::pool::{Pool, RING};
use super::run::{self, Layout};
use super::stream::ChunkJob;
use super::weights::DeviceHead;

/// Default cap on samples per chunk (the adapter's limits may impose fewer).
const DEFAULT_MAX_CHUNK_ROWS: usize = 65_536;

/// Bind groups for the current pool buffers and head.
struct BindGroups {
    key: (u64, u64, bool),
    proj: wgpu::BindGroup,
    epilogue: wgpu::BindGroup,
}

/// Everything one opened adapter holds.
pub(super) struct WgpuRunner {
    pub(super) info: DeviceInfo,
    gpu: WgpuDevice,
    kernels: Kernels,
    pool: Pool,
    pub(super) head: Option<DeviceHead>,
    uploads: u64,
    binds: Option<BindGroups>,
    pub(super) max_chunk_rows: usize,
    pub(super) tile: Option<Tile>,
    pub(super) f16_storage: bool,
    /// The projection path in use (resolved from the choice against the device).
    pub(super) path: Path,
    /// Why the chosen path was not available, when it fell back.
    pub(super) fallback: Option<String>,
    /// The large tile fits the adapter's limits.
    large_ok: bool,
    /// Times of the whole-head runs since the last `take_run_stats`.
    stats: RunStats,
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "wgpu".into(),
        reason: reason.into(),
    }
}

impl WgpuRunner {
    pub(super) fn new(index: usize, _opts: &OpenOptions) -> Result<WgpuRunner> {
        // Held until the device and its kernels are created.
        let mut discovery = adapter::open_lock();
        let (_instance, adapters) = discovery.instance_and_adapters();
        if adapters.is_empty() {
            return Err(unavailable(adapter::no_adapter_reason()));
        }
        let count = adapters.len();
        let missing = || unavailable(format!("no adapter {index} (found {count})"));
        let info = adapter::device_infos(&adapters)
            .into_iter()
            .nth(index)
            .ok_or_else(missing)?;
        let a = adapters.into_iter().nth(index).ok_or_else(missing)?;
        adapter::check(&a).map_err(|r| unavailable(format!("{}: {r}", info.name)))?;
        let (tile, choice) = env_choices().map_err(Error::Config)?;
        let gpu = WgpuDevice::open(&a)
            .map_err(|e| unavailable(format!("requesting a device on {}: {e}", info.name)))?;
        let kernels = Kernels::new(&gpu.device);
        gpu.take_error()?;
        let large_ok = Tile::Large.fits(&gpu.limits);
        let (path, fallback) = Path::resolve(choice, gpu.f16, gpu.coop);
        if let Some(why) = &fallback {
            tracing::warn!(device = %info.name, "{KERNEL_ENV}={choice:?}: {why}");
        }
        Ok(WgpuRunner {
            path,
            fallback,
            large_ok,
            stats: RunStats::default(),
            info,
            gpu,
            kernels,
            pool: Pool::new(),
            head: None,
            uploads: 0,
            binds: None,
            max_chunk_rows: DEFAULT_MAX_CHUNK_ROWS,
            tile: tile.filter(|t| *t != Tile::Large || large_ok),
            f16_storage: true,
        })
    }

    pub(super) fn gpu_f16(&self) -> bool {
        self.gpu.f16
    }

    pub(super) fn gpu_coop(&self) -> bool {
        self.gpu.coop
    }

    pub(super) fn gpu_timestamps(&self) -> bool {
        self.gpu.timestamps
    }

    pub(super) fn f16_storage(&self) -> bool {
        self.gpu.f16 && self.f16_storage
    }

    fn xtype(&self, batch: &BatchRef<'_>) -> XType {
        if self.path.f16_weights() {
            // The f16 paths read f16 inputs whatever the wire dtype (narrowed on the host).
            XType::F16
        } else if self.f16_storage() && batch.inputs.iter().all(|x| x.dtype == DType::F16) {
            XType::F16
        } else {
            XType::F32
        }
    }

    /// The projection kernel for a chunk of `rows` samples.
    fn variant(&self, rows: usize, xt: XType) -> ProjVariant {
        match self.path {
            Path::Coop => ProjVariant::Coop {
                sg: self.gpu.subgroup,
            },
            p => {
                let w = if p.f16_weights() {
                    XType::F16
                } else {
                    XType::F32
                };
                let dim = self.head.as_ref().map_or(0, |h| h.head.dim);
                let tile = self
                    .tile
                    .unwrap_or_else(|| Tile::choose(rows, dim, self.large_ok));
                ProjVariant::Tiled(tile, xt, w)
            }
        }
    }

    /// Runs `batch` chunk by chunk through the staging ring; with `out`, the whole head,
    /// otherwise the GEMMs only.
    fn run_chunks(&mut self, batch: &BatchRef<'_>, mut out: Option<OutputsMut<'_>>) -> Result<()> {
        let head = self.head.as_ref().ok_or_else(no_head)?.head.clone();
        let xt = self.xtype(batch);
        // Plan chunks for the narrowest column tile a chunk may pick: it has the most column
        // tiles, so its partial-score buffer is the largest, and the buffers hold any choice.
        let plan_bn = match self.path {
            Path::Coop => self.variant(1, xt).tile_mn().1,
            _ => self.tile.unwrap_or(Tile::Small).bn(),
        };
        let chunk = run::chunk_rows(
            &self.gpu,
            &head,
            batch.rows,
            xt,
            plan_bn,
            self.max_chunk_rows,
        )?;
        // Everything a chunk needs exists before the first is submitted: nothing is replaced
        // under a chunk in flight.
        self.pool.drain(&self.gpu)?;
        let most = Layout::new(&head, chunk.min(batch.rows), xt, plan_bn);
        self.pool
            .prepare(&self.gpu, &most.bytes, run::PARAMS_BYTES)?;
        let f16w = self.path.f16_weights();
        self.bind_groups(f16w)?;
        let full = out.is_some();
        let dev = &self.gpu.device;
        let vpt = kernels::values_per_thread(head.dim);
        let epilogue = if full {
            Some(
                self.kernels
                    .epilogue(dev, vpt)
                    .map_err(device_error)?
                    .clone(),
            )
        } else {
            None
        };
        let mut variants = Vec::new();
        let mut pipes: Vec<wgpu::ComputePipeline> = Vec::new();
        let mut start = 0;
        while start < batch.rows {
            let n = chunk.min(batch.rows - start);
            let v = self.variant(n, xt);
            variants.push((start, n, v));
            pipes.push(self.kernels.proj(dev, v).map_err(device_error)?.clone());
            start += n;
        }
        let binds = self
            .binds
            .as_ref()
            .ok_or_else(|| device_error("bind groups missing"))?;
        let dh = self.head.as_ref().ok_or_else(no_head)?;
        let p = &self.pool;
        let (params, mods, mask, x, outb) = (
            p.params.get()?.clone(),
            p.mods.get()?.clone(),
            p.mask.get()?.clone(),
            p.x.get()?.clone(),
            p.out.get()?.clone(),
        );
        let mut stats = RunStats::default();
        let mut res = Ok(());
        for (i, ((start, n, v), pipe)) in variants.iter().zip(&pipes).enumerate() {
            let job = ChunkJob {
                gpu: &self.gpu,
                head: &head,
                w_off: &dh.w_off,
                xt,
                proj: pipe,
                proj_bind: &binds.proj,
                epilogue: epilogue.as_ref().map(|e| (e, &binds.epilogue)),
                params: &params,
                mods: &mods,
                mask: &mask,
                x: &x,
                out: &outb,
            };
            let s = i % RING;
            res = job
                .drain(&mut self.pool, s, out.as_mut(), &mut stats)
                .and_then(|_| {
                    job.submit(
                        &mut self.pool,
                        s,
                        &batch.slice(*start, *n),
                        *start,
                        *v,
                        &mut stats,
                    )
                });
            if res.is_err() {
                break;
            }
        }
        if res.is_ok() {
            let last = pipes.len();
            for k in 0..RING {
                let s = (last + k) % RING;
                let job = ChunkJob {
                    gpu: &self.gpu,
                    head: &head,
                    w_off: &dh.w_off,
                    xt,
                    proj: pipes.first().ok_or_else(|| device_error("no chunk"))?,
                    proj_bind: &binds.proj,
                    epilogue: epilogue.as_ref().map(|e| (e, &binds.epilogue)),
                    params: &params,
                    mods: &mods,
                    mask: &mask,
                    x: &x,
                    out: &outb,
                };
                res = job.drain(&mut self.pool, s, out.as_mut(), &mut stats);
                if res.is_err() {
                    break;
                }
            }
        }
        if res.is_err() {
            // Best effort: leave no chunk in flight; the first error is the one reported.
            let _ = self.pool.drain(&self.gpu);
            return res;
        }
        if full {
            self.stats.runs += 1;
            self.stats.gemm_ms += stats.gemm_ms;
            self.stats.epilogue_ms += stats.epilogue_ms;
            self.stats.host_stage_ms += stats.host_stage_ms;
            self.stats.host_wait_ms += stats.host_wait_ms;
            self.stats.host_drain_ms += stats.host_drain_ms;
        }
        Ok(())
    }

    /// The run statistics since the last call (device times need TIMESTAMP_QUERY: None
    /// without it).
    pub(super) fn take_run_stats(&mut self) -> Option<RunStats> {
        let s = std::mem::take(&mut self.stats);
        (self.gpu.timestamps && s.runs > 0).then_some(s)
    }

    /// Buffers and query sets created since the device was opened.
    pub(super) fn buffers_created(&self) -> u64 {
        self.pool.created
    }

    /// (Re)builds the bind groups when a pool buffer or the head changed.
    fn bind_groups(&mut self, f16_weights: bool) -> Result<()> {
        let dh = self.head.as_ref().ok_or_else(no_head)?;
        let key = (self.pool.generation, dh.generation, f16_weights);
        let wt = if f16_weights {
            dh.wt16
                .as_ref()
                .ok_or_else(|| device_error("f16 weights missing (no SHADER_F16)"))?
        } else {
            &dh.wt
        };
        if self.binds.as_ref().is_some_and(|b| b.key == key) {
            return Ok(());
        }
        let p = &self.pool;
        fn e(i: u32, b: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
            wgpu::BindGroupEntry {
                binding: i,
                resource: b.as_entire_binding(),
            }
        }
        let dev = &self.gpu.device;
        let proj = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("fusion_proj"),
            layout: &self.kernels.proj_layout,
            entries: &[
                e(0, p.params.get()?),
                e(1, p.mods.get()?),
                e(2, p.x.get()?),
                e(3, wt),
                e(4, &dh.vecs),
                e(5, p.h.get()?),
                e(6, p.part.get()?),
            ],
        });
        let epilogue = dev.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("fusion_epilogue"),
            layout: &self.kernels.epilogue_layout,
            entries: &[
                e(0, p.params.get()?),
                e(1, p.mask.get()?),
                e(2, p.h.get()?),
                e(3, p.part.get()?),
                e(4, &dh.vecs),
                e(5, p.out.get()?),
            ],
        });
        self.binds = Some(BindGroups {
            key,
            proj,
            epilogue,
        });
        Ok(())
    }
}

fn no_head() -> Error {
    Error::Config("no head uploaded to the wgpu backend".into())
}

impl WgpuRunner {
    pub(super) fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        self.uploads += 1;
        self.head = None;
        self.binds = None;
        let vpt = kernels::values_per_thread(head.dim);
        let dh = DeviceHead::upload(&self.gpu, head, self.uploads)?;
        // Compile what the first batch will need now rather than on its clock.
        self.kernels
            .epilogue(&self.gpu.device, vpt)
            .map_err(device_error)?;
        let v = self.variant(1, XType::F32);
        let v = match v {
            ProjVariant::Tiled(t, _, w) if w == XType::F16 => ProjVariant::Tiled(t, XType::F16, w),
            v => v,
        };
        self.kernels
            .proj(&self.gpu.device, v)
            .map_err(device_error)?;
        self.gpu.take_error()?;
        self.head = Some(dh);
        Ok(())
    }

    pub(super) fn run_batch(&mut self, batch: &BatchRef<'_>, out: OutputsMut<'_>) -> Result<()> {
        let head = self.head.as_ref().ok_or_else(no_head)?.head.clone();
        batch.validate(&head)?;
        out.check(&head, batch.rows)?;
        self.run_chunks(batch, Some(out))
    }

    pub(super) fn run_projections_only(&mut self, batch: &BatchRef<'_>) -> Result<bool> {
        let head = self.head.as_ref().ok_or_else(no_head)?.head.clone();
        batch.validate_shapes(&head)?;
        self.run_chunks(batch, None).map(|_| true)
    }
}
