//! The WGSL kernels (`shaders/fusion_proj.wgsl`, `shaders/fusion_epilogue.wgsl`, the same stems
//! as the CUDA twins in `kernels/`), their compile-time variants, the bind group layouts they
//! share, and a cache that compiles each variant once per device, on first use.

use std::collections::HashMap;

const PROJ_SRC: &str = include_str!("../../../shaders/fusion_proj.wgsl");
const COOP_SRC: &str = include_str!("../../../shaders/fusion_proj_coop.wgsl");
const EPILOGUE_SRC: &str = include_str!("../../../shaders/fusion_epilogue.wgsl");

/// Invocations per projection workgroup (16 x 16).
pub(super) const PROJ_THREADS: u32 = 256;
/// Side of the projection workgroup.
pub(super) const PROJ_WG_DIM: u32 = 16;
/// Invocations per epilogue workgroup (one workgroup per sample); `EW` in the shader.
pub(super) const EPILOGUE_THREADS: u32 = 256;
/// Workgroup memory the largest variant uses, in bytes (checked against the adapter).
pub(super) const SHARED_BYTES: u32 = {
    let (a, b) = (Tile::Small.shared_floats(), Tile::Large.shared_floats());
    (if a > b { a } else { b }) * 4 + 4
};

/// Rows of x are padded to a multiple of this (the largest BM), so no row tile reads past x.
pub(super) const ROW_PAD: usize = 128;
/// Each modality's width is padded (with zeros, in x and W^T) to a multiple of this (the
/// largest BK, and the cooperative matrices' K), so no K step reads past its row.
pub(super) const K_PAD: usize = 16;
/// W^T's row stride: D rounded up to this (the largest BN).
pub(super) const COL_PAD: usize = 128;

/// Cooperative-matrix fragments per workgroup tile (rows x columns of 16 x 16 fragments).
const COOP_FM: u32 = 2;
const COOP_FN: u32 = 2;

// WebGPU's default (and minimum) workgroup memory is 16 KiB: every variant fits it.
const _: () = assert!(SHARED_BYTES <= 16384);
const _: () = assert!(
    ROW_PAD.is_multiple_of(16 * COOP_FM as usize) && COL_PAD.is_multiple_of(16 * COOP_FN as usize)
);

/// A projection GEMM tile shape of the tiled (register-blocked) kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tile {
    /// 64 x 64 output tile, 4 x 4 per invocation, K step 16: small batches and narrow heads.
    Small,
    /// 128 x 128 output tile, 8 x 8 per invocation, K step 8: large batches.
    Large,
}

impl Tile {
    /// Every tile shape.
    pub const ALL: [Tile; 2] = [Tile::Small, Tile::Large];

    /// `(BM, BN, BK, TM, TN)`.
    pub(super) const fn dims(self) -> (u32, u32, u32, u32, u32) {
        match self {
            Tile::Small => (64, 64, 16, 4, 4),
            Tile::Large => (128, 128, 8, 8, 8),
        }
    }

    /// Rows per tile.
    pub(super) const fn bm(self) -> u32 {
        self.dims().0
    }

    /// Columns per tile.
    pub(super) const fn bn(self) -> u32 {
        self.dims().1
    }

    /// `BMxBNxBK`, as `FUSION_WGPU_TILE` accepts it and `devices` prints it.
    pub fn shape(self) -> String {
        let (bm, bn, bk, tm, tn) = self.dims();
        format!("{bm}x{bn}x{bk}/{tm}x{tn}")
    }

