//! `fusion-engine devices`: every backend's devices, and why any is unavailable.

use std::process::ExitCode;

use crate::backend;
use crate::error::{Error, Result};

/// List devices of every backend and why any is unavailable.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl DevicesArgs {
    /// Runs the command.
    pub fn run(self) -> Result<ExitCode> {
        let entries = backend::discover();
        if self.json {
            let text = serde_json::to_string_pretty(&entries)
                .map_err(|e| Error::Runtime(format!("JSON output: {e}")))?;
            println!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
        for e in &entries {
            match (&e.device, &e.unavailable) {
                (Some(d), _) => println!("{:8} {}  {}", d.id(), d.name, d.detail),
                (None, Some(r)) => println!("{:8} unavailable: {r}", e.kind),
                (None, None) => {}
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
