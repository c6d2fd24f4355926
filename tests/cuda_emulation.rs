//! The CUDA kernels' logic without a GPU: tests/cuda_emulation/epilogue.cpp compiles
//! kernels/fusion_epilogue.cu as C++ with every CUDA thread an OS thread (barriers for
//! `__syncthreads`, `__syncwarp` and warp shuffles) and checks every epilogue variant
//! (block-per-row; warp-per-row one element a load, `warp`, and 16 bytes a load, `vec`), for
//! each dtype of the projections `h` (f32, f16, bf16), against a double-precision reference, NaN
//! rule included; then the whole head with the GEMM's rounding of `h` to f16/bf16 emulated, on
//! fresh random inputs (seed printed; `FUSION_EMU_SEED` repeats one), within docs/DESIGN.md section
//! 2.4's 1e-2, and `h` at the top of f16's range (overflow: that row's weights NaN). Needs a
//! C++20 compiler (`g++`, or `CXX`); skipped with the reason without one, unless
//! FUSION_REQUIRE_CXX=1 (as in CI).

use std::path::Path;
use std::process::Command;

#[test]
fn epilogue_kernels_agree_with_the_reference_under_emulation() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join("epilogue");
    let compiled = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-fno-strict-aliasing",
            "-pthread",
            "-I",
        ])
        .arg(root.join("kernels"))
        .arg("-o")
        .arg(&exe)
        .arg(root.join("tests/cuda_emulation/epilogue.cpp"))
        .output();
    let compiled = match compiled {
        Ok(o) => o,
        Err(e) => {
            assert!(
                std::env::var("FUSION_REQUIRE_CXX").as_deref() != Ok("1"),
                "FUSION_REQUIRE_CXX=1 but {cxx} cannot run: {e}"
            );
            eprintln!("skipping: no C++ compiler ({cxx}: {e})");
            return;
        }
    };
    assert!(
        compiled.status.success(),
        "{cxx} failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let seed: u32 = match std::env::var("FUSION_EMU_SEED") {
        Ok(v) => v.trim().parse().expect("FUSION_EMU_SEED is a u32"),
        Err(_) => rand::random(),
    };
    eprintln!("emulation seed {seed} (FUSION_EMU_SEED={seed} repeats this run)");
    let run = Command::new(&exe)
        .arg(seed.to_string())
        .output()
        .expect("run the emulation");
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(
        run.status.success() && stdout.contains("\n0 failed"),
        "seed {seed}:\n{stdout}"
    );
    let ok = |prefix: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with(prefix) && l.ends_with(" ok"))
            .count()
    };
    // Every variant ran: 10 shapes x (3 block-per-row + 1 warp-per-row) on f32 h, plus the
    // 16-byte-load `vec` one on the 8 whose D is a multiple of 4; 4 shapes that reach every
    // warp-per-row size (D = 33, 200, 512, 1024) on f16 and bf16 h, plus `vec` on the 3 whose D
    // is a multiple of 8.
    assert_eq!(ok("h=f32 "), 48, "{stdout}");
    assert_eq!(ok("h=f16 "), 19, "{stdout}");
    assert_eq!(ok("h=bf16 "), 19, "{stdout}");
    let warp = [4, 8, 16, 32].map(|pl| format!(" warp{pl} "));
    let vec = [8, 16, 32].map(|pl| format!(" vec{pl} "));
    for name in warp.iter().chain(&vec) {
        for t in ["f32", "f16", "bf16"] {
            assert!(
                stdout.lines().any(|l| l.starts_with(&format!("h={t:<4}"))
                    && l.contains(name.as_str())
                    && l.ends_with(" ok")),
                "no passing {name} line for h={t}:\n{stdout}"
            );
        }
    }
    assert_eq!(ok("half conversions"), 1, "{stdout}");
    // Whole head: 2 shapes x {f16, bf16} x {f32, half weights} x {block, warp}, and `vec` on
    // the shape whose D (512) it fits.
    assert_eq!(ok("whole head "), 20, "{stdout}");
    // f16 near its maximum, f16 overflow (Inf and a saturated 65504), bf16 max/Inf; all three
    // kinds.
    assert_eq!(ok("edge "), 9, "{stdout}");
    assert_eq!(stdout.lines().filter(|l| l.ends_with(" ok")).count(), 116);
}