    /// Parses `small`, `large`, or a shape `BMxBNxBK` (`64x64x16`, `128x128x8`); `auto` and
    /// the empty string are `Ok(None)`.
    pub fn parse(s: &str) -> Result<Option<Tile>, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "auto" => Ok(None),
            "small" | "64x64x16" => Ok(Some(Tile::Small)),
            "large" | "128x128x8" => Ok(Some(Tile::Large)),
            _ => Err(format!(
                "FUSION_WGPU_TILE={s:?}: expected auto, small (64x64x16) or large (128x128x8)"
            )),
        }
    }

    /// Floats of workgroup memory: the staged x (padded rows) and W tiles, or the score
    /// reduction, whichever is larger (they share the array).
    const fn shared_floats(self) -> u32 {
        let (bm, bn, bk, _, tn) = self.dims();
        let stage = bk * (bm + 1) + bk * bn;
        let reduce = bm * (bn / tn);
        if stage > reduce {
            stage
        } else {
            reduce
        }
    }

    /// True when the adapter's limits run this tile.
    pub(super) fn fits(self, limits: &wgpu::Limits) -> bool {
        let (bm, bn, _, tm, tn) = self.dims();
        let (x, y) = (bn / tn, bm / tm);
        limits.max_compute_workgroup_storage_size >= self.shared_floats() * 4 + 4
            && limits.max_compute_invocations_per_workgroup >= x * y
            && limits.max_compute_workgroup_size_x >= x
            && limits.max_compute_workgroup_size_y >= y
    }

    /// The tile for a chunk of `rows` samples of width `dim`: the large tile only where it
    /// fills the device without wasting most of a tile, and the adapter allows it.
    pub(super) fn choose(rows: usize, dim: usize, large_ok: bool) -> Tile {
        if large_ok && rows >= 512 && dim >= 256 {
            Tile::Large
        } else {
            Tile::Small
        }
    }
}

/// Which projection kernel a device runs, as asked for (`FUSION_WGPU_KERNEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KernelChoice {
    /// f32 weights, f32 accumulation (the documented f32 tolerances); f16 inputs stay f16 on
    /// devices with SHADER_F16. The default.
    #[default]
    Auto,
    /// Same as `Auto`.
    F32,
    /// f16 weights and f16 inputs (f32 and bf16 inputs are narrowed on the host), f32
    /// accumulation; needs SHADER_F16, else falls back to f32. Tolerance 1e-2.
    F16,
    /// As `F16`, on cooperative matrices (f16 16 x 16 x 16, f32 accumulator) where the adapter
    /// reports them; else falls back to `F16`, then f32.
    Coop,
}

impl KernelChoice {
    /// Parses `auto`, `f32`, `f16`, `coop` (empty: auto).
    pub fn parse(s: &str) -> Result<KernelChoice, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(KernelChoice::Auto),
            "f32" => Ok(KernelChoice::F32),
            "f16" => Ok(KernelChoice::F16),
            "coop" | "coop-matrix" => Ok(KernelChoice::Coop),
            other => Err(format!(
                "FUSION_WGPU_KERNEL={other:?}: expected auto, f32, f16 or coop"
            )),
        }
    }
}

/// The projection path a device actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Register-blocked tiled GEMM, f32 weights (f16 inputs read as f16 where allowed).
    TiledF32,
    /// Register-blocked tiled GEMM, f16 weights and inputs, f32 accumulation.
    TiledF16,
    /// Cooperative matrices, f16 weights and inputs, f32 accumulation.
    Coop,
}

impl Path {
    /// Resolves a choice against what the device has; the path and, on a fallback, why.
    pub(super) fn resolve(choice: KernelChoice, f16: bool, coop: bool) -> (Path, Option<String>) {
        match choice {
            KernelChoice::Auto | KernelChoice::F32 => (Path::TiledF32, None),
            KernelChoice::F16 if f16 => (Path::TiledF16, None),
            KernelChoice::Coop if f16 && coop => (Path::Coop, None),
            KernelChoice::Coop if f16 => (
                Path::TiledF16,
                Some("no f16 16x16 cooperative matrices: tiled f16 instead".into()),
            ),
            KernelChoice::F16 | KernelChoice::Coop => (
                Path::TiledF32,
                Some("no SHADER_F16: tiled f32 instead".into()),
            ),
        }
    }

    /// True when weights are f16 on the device (inputs are then f16 too).
    pub(super) fn f16_weights(self) -> bool {
        self != Path::TiledF32
    }

    /// Short name for `devices` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Path::TiledF32 => "tiled f32",
            Path::TiledF16 => "tiled f16",
            Path::Coop => "coop-matrix f16",
        }
    }
}

