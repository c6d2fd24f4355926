//! wgpu backend (placeholder until the wgpu issue lands): reports itself unavailable.

use std::sync::Arc;

use crate::backend::{Backend, BackendKind, DeviceEntry, DeviceInfo, OpenOptions};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// Lists adapters.
pub fn discover() -> Vec<DeviceEntry> {
    vec![DeviceEntry {
        kind: BackendKind::Wgpu,
        device: None,
        unavailable: Some("wgpu backend not implemented yet".into()),
    }]
}

/// wgpu device.
pub struct WgpuBackend {
    info: DeviceInfo,
    head: Option<Arc<FusionHead>>,
}

impl WgpuBackend {
    /// Opens adapter `index`.
    pub fn new(_index: usize, _opts: &OpenOptions) -> Result<WgpuBackend> {
        Err(Error::BackendUnavailable {
            backend: "wgpu".into(),
            reason: "not implemented yet".into(),
        })
    }
}

impl Backend for WgpuBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn upload(&mut self, head: Arc<FusionHead>) -> Result<()> {
        self.head = Some(head);
        Ok(())
    }
    fn head(&self) -> Option<&Arc<FusionHead>> {
        self.head.as_ref()
    }
    fn run(&mut self, _batch: &BatchRef<'_>, _out: OutputsMut<'_>) -> Result<()> {
        Err(Error::BackendUnavailable {
            backend: "wgpu".into(),
            reason: "not implemented yet".into(),
        })
    }
}
