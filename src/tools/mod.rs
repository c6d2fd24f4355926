//! The command-line tools around the library, behind the default-on `tools` cargo feature
//! (an embedder builds without them: no `plotters`, no `indicatif`). Each command owns its
//! `clap` arguments and its report; the binary only dispatches. In the order a user meets them:
//!
//! - [`commands`]: `fuse`, `devices`, `selftest` (`serve`'s arguments are the server's own
//!   [`crate::server::serve::ServeOptions`]).
//! - [`bench`]: kernel timing (the `bench` command and the criterion benches).
//! - [`engine_bench`]: the engine under synthetic load, and its overhead against the kernel.
//! - [`loadgen`]: end-to-end load scenarios over WebSocket with a report and a plot.
//! - [`in_process`]: the server in this process for `loadgen` and `demo`.
//! - [`demo`]: ten seconds of the server under load with a live view.
//! - [`steal`]: host CPU steal and process CPU time, for the reports.
//! - [`common`]: what the commands share (head loading, runtime, JSON output).

pub mod bench;
pub mod commands;
pub mod common;
pub mod demo;
pub mod engine_bench;
pub mod in_process;
pub mod loadgen;
pub mod steal;