/// One compiled projection kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum ProjVariant {
    /// The tiled kernel with this tile and input / weight types.
    Tiled(Tile, XType, XType),
    /// The cooperative-matrix kernel, one subgroup of `sg` invocations per workgroup.
    Coop { sg: u32 },
}

impl ProjVariant {
    /// `(BM, BN)` of one workgroup's output tile.
    pub(super) fn tile_mn(self) -> (u32, u32) {
        match self {
            ProjVariant::Tiled(t, _, _) => (t.bm(), t.bn()),
            ProjVariant::Coop { .. } => (16 * COOP_FM, 16 * COOP_FN),
        }
    }

    fn label(self) -> String {
        match self {
            ProjVariant::Tiled(t, x, w) => {
                format!("fusion_proj_{t:?}_x{}_w{}", x.name(), w.name())
            }
            ProjVariant::Coop { sg } => format!("fusion_proj_coop_sg{sg}"),
        }
    }

    fn source(self) -> String {
        match self {
            ProjVariant::Tiled(t, x, w) => proj_source(t, x, w),
            ProjVariant::Coop { sg } => format!(
                "enable f16;\nenable wgpu_cooperative_matrix;\nconst FM: u32 = {COOP_FM}u;\n\
                 const FN: u32 = {COOP_FN}u;\nconst SG: u32 = {sg}u;\n{COOP_SRC}"
            ),
        }
    }
}

/// Input (or weight) element type of the projection kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum XType {
    /// f32 (f32 on the wire, or f16/bf16 widened on the host).
    F32,
    /// f16 read as f16 from storage (needs SHADER_F16), accumulated in f32.
    F16,
}

impl XType {
    /// Bytes per element.
    pub(super) const fn size(self) -> usize {
        match self {
            XType::F32 => 4,
            XType::F16 => 2,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            XType::F32 => "f32",
            XType::F16 => "f16",
        }
    }
}

fn proj_source(tile: Tile, x: XType, w: XType) -> String {
    let (bm, bn, bk, tm, tn) = tile.dims();
    let mut s = String::new();
    if x == XType::F16 || w == XType::F16 {
        s.push_str("enable f16;\n");
    }
    s.push_str(&format!(
        "alias xin_t = {};\nalias win_t = {};\n",
        x.name(),
        w.name()
    ));
    s.push_str(&format!(
        "const BM: u32 = {bm}u;\nconst BN: u32 = {bn}u;\nconst BK: u32 = {bk}u;\n\
         const TM: u32 = {tm}u;\nconst TN: u32 = {tn}u;\nconst SH: u32 = {}u;\n",
        tile.shared_floats()
    ));
    s.push_str(PROJ_SRC);
    s
}

/// Every shader variant this backend can compile, as `(label, WGSL)`: the tiled kernel for
/// each tile and type pair, the cooperative-matrix kernel (subgroups of 32 and 64), and the
/// epilogue for a few widths. For validation without a device (tests run naga on them).
pub fn shader_sources() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in Tile::ALL {
        for (x, w) in [
            (XType::F32, XType::F32),
            (XType::F16, XType::F32),
            (XType::F16, XType::F16),
        ] {
            let p = ProjVariant::Tiled(t, x, w);
            v.push((p.label(), p.source()));
        }
    }
    for sg in [32, 64] {
        let p = ProjVariant::Coop { sg };
        v.push((p.label(), p.source()));
    }
    for vpt in [1, 2, 4] {
        v.push((format!("fusion_epilogue_vpt{vpt}"), epilogue_source(vpt)));
    }
    v
}

fn epilogue_source(vpt: u32) -> String {
    format!("const VPT: u32 = {vpt}u;\n{EPILOGUE_SRC}")
}

/// Elements of z each epilogue invocation keeps in registers for width `dim`.
pub(super) fn values_per_thread(dim: usize) -> u32 {
    dim.div_ceil(EPILOGUE_THREADS as usize).max(1) as u32
}

