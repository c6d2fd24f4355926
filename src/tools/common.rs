//! What the commands share: loading the head (saying when the embedded one is used), the
//! async runtime, positive durations from seconds, and report output (JSON lines, the host
//! steal note).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::model::FusionHead;

/// The head at `model`, or the embedded default head (and a note on stderr saying so).
pub fn load_head(model: Option<PathBuf>) -> Result<Arc<FusionHead>> {
    let head = FusionHead::load_or_embedded(model.as_deref())?;
    if model.is_none() {
        eprintln!(
            "note: no --model given: using the embedded default head ({}, D={})",
            head.modalities
                .iter()
                .map(|m| format!("{}={}", m.name, m.width))
                .collect::<Vec<_>>()
                .join(", "),
            head.dim
        );
    }
    Ok(Arc::new(head))
}

/// A positive duration of `s` seconds (a command-line value).
pub fn seconds(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Error::Config(format!("a positive number of seconds, got {s}")))
}

/// A multi-threaded tokio runtime for a command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    crate::server::serve::runtime("fusion-tool")
}

/// `  (host steal 12.3%)` when the hypervisor took a visible share of the CPU.
pub fn steal_note(pct: Option<f64>) -> String {
    match pct {
        Some(p) if p >= 0.5 => format!("  (host steal {p:.1}%)"),
        _ => String::new(),
    }
}

/// Prints one value as a JSON line on stdout.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let line = serde_json::to_string(v).map_err(|e| Error::Runtime(format!("JSON output: {e}")))?;
    println!("{line}");
    Ok(())
}
