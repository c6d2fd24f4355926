//! The CUDA kernels (`kernels/*.cu`, embedded at build time), their NVRTC compilation, and the
//! per-device module cache.
//!
//! At run time each kernel file is compiled once per GPU architecture straight to a cubin for
//! that architecture (`sm_XY`, no PTX JIT in the driver), falling back to PTX for `compute_XY`
//! when the installed NVRTC does not know the exact architecture; the loaded module is cached
//! per device ordinal for the life of the process. [`compile_check`] compiles every kernel to
//! PTX for `compute_90` with nothing but libnvrtc (and, if found, the CUDA headers): the check CI
//! runs on machines without a GPU.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{result as nr, sys as ns, Ptx};

use super::libs::{self, guard, Lib};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// One kernel file.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File stem, shared with the WGSL twin in `shaders/` (`fusion_epilogue`).
    pub stem: &'static str,
    /// CUDA C++ source.
    pub src: &'static str,
    /// The `extern "C"` symbols it must define (`<op>_<dtype>`).
    pub symbols: &'static [&'static str],
}

/// Every kernel the backend uses.
pub const SOURCES: &[KernelSource] = &[KernelSource {
    stem: "fusion_epilogue",
    src: include_str!("../../../kernels/fusion_epilogue.cu"),
    symbols: &[
        EPILOGUE[0],
        EPILOGUE[1],
        EPILOGUE[2],
        EPILOGUE_WARP[0][0],
        EPILOGUE_WARP[0][1],
        EPILOGUE_WARP[0][2],
        EPILOGUE_WARP[1][0],
        EPILOGUE_WARP[1][1],
        EPILOGUE_WARP[1][2],
        EPILOGUE_WARP[2][0],
        EPILOGUE_WARP[2][1],
        EPILOGUE_WARP[2][2],
        EPILOGUE_WARP[3][0],
        EPILOGUE_WARP[3][1],
        EPILOGUE_WARP[3][2],
        EPILOGUE_VEC[0][0],
        EPILOGUE_VEC[0][1],
        EPILOGUE_VEC[0][2],
        EPILOGUE_VEC[1][0],
        EPILOGUE_VEC[1][1],
        EPILOGUE_VEC[1][2],
        EPILOGUE_VEC[2][0],
        EPILOGUE_VEC[2][1],
        EPILOGUE_VEC[2][2],
    ],
}];

