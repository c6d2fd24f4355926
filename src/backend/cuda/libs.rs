//! Finding and loading the CUDA libraries without ever crashing.
//!
//! cudarc (feature `dynamic-loading`) opens `libcuda`, `libnvrtc` and `libcublas` by name on
//! first use and *panics* when a library or one of its symbols is missing. Everything here runs
//! before cudarc touches a library:
//!
//! - [`guard`] runs a closure under `catch_unwind`, turning a cudarc panic into a reason string.
//! - [`driver`] checks `cudarc::driver::sys::is_culib_present()` before the first driver call.
//! - [`nvrtc`] / [`cublas`] look for the library on the loader's default path first; failing
//!   that, in `FUSION_CUDA_LIB_DIR`, `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda` and the
//!   `nvidia/*/lib` folders of pip wheels (a `.venv` next to the working directory or the
//!   executable, `$VIRTUAL_ENV`, then `python3`'s site-packages). A library found there is opened
//!   by full path and kept open; glibc then resolves cudarc's later by-name `dlopen` of the same
//!   soname to the already loaded object.
//!
//! [`include_dirs`] finds CUDA headers the same way (for the NVRTC compile check).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Runs `f`, converting a panic (cudarc's reaction to a missing library or symbol) into
/// `Err("<what>: <panic message>")`.
pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("{what}: {msg}"))
        }
    }
}

/// Checks that the driver library (libcuda) can be opened.
pub(crate) fn driver() -> Result<(), String> {
    // SAFETY: is_culib_present only attempts dlopen of the candidate names and closes what it
    // opened; it calls no CUDA function.
    let present = guard("libcuda", || {
        Ok(unsafe { cudarc::driver::sys::is_culib_present() })
    })?;
    if present {
        Ok(())
    } else {
        Err("libcuda.so not found: no NVIDIA driver".into())
    }
}

/// One of the runtime-loaded CUDA libraries other than the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lib {
    /// The run-time compiler.
    Nvrtc,
    /// cuBLAS.
    Cublas,
}

impl Lib {
    /// File stem (`libnvrtc`).
    fn stem(self) -> &'static str {
        match self {
            Lib::Nvrtc => "libnvrtc",
            Lib::Cublas => "libcublas",
        }
    }

    /// Libraries to open first from the same folder (dependencies found by soname).
    fn companions(self) -> &'static [&'static str] {
        match self {
            Lib::Nvrtc => &["libnvrtc-builtins"],
            Lib::Cublas => &["libcublasLt"],
        }
    }

    /// cudarc's own presence check (dlopen by the names cudarc will use).
    fn present(self) -> bool {
        let r = guard(self.stem(), || {
            // SAFETY: both functions only dlopen/dlclose candidate names; no library code runs.
            Ok(unsafe {
                match self {
                    Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                    Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
                }
            })
        });
        r.unwrap_or(false)
    }
}

/// Outcome of [`ensure`] per library.
type Found = Vec<(Lib, Result<String, String>)>;
/// Cached outcomes of [`ensure`].
static FOUND: OnceLock<Mutex<Found>> = OnceLock::new();
/// Libraries opened by full path; never closed (cudarc holds symbols from them for the process).
static KEEP: OnceLock<Mutex<Vec<libloading::Library>>> = OnceLock::new();

/// Makes `lib` loadable by cudarc. Returns where it was found (`default loader path` or a full
/// path), or why it was not. Cached after the first call.
pub(crate) fn ensure(lib: Lib, driver_major: Option<u32>) -> Result<String, String> {
    let found = FOUND.get_or_init(|| Mutex::new(Vec::new()));
    let mut found = found.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, r)) = found.iter().find(|(l, _)| *l == lib) {
        return r.clone();
    }
    let r = locate_and_open(lib, driver_major);
    found.push((lib, r.clone()));
    r
}