fn storage(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

/// Compiled pipelines of one device, built on first use and kept.
pub(super) struct Kernels {
    /// Layout of `fusion_proj`: params, mods, x, wt, vecs (read), h, part (read-write).
    pub(super) proj_layout: wgpu::BindGroupLayout,
    /// Layout of `fusion_epilogue`: params, mask, h, part, vecs (read), out (read-write).
    pub(super) epilogue_layout: wgpu::BindGroupLayout,
    proj_pipeline_layout: wgpu::PipelineLayout,
    epilogue_pipeline_layout: wgpu::PipelineLayout,
    proj: HashMap<ProjVariant, wgpu::ComputePipeline>,
    epilogue: HashMap<u32, wgpu::ComputePipeline>,
}

impl Kernels {
    /// Creates the layouts (no shader is compiled yet).
    pub(super) fn new(device: &wgpu::Device) -> Kernels {
        let proj_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("fusion_proj"),
            entries: &[
                uniform(0),
                storage(1, true),
                storage(2, true),
                storage(3, true),
                storage(4, true),
                storage(5, false),
                storage(6, false),
            ],
        });
        let epilogue_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("fusion_epilogue"),
            entries: &[
                uniform(0),
                storage(1, true),
                storage(2, true),
                storage(3, true),
                storage(4, true),
                storage(5, false),
            ],
        });
        let pl = |l: &wgpu::BindGroupLayout, label| {
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(label),
                bind_group_layouts: &[Some(l)],
                immediate_size: 0,
            })
        };
        Kernels {
            proj_pipeline_layout: pl(&proj_layout, "fusion_proj"),
            epilogue_pipeline_layout: pl(&epilogue_layout, "fusion_epilogue"),
            proj_layout,
            epilogue_layout,
            proj: HashMap::new(),
            epilogue: HashMap::new(),
        }
    }

    /// The projection pipeline of a variant, compiled on first use.
    pub(super) fn proj(
        &mut self,
        device: &wgpu::Device,
        v: ProjVariant,
    ) -> Result<&wgpu::ComputePipeline, String> {
        if !self.proj.contains_key(&v) {
            let p = compile(
                device,
                &self.proj_pipeline_layout,
                &v.label(),
                &v.source(),
                "fusion_proj",
            )?;
            self.proj.insert(v, p);
        }
        self.proj
            .get(&v)
            .ok_or_else(|| "projection pipeline missing from its cache".to_string())
    }

    /// The epilogue pipeline for `vpt` values per invocation, compiled on first use.
    pub(super) fn epilogue(
        &mut self,
        device: &wgpu::Device,
        vpt: u32,
    ) -> Result<&wgpu::ComputePipeline, String> {
        if !self.epilogue.contains_key(&vpt) {
            let p = compile(
                device,
                &self.epilogue_pipeline_layout,
                &format!("fusion_epilogue_vpt{vpt}"),
                &epilogue_source(vpt),
                "fusion_epilogue",
            )?;
            self.epilogue.insert(vpt, p);
        }
        self.epilogue
            .get(&vpt)
            .ok_or_else(|| "epilogue pipeline missing from its cache".to_string())
    }
}

/// Compiles one WGSL module and its compute pipeline, capturing validation errors instead of
/// letting wgpu's default handler panic.
fn compile(
    device: &wgpu::Device,
    layout: &wgpu::PipelineLayout,
    label: &str,
    source: &str,
    entry: &str,
) -> Result<wgpu::ComputePipeline, String> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(label),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(label),
        layout: Some(layout),
        module: &module,
        entry_point: Some(entry),
        // Both kernels write every workgroup-memory word before reading it (the x tile's padding
        // column is never read), so the zero-fill wgpu would add to each workgroup is skipped.
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: false,
            ..Default::default()
        },
        cache: None,
    });
    match pollster::block_on(scope.pop()) {
        None => Ok(pipeline),
        Some(e) => Err(format!("compiling {label}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_fit_the_shared_budget() {
        for t in [Tile::Small, Tile::Large] {
            let (bm, bn, bk, tm, tn) = t.dims();
            assert_eq!((bn / tn) * (bm / tm), PROJ_THREADS);
            assert_eq!(bm * bk % PROJ_THREADS, 0);
            assert_eq!(bn * bk % PROJ_THREADS, 0);
        }
    }
}