/// Index of the dtype of the projections `h` (f32, or the inputs' half dtype: docs/DESIGN.md
/// section 2.5) in the symbol tables below.
pub(crate) fn h_index(h: DType) -> usize {
    match h {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// The fused epilogue, one block per row (any D), per dtype of `h`.
pub(crate) const EPILOGUE: [&str; 3] = [
    "fusion_epilogue_f32",
    "fusion_epilogue_f16",
    "fusion_epilogue_bf16",
];

/// Elements per lane of each warp-per-row epilogue (D <= 32 x elements per lane).
pub(crate) const WARP_PER_LANE: [usize; 4] = [4, 8, 16, 32];

/// The warp-per-row epilogues: per entry of [`WARP_PER_LANE`], per dtype of `h`.
pub(crate) const EPILOGUE_WARP: [[&str; 3]; 4] = [
    [
        "fusion_epilogue_warp4_f32",
        "fusion_epilogue_warp4_f16",
        "fusion_epilogue_warp4_bf16",
    ],
    [
        "fusion_epilogue_warp8_f32",
        "fusion_epilogue_warp8_f16",
        "fusion_epilogue_warp8_bf16",
    ],
    [
        "fusion_epilogue_warp16_f32",
        "fusion_epilogue_warp16_f16",
        "fusion_epilogue_warp16_bf16",
    ],
    [
        "fusion_epilogue_warp32_f32",
        "fusion_epilogue_warp32_f16",
        "fusion_epilogue_warp32_bf16",
    ],
];

/// Elements per lane of each 16-byte-load warp-per-row epilogue (`vec`): whole vectors of every
/// dtype (8 f16/bf16 a load), so 8 or more.
pub(crate) const VEC_PER_LANE: [usize; 3] = [8, 16, 32];

/// The 16-byte-load warp-per-row epilogues: per entry of [`VEC_PER_LANE`], per dtype of `h`.
pub(crate) const EPILOGUE_VEC: [[&str; 3]; 3] = [
    [
        "fusion_epilogue_vec8_f32",
        "fusion_epilogue_vec8_f16",
        "fusion_epilogue_vec8_bf16",
    ],
    [
        "fusion_epilogue_vec16_f32",
        "fusion_epilogue_vec16_f16",
        "fusion_epilogue_vec16_bf16",
    ],
    [
        "fusion_epilogue_vec32_f32",
        "fusion_epilogue_vec32_f16",
        "fusion_epilogue_vec32_bf16",
    ],
];

/// Architecture the compile check targets (H100/H200).
pub const CHECK_ARCH: &str = "compute_90";

/// What NVRTC produced.
enum Image {
    Cubin(Vec<u8>),
    /// NUL-terminated PTX text.
    Ptx(Vec<u8>),
}

/// Compiles `src` with `options`; returns the image and the compiler log.
fn nvrtc_compile(
    name: &str,
    src: &str,
    options: &[String],
    cubin: bool,
) -> Result<(Image, String), String> {
    let csrc = CString::new(src).map_err(|_| format!("{name}: source holds a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| format!("{name}: bad name"))?;
    guard("libnvrtc", || {
        let prog = nr::create_program(&csrc, Some(&cname))
            .map_err(|e| format!("{name}: nvrtcCreateProgram: {e}"))?;
        // SAFETY: `prog` was just created and is destroyed exactly once below; `csrc` and
        // `cname` outlive it.
        let out = unsafe { compile_program(prog, name, options, cubin) };
        // SAFETY: as above; the program is not used after this.
        let _ = unsafe { nr::destroy_program(prog) };
        out
    })
}

/// # Safety
/// `prog` must be a live program from `nvrtcCreateProgram`.
unsafe fn compile_program(
    prog: ns::nvrtcProgram,
    name: &str,
    options: &[String],
    cubin: bool,
) -> Result<(Image, String), String> {
    let compiled = nr::compile_program(prog, options);
    let log = nr::get_program_log(prog)
        .map(|l| {
            // SAFETY: nvrtcGetProgramLog writes a NUL-terminated string of the size it reported.
            let s = CStr::from_ptr(l.as_ptr());
            s.to_string_lossy().trim().to_string()
        })
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(format!(
            "{name}.cu: NVRTC {e} with options {options:?}:\n{log}"
        ));
    }
    let image = if cubin {
        let mut size = 0usize;
        ns::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| format!("{name}: nvrtcGetCUBINSize: {e}"))?;
        let mut buf = vec![0u8; size];
        ns::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| format!("{name}: nvrtcGetCUBIN: {e}"))?;
        Image::Cubin(buf)
    } else {
        let ptx = nr::get_ptx(prog).map_err(|e| format!("{name}: nvrtcGetPTX: {e}"))?;
        Image::Ptx(ptx.into_iter().map(|c| c as u8).collect())
    };
    Ok((image, log))
}

/// NVRTC options for `arch` (`sm_90` or `compute_90`).
fn options(arch: &str, includes: &[PathBuf]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // Precise math: the tolerance (docs/DESIGN.md section 2.4) is 1e-4 for f32 on a GPU.
        "--fmad=true".to_string(),
        "--prec-div=true".to_string(),
        "--prec-sqrt=true".to_string(),
        "--ftz=false".to_string(),
        "-lineinfo".to_string(),
    ];
    o.extend(
        includes
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    o
}

/// The installed NVRTC's version.
fn nvrtc_version() -> Result<(i32, i32), String> {
    guard("libnvrtc", || {
        let (mut a, mut b) = (0, 0);
        // SAFETY: nvrtcVersion writes two ints to valid pointers.
        unsafe { ns::nvrtcVersion(&mut a, &mut b) }
            .result()
            .map_err(|e| format!("nvrtcVersion: {e}"))?;
        Ok((a, b))
    })
}

/// Result of [`compile_check`].
#[derive(Debug, Clone)]
pub struct CompileReport {
    /// NVRTC version.
    pub nvrtc: (i32, i32),
    /// Where libnvrtc came from.
    pub nvrtc_path: String,
    /// Include folders passed to NVRTC.
    pub includes: Vec<PathBuf>,
    /// Target architecture.
    pub arch: &'static str,
    /// Per kernel file: stem, PTX bytes, symbols found.
    pub kernels: Vec<(String, usize, Vec<String>)>,
}

impl std::fmt::Display for CompileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "NVRTC {}.{} ({})",
            self.nvrtc.0, self.nvrtc.1, self.nvrtc_path
        )?;
        if self.includes.is_empty() {
            writeln!(f, "include: none found (the kernels need no CUDA header)")?;
        } else {
            for d in &self.includes {
                writeln!(f, "include: {}", d.display())?;
            }
        }
        for (stem, bytes, syms) in &self.kernels {
            writeln!(
                f,
                "kernels/{stem}.cu -> {} PTX, {bytes} bytes: {}",
                self.arch,
                syms.join(", ")
            )?;
        }
        write!(f, "{} kernel files compiled, ok", self.kernels.len())
    }
}

