//! The server in this process for the tools that run one (`loadgen` without `--url`, `demo`):
//! started on 127.0.0.1:0 with its metrics, the embedded head and a device list. The load
//! generator itself only speaks the protocol, so it never imports the server; this room joins
//! the two.

use std::sync::Arc;

use crate::engine::DeviceSpec;
use crate::model::FusionHead;
use crate::server::{start_with_head, Server, ServerConfig};
use crate::tools::loadgen::{drive, plot, prometheus, LoadgenError, Options, Plan, Report};

/// Starts a server in-process on 127.0.0.1:0 (metrics too) with the embedded head on `devices`;
/// returns it with its WebSocket URL and metrics address.
pub async fn start_server(devices: &str) -> Result<(Server, String, Option<String>), LoadgenError> {
    let mut cfg = ServerConfig {
        listen: ([127, 0, 0, 1], 0).into(),
        metrics: Some(([127, 0, 0, 1], 0).into()),
        ..ServerConfig::default()
    };
    cfg.engine.devices = DeviceSpec::parse_list(devices)?;
    let s = start_with_head(cfg, Arc::new(FusionHead::embedded()), prometheus()).await?;
    let m = s.metrics_addr().map(|a| a.to_string());
    let u = format!("ws://{}/", s.local_addr());
    Ok((s, u, m))
}

/// Runs `plan` against the server at `o.url`, or against one started in-process with the
/// plan's devices when there is none, and writes the plot when asked.
pub async fn run_plan(plan: Plan, o: &Options) -> Result<Report, LoadgenError> {
    let mut server = None;
    let (url, metrics) = match &o.url {
        Some(u) => (u.clone(), o.metrics.clone()),
        None => {
            let (s, u, m) = start_server(&plan.devices).await?;
            server = Some(s);
            (u, m)
        }
    };
    let r = drive(&plan, o, &url, metrics, None).await;
    if let Some(s) = server {
        s.shutdown().await;
    }
    let r = r?;
    if let Some(p) = &o.plot {
        plot::write(&r, p)?;
    }
    Ok(r)
}
