//! The CUDA kernels' logic without a GPU: tests/cuda_emulation/epilogue.cpp compiles
//! kernels/fusion_epilogue.cu as C++ with every CUDA thread an OS thread (barriers for
//! `__syncthreads`, `__syncwarp` and warp shuffles) and checks every epilogue variant against a
//! double-precision reference, NaN rule included. Needs a C++20 compiler (`g++`, or `CXX`);
//! skipped with the reason without one, unless FUSION_REQUIRE_CXX=1 (as in CI).

use std::path::Path;
use std::process::Command;

#[test]
fn epilogue_kernels_agree_with_the_reference_under_emulation() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = dir.path().join("epilogue");
    let compiled = Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-I"])
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
    let run = Command::new(&exe).output().expect("run the emulation");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("\n0 failed"),
        "{stdout}"
    );
    // Every variant ran: 10 shapes x (3 block-per-row + 1 warp-per-row).
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(" ok")).count(),
        40,
        "{stdout}"
    );
}