fn locate_and_open(lib: Lib, driver_major: Option<u32>) -> Result<String, String> {
    if lib.present() {
        return Ok("default loader path".into());
    }
    let dirs = lib_dirs();
    let mut candidates: Vec<(u32, PathBuf)> = Vec::new();
    for dir in &dirs {
        for (major, path) in versioned_files(dir, lib.stem()) {
            candidates.push((major, path));
        }
    }
    // Prefer the newest major the driver supports (a newer NVRTC emits code an older driver
    // cannot load); without a driver (compile check), the newest.
    candidates.sort_by_key(|(major, _)| {
        let fits = driver_major.is_none_or(|d| *major <= d);
        (std::cmp::Reverse(fits), std::cmp::Reverse(*major))
    });
    let mut tried = Vec::new();
    for (_, path) in candidates {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let keep = KEEP.get_or_init(|| Mutex::new(Vec::new()));
        let mut keep = keep.lock().unwrap_or_else(|p| p.into_inner());
        for comp in lib.companions() {
            if let Some((_, cp)) = versioned_files(&dir, comp).into_iter().next() {
                // SAFETY: opening a CUDA library runs only its ELF initialisers, which have no
                // preconditions; the handle is kept for the life of the process.
                if let Ok(l) = unsafe { libloading::Library::new(&cp) } {
                    keep.push(l);
                }
            }
        }
        // SAFETY: as above.
        match unsafe { libloading::Library::new(&path) } {
            Ok(l) => {
                keep.push(l);
                drop(keep);
                if lib.present() {
                    return Ok(path.display().to_string());
                }
                tried.push(format!(
                    "{} (opened, but not under a name cudarc looks for)",
                    path.display()
                ));
            }
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    let searched = if dirs.is_empty() {
        "no CUDA or pip-wheel library folder found".to_string()
    } else {
        format!(
            "searched the loader path and {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let tried = if tried.is_empty() {
        String::new()
    } else {
        format!("; tried {}", tried.join("; "))
    };
    Err(format!(
        "{}.so not found ({searched}{tried}); set LD_LIBRARY_PATH or FUSION_CUDA_LIB_DIR",
        lib.stem()
    ))
}

/// `<stem>.so.<major>[.minor...]` (or `<stem>.so`, major 0) files in `dir`, newest first. Ignores
/// look-alikes such as `libnvrtc.alt.so.13` or `libcublasLt` when looking for `libcublas`.
fn versioned_files(dir: &Path, stem: &str) -> Vec<(u32, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{stem}.so");
    let mut out: Vec<(u32, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            let major = if rest.is_empty() {
                0
            } else {
                rest.strip_prefix('.')?.split('.').next()?.parse().ok()?
            };
            Some((major, e.path()))
        })
        .collect();
    out.sort_by_key(|(m, p)| (std::cmp::Reverse(*m), p.as_os_str().len()));
    out
}

/// Folders that may hold CUDA libraries, most specific first (only those that exist).
fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(v) = std::env::var_os("FUSION_CUDA_LIB_DIR") {
        dirs.extend(std::env::split_paths(&v));
    }
    for root in cuda_roots() {
        for sub in [
            "lib64",
            "lib",
            "targets/x86_64-linux/lib",
            "targets/sbsa-linux/lib",
        ] {
            dirs.push(root.join(sub));
        }
    }
    for sp in site_packages() {
        dirs.extend(wheel_dirs(&sp, "lib"));
    }
    dedup_existing(dirs)
}

/// Folders that may hold the CUDA headers, `extra` first (only those that exist).
pub(crate) fn include_dirs(extra: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = extra.map(Path::to_path_buf).into_iter().collect();
    for root in cuda_roots() {
        dirs.push(root.join("include"));
        dirs.push(root.join("targets/x86_64-linux/include"));
    }
    for sp in site_packages() {
        dirs.extend(wheel_dirs(&sp, "include"));
    }
    dedup_existing(dirs)
}

/// `CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`.
fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

/// `site-packages/nvidia/*/<sub>` (wheels: `nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`, ...).
fn wheel_dirs(site_packages: &Path, sub: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(site_packages.join("nvidia")) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(sub))
        .collect();
    // Newer wheel layouts (cu13 > cu12 > per-library folders) first.
    v.sort();
    v.reverse();
    v
}

/// Python site-packages folders: `.venv` in the working directory or above the executable,
/// `$VIRTUAL_ENV`, then what `python3` reports (computed once).
fn site_packages() -> Vec<PathBuf> {
    static SP: OnceLock<Vec<PathBuf>> = OnceLock::new();
    SP.get_or_init(|| {
        let mut venvs = Vec::new();
        if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
            venvs.push(PathBuf::from(v));
        }
        if let Ok(cwd) = std::env::current_dir() {
            venvs.push(cwd.join(".venv"));
        }
        if let Ok(exe) = std::env::current_exe() {
            venvs.extend(exe.ancestors().skip(1).take(4).map(|a| a.join(".venv")));
        }
        let mut out = Vec::new();
        for v in venvs {
            let Ok(rd) = std::fs::read_dir(v.join("lib")) else {
                continue;
            };
            for e in rd.filter_map(|e| e.ok()) {
                if e.file_name().to_string_lossy().starts_with("python") {
                    out.push(e.path().join("site-packages"));
                }
            }
        }
        if let Ok(o) = std::process::Command::new("python3")
            .args([
                "-c",
                "import site,sys; print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))",
            ])
            .stderr(std::process::Stdio::null())
            .output()
        {
            out.extend(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| PathBuf::from(l.trim())),
            );
        }
        dedup_existing(out)
    })
    .clone()
}

fn dedup_existing(dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let d = d.canonicalize().unwrap_or(d);
        if d.is_dir() && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_files_picks_the_library_not_look_alikes() {
        let dir = tempfile::tempdir().expect("tempdir");
        for f in [
            "libnvrtc.so.13",
            "libnvrtc.alt.so.13",
            "libnvrtc-builtins.so.13.0",
            "libnvrtc.so.12.4.99",
            "libcublasLt.so.12",
        ] {
            std::fs::write(dir.path().join(f), b"").expect("write");
        }
        let v = versioned_files(dir.path(), "libnvrtc");
        let names: Vec<String> = v
            .iter()
            .map(|(m, p)| {
                format!(
                    "{m}:{}",
                    p.file_name().unwrap_or_default().to_string_lossy()
                )
            })
            .collect();
        assert_eq!(names, ["13:libnvrtc.so.13", "12:libnvrtc.so.12.4.99"]);
        assert!(versioned_files(dir.path(), "libcublas").is_empty());
        assert_eq!(versioned_files(dir.path(), "libnvrtc-builtins").len(), 1);
    }

    #[test]
    fn guard_turns_panics_into_reasons() {
        let r: Result<(), String> = guard("x", || panic!("boom"));
        assert_eq!(r, Err("x: boom".to_string()));
    }
}
