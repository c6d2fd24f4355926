//! `fusion-engine selftest`: every available backend against the float64 reference on fresh
//! random inputs (the cases of docs/DESIGN.md section 2.6); `--compile-only` compiles the CUDA
//! kernels with NVRTC without a GPU.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::backend::{self, BackendChoice, BackendKind, OpenOptions};
use crate::error::{Error, Result};
use crate::model::FusionHead;
use crate::selftest::{run_case, standard_cases, CaseResult};
use crate::tools::common::print_json;

/// Check every available backend against the float64 reference on fresh random inputs.
#[derive(Debug, clap::Args)]
pub struct SelftestArgs {
    /// auto (every available backend), cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// Seed (default: fresh from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// JSON lines instead of text.
    #[arg(long)]
    json: bool,
    /// CUDA only: compile every kernel with NVRTC for compute_90 (no GPU needed) and exit.
    #[arg(long)]
    compile_only: bool,
    /// Extra CUDA include folder for --compile-only (else CUDA_HOME, CUDA_PATH, pip wheels).
    #[arg(long, requires = "compile_only")]
    include: Option<PathBuf>,
}

/// Cases run and failed.
#[derive(Default)]
struct Tally {
    ran: usize,
    failed: usize,
}

impl SelftestArgs {
    /// Runs the command.
    pub fn run(self) -> Result<ExitCode> {
        if self.compile_only {
            return compile_check(self.backend, self.include);
        }
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let kinds: Vec<BackendKind> = match self.backend {
            BackendChoice::Auto => BackendKind::ALL.to_vec(),
            BackendChoice::Kind(k) => vec![k],
        };
        if !self.json {
            println!("selftest seed {seed}");
        }
        let mut tally = Tally::default();
        for kind in kinds {
            self.run_kind(kind, seed, &mut tally)?;
        }
        if !self.json {
            println!("{} cases run, {} failed", tally.ran, tally.failed);
        }
        Ok(if tally.failed == 0 && tally.ran > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// Every case on every device of `kind`; an unavailable backend fails only when it was
    /// asked for by name.
    fn run_kind(&self, kind: BackendKind, seed: u64, tally: &mut Tally) -> Result<()> {
        let placeholder = Arc::new(FusionHead::random(&[("x".into(), 4)], 4, 1e-5, 0));
        for entry in backend::discover_kind(kind) {
            let Some(dev) = entry.device else {
                let reason = entry.unavailable.unwrap_or_default();
                if self.backend == BackendChoice::Kind(kind) {
                    eprintln!("error: backend {kind} unavailable: {reason}");
                    tally.failed += 1;
                } else if !self.json {
                    println!("{kind:5} skipped: {reason}");
                }
                continue;
            };
            let mut be = backend::open(
                kind,
                dev.index,
                placeholder.clone(),
                &OpenOptions::default(),
            )?;
            for (i, case) in standard_cases().iter().enumerate() {
                let r = run_case(&mut be, case, seed.wrapping_add(i as u64));
                tally.ran += 1;
                if !r.pass {
                    tally.failed += 1;
                }
                self.report(&r)?;
            }
        }
        Ok(())
    }

    fn report(&self, r: &CaseResult) -> Result<()> {
        if self.json {
            return print_json(r);
        }
        println!(
            "{:8} {:20} fused {:9.2e}  weights {:9.2e}  tol {:.0e}  {}{}",
            r.device,
            r.case,
            r.fused_err,
            r.weights_err,
            r.tol,
            if r.pass { "ok" } else { "FAIL" },
            r.error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        Ok(())
    }
}

/// `selftest --compile-only`: NVRTC compile check of the CUDA kernels (no GPU needed).
fn compile_check(choice: BackendChoice, include: Option<PathBuf>) -> Result<ExitCode> {
    if !matches!(
        choice,
        BackendChoice::Auto | BackendChoice::Kind(BackendKind::Cuda)
    ) {
        return Err(Error::Config(
            "--compile-only checks the cuda kernels: use --backend cuda".into(),
        ));
    }
    #[cfg(feature = "cuda")]
    {
        let report = crate::backend::cuda::compile_check(include.as_deref())?;
        println!("{report}");
        Ok(ExitCode::SUCCESS)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = include;
        Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: "not compiled in (build with the `cuda` cargo feature)".into(),
        })
    }
}
