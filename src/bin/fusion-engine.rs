//! The `fusion-engine` command line: `serve`, `fuse`, `bench`, `devices`, `selftest`,
//! `loadgen`, `demo`, `worker`. Dispatch only: each command owns its arguments and its report
//! (`fusion_engine::server::serve`, `fusion_engine::tools`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fusion_engine::cluster::worker::WorkerArgs;
use fusion_engine::server::serve::{serve_until_signal, ServeOptions};
use fusion_engine::tools::bench::cli::BenchArgs;
use fusion_engine::tools::commands::{
    devices::DevicesArgs, fuse::FuseArgs, selftest::SelftestArgs,
};
use fusion_engine::tools::demo::DemoArgs;
use fusion_engine::tools::loadgen::cli::LoadgenArgs;

#[derive(Parser)]
#[command(
    name = "fusion-engine",
    version,
    about = "GPU-native multi-modal fusion engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the head over WebSocket (docs/PROTOCOL.md) until Ctrl-C / SIGTERM. With no flags:
    /// the embedded head on the best GPU found, else the CPU, on 127.0.0.1:7878.
    Serve(ServeOptions),
    /// Fuse a features file (one [B, d_m] tensor per modality, optional "mask") into a results
    /// file ("fused" [B, D] and "weights" [B, M], F32).
    Fuse(FuseArgs),
    /// Time the head on a backend; one line per (batch, dtype) run.
    Bench(BenchArgs),
    /// List devices of every backend and why any is unavailable.
    Devices(DevicesArgs),
    /// End-to-end load over WebSocket: a named scenario against a server (in-process when
    /// --url is omitted); reports samples/s, latency per class, drops vs gaps, closes, peak RSS.
    Loadgen(LoadgenArgs),
    /// Ten seconds of the server under synthetic load, with a live view of streams, devices,
    /// queues, drops and latency (periodic lines when stdout is not a terminal).
    Demo(DemoArgs),
    /// A device host of the NATS JetStream scale-out: pull batches, run them, publish the
    /// results (docs/DESIGN.md section 11; the gateway is `serve --nats`).
    Worker(WorkerArgs),
    /// Check every available backend against the float64 reference on fresh random inputs.
    Selftest(SelftestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `demo` draws log events in its live view and installs its own subscriber.
    if !matches!(cli.cmd, Cmd::Demo(_)) {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    let res = match cli.cmd {
        Cmd::Serve(o) => serve_until_signal(o).map(|()| ExitCode::SUCCESS),
        Cmd::Fuse(a) => a.run(),
        Cmd::Bench(a) => a.run(),
        Cmd::Devices(a) => a.run(),
        Cmd::Loadgen(a) => a.run(),
        Cmd::Demo(a) => a.run(),
        Cmd::Selftest(a) => a.run(),
        Cmd::Worker(a) => a.run(),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
