//! `fusion-engine fuse`: offline mode (docs/DESIGN.md section 3): a features file in, a results
//! file out, written atomically and not at all on error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use crate::backend::{self, Backend, BackendChoice, OpenOptions};
use crate::batch::Outputs;
use crate::error::Result;
use crate::tools::common::load_head;

/// Fuse a features file (one [B, d_m] tensor per modality, optional "mask") into a results
/// file ("fused" [B, D] and "weights" [B, M], F32).
#[derive(Debug, clap::Args)]
pub struct FuseArgs {
    /// Fusion head (.safetensors); the embedded default head when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Features file (.safetensors).
    #[arg(long)]
    input: PathBuf,
    /// Results file to write (.safetensors); not written on error.
    #[arg(long)]
    output: PathBuf,
    /// auto, cpu, wgpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendChoice,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl FuseArgs {
    /// Runs the command.
    pub fn run(self) -> Result<ExitCode> {
        let head = load_head(self.model)?;
        let batch = crate::io::read_input_file(&self.input, &head)?;
        let opts = OpenOptions {
            threads: self.threads,
            ..Default::default()
        };
        let mut be = backend::open_choice(self.backend, head.clone(), &opts)?;
        let mut out = Outputs::zeros(&head, batch.rows);
        let t = Instant::now();
        be.run(&batch.view(), out.as_mut())?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let bytes = crate::io::output_bytes(&head, batch.rows, &out)?;
        crate::io::write_atomic(&self.output, &bytes)?;
        eprintln!(
            "fused {} samples on {} ({}) in {ms:.2} ms -> {}",
            batch.rows,
            be.info().id(),
            be.info().name,
            self.output.display()
        );
        Ok(ExitCode::SUCCESS)
    }
}
