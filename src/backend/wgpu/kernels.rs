//! The WGSL kernels (`shaders/fusion_proj.wgsl`, `shaders/fusion_epilogue.wgsl`, the same stems
//! as the CUDA twins in `kernels/`), their compile-time variants, the bind group layouts they
//! share, and a cache that compiles each variant once per device, on first use.

use std::collections::HashMap;

const PROJ_SRC: &str = include_str!("../../../shaders/fusion_proj.wgsl");
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

// WebGPU's default (and minimum) workgroup memory is 16 KiB: every variant fits it.
const _: () = assert!(SHARED_BYTES <= 16384);

/// A projection GEMM tile shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tile {
    /// 64 x 64 output tile, 4 x 4 per invocation, K step 16: small batches and narrow heads.
    Small,
    /// 128 x 128 output tile, 8 x 8 per invocation, K step 8: large batches.
    Large,
}

impl Tile {
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

    /// The tile for a chunk of `rows` samples of width `dim`: the large tile only where it
    /// fills the device without wasting most of a tile.
    pub(super) fn choose(rows: usize, dim: usize) -> Tile {
        if rows >= 512 && dim >= 256 {
            Tile::Large
        } else {
            Tile::Small
        }
    }
}

/// Input element type of the projection kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum XType {
    /// f32 inputs (f32 on the wire, or f16/bf16 widened on the host).
    F32,
    /// f16 inputs read as f16 from storage (needs SHADER_F16), accumulated in f32.
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
}

fn proj_source(tile: Tile, x: XType) -> String {
    let (bm, bn, bk, tm, tn) = tile.dims();
    let mut s = String::new();
    if x == XType::F16 {
        s.push_str("enable f16;\nalias xin_t = f16;\n");
    } else {
        s.push_str("alias xin_t = f32;\n");
    }
    s.push_str(&format!(
        "const BM: u32 = {bm}u;\nconst BN: u32 = {bn}u;\nconst BK: u32 = {bk}u;\n\
         const TM: u32 = {tm}u;\nconst TN: u32 = {tn}u;\nconst SH: u32 = {}u;\n",
        tile.shared_floats()
    ));
    s.push_str(PROJ_SRC);
    s
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
    proj: HashMap<(Tile, XType), wgpu::ComputePipeline>,
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

    /// The projection pipeline for a tile and input type, compiled on first use.
    pub(super) fn proj(
        &mut self,
        device: &wgpu::Device,
        tile: Tile,
        x: XType,
    ) -> Result<&wgpu::ComputePipeline, String> {
        if !self.proj.contains_key(&(tile, x)) {
            let label = format!(
                "fusion_proj_{}_{tile:?}",
                if x == XType::F16 { "f16" } else { "f32" }
            );
            let p = compile(
                device,
                &self.proj_pipeline_layout,
                &label,
                &proj_source(tile, x),
                "fusion_proj",
            )?;
            self.proj.insert((tile, x), p);
        }
        self.proj
            .get(&(tile, x))
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