/// Compiles every kernel with NVRTC for `compute_90` (no GPU, no driver needed) and checks that
/// each defines its `extern "C"` symbols. `include` is an extra CUDA include folder.
pub fn compile_check(include: Option<&Path>) -> Result<CompileReport> {
    let unavailable = |reason: String| Error::BackendUnavailable {
        backend: "cuda".into(),
        reason,
    };
    if let Some(dir) = include {
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "--include {}: not a folder",
                dir.display()
            )));
        }
    }
    let nvrtc_path = libs::ensure(Lib::Nvrtc, None).map_err(unavailable)?;
    let nvrtc = nvrtc_version().map_err(unavailable)?;
    let includes = libs::include_dirs(include);
    let opts = options(CHECK_ARCH, &includes);
    let mut kernels = Vec::new();
    for k in SOURCES {
        let (image, log) =
            nvrtc_compile(k.stem, k.src, &opts, false).map_err(|reason| Error::Device {
                backend: "cuda".into(),
                reason,
            })?;
        let Image::Ptx(ptx) = image else {
            return Err(Error::Device {
                backend: "cuda".into(),
                reason: format!("{}: NVRTC returned no PTX", k.stem),
            });
        };
        if !log.is_empty() {
            eprintln!("kernels/{}.cu: NVRTC log:\n{log}", k.stem);
        }
        let text = String::from_utf8_lossy(&ptx);
        let mut found = Vec::new();
        for sym in k.symbols {
            if !text.contains(&format!(".entry {sym}(")) {
                return Err(Error::Device {
                    backend: "cuda".into(),
                    reason: format!("kernels/{}.cu defines no extern \"C\" kernel {sym}", k.stem),
                });
            }
            found.push(sym.to_string());
        }
        kernels.push((k.stem.to_string(), ptx.len(), found));
    }
    Ok(CompileReport {
        nvrtc,
        nvrtc_path,
        includes,
        arch: CHECK_ARCH,
        kernels,
    })
}

/// The kernels of one device, loaded.
pub(crate) struct Kernels {
    /// Keeps the module (and through it the context) alive.
    _module: Arc<CudaModule>,
    /// The block-per-row epilogues, indexed like [`EPILOGUE`] (by [`h_index`]).
    pub epilogue: Vec<CudaFunction>,
    /// The warp-per-row epilogues, indexed like [`EPILOGUE_WARP`]: per elements per lane
    /// (smallest first), per dtype of `h`.
    pub epilogue_warp: Vec<Vec<CudaFunction>>,
    /// The 16-byte-load warp-per-row epilogues, indexed like [`EPILOGUE_VEC`].
    pub epilogue_vec: Vec<Vec<CudaFunction>>,
}

