//! Shared set-up of the wgpu test binaries (`wgpu_backend.rs`, `wgpu_kernels.rs`): the first
//! usable adapter (skipping with a printed reason, or failing under `FUSION_REQUIRE_WGPU=1`)
//! and one batch run through it.
#![allow(dead_code)]

use std::sync::Arc;

use fusion_engine::backend::wgpu::WgpuBackend;
use fusion_engine::backend::{self, Backend, BackendKind, OpenOptions};
use fusion_engine::batch::Outputs;
use fusion_engine::model::FusionHead;

/// The first usable adapter, or None (printing why) when there is none.
pub fn open_raw() -> Option<WgpuBackend> {
    let entries = backend::discover_kind(BackendKind::Wgpu);
    let found = entries.iter().find_map(|e| e.device.as_ref());
    let res = match found {
        Some(d) => WgpuBackend::new(d.index, &OpenOptions::default()),
        None => Err(fusion_engine::error::Error::BackendUnavailable {
            backend: "wgpu".into(),
            reason: entries
                .iter()
                .filter_map(|e| e.unavailable.clone())
                .collect::<Vec<_>>()
                .join("; "),
        }),
    };
    match res {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("FUSION_REQUIRE_WGPU").as_deref() == Ok("1") {
                panic!("FUSION_REQUIRE_WGPU=1 but the wgpu backend cannot open: {e}");
            }
            eprintln!("skipping wgpu test: {e}");
            None
        }
    }
}

/// Runs `batch` through `b` and returns the outputs.
pub fn run(b: &mut WgpuBackend, head: &Arc<FusionHead>, batch: &fusion_engine::Batch) -> Outputs {
    b.upload(head.clone()).expect("upload");
    let mut out = Outputs::zeros(head, batch.rows);
    b.run(&batch.view(), out.as_mut()).expect("run");
    out
}