/// Compiled images per architecture, shared by devices of the same kind.
static IMAGES: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
/// Loaded kernels per device ordinal.
static MODULES: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();

/// The kernels of device `ordinal` (architecture `sm_XY`), compiling and loading on first use.
pub(crate) fn load(
    ctx: &Arc<CudaContext>,
    ordinal: usize,
    cc: (i32, i32),
) -> Result<Arc<Kernels>, String> {
    let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut modules = modules.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = modules.get(&ordinal) {
        return Ok(k.clone());
    }
    let image = image_for(cc)?;
    let module = guard("cuModuleLoadData", || {
        ctx.load_module(Ptx::from_binary(image.as_ref().clone()))
            .map_err(|e| format!("loading the kernels on GPU {ordinal}: {e}"))
    })?;
    let function = |sym: &str| {
        guard("cuModuleGetFunction", || {
            module
                .load_function(sym)
                .map_err(|e| format!("kernel {sym}: {e}"))
        })
    };
    let epilogue = EPILOGUE
        .iter()
        .map(|s| function(s))
        .collect::<Result<Vec<_>, _>>()?;
    let table = |t: &[[&str; 3]]| {
        t.iter()
            .map(|syms| syms.iter().map(|s| function(s)).collect())
            .collect::<Result<Vec<Vec<_>>, _>>()
    };
    let (epilogue_warp, epilogue_vec) = (table(&EPILOGUE_WARP)?, table(&EPILOGUE_VEC)?);
    let k = Arc::new(Kernels {
        _module: module,
        epilogue,
        epilogue_warp,
        epilogue_vec,
    });
    modules.insert(ordinal, k.clone());
    Ok(k)
}

/// One image holding every kernel for compute capability `cc` (all sources concatenated: they
/// share nothing but are one module).
fn image_for(cc: (i32, i32)) -> Result<Arc<Vec<u8>>, String> {
    let arch = format!("{}{}", cc.0, cc.1);
    let images = IMAGES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut images = images.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = images.get(&arch) {
        return Ok(i.clone());
    }
    let src: String = SOURCES.iter().map(|k| k.src).collect::<Vec<_>>().join("\n");
    let includes = libs::include_dirs(None);
    let image = match nvrtc_compile(
        "fusion_kernels",
        &src,
        &options(&format!("sm_{arch}"), &includes),
        true,
    ) {
        Ok((Image::Cubin(c), _)) => c,
        Ok((Image::Ptx(p), _)) => p,
        Err(cubin_err) => {
            // An NVRTC older than the GPU: PTX for the same virtual architecture, JIT-compiled
            // by the driver.
            match nvrtc_compile(
                "fusion_kernels",
                &src,
                &options(&format!("compute_{arch}"), &includes),
                false,
            ) {
                Ok((Image::Ptx(p), _)) | Ok((Image::Cubin(p), _)) => p,
                Err(ptx_err) => return Err(format!("{cubin_err}\n(PTX fallback: {ptx_err})")),
            }
        }
    };
    let image = Arc::new(image);
    images.insert(arch, image.clone());
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run-time path: a cubin for sm_90 straight from NVRTC (skipped without libnvrtc).
    /// ptxas's resource report is printed (registers, spills) for the record.
    #[test]
    fn compiles_to_an_sm90_cubin() {
        if let Err(why) = libs::ensure(Lib::Nvrtc, None) {
            eprintln!("skipping: {why}");
            return;
        }
        let src: String = SOURCES.iter().map(|k| k.src).collect::<Vec<_>>().join("\n");
        let mut opts = options("sm_90", &libs::include_dirs(None));
        opts.push("--ptxas-options=-v".into());
        let (image, log) = nvrtc_compile("fusion_kernels", &src, &opts, true).expect("compiles");
        let Image::Cubin(cubin) = image else {
            panic!("expected a cubin")
        };
        assert!(cubin.starts_with(b"\x7fELF"), "not an ELF cubin");
        eprintln!("{log}");
        assert!(!log.contains("bytes spill stores") || log.contains(" 0 bytes spill stores"));
    }
}
