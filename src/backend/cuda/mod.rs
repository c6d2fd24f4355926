//! CUDA backend (placeholder until the CUDA issue lands): reports itself unavailable.

use std::sync::Arc;

use crate::backend::{Backend, BackendKind, DeviceEntry, DeviceInfo, OpenOptions};
use crate::batch::{BatchRef, OutputsMut};
use crate::error::{Error, Result};
use crate::model::FusionHead;

/// Lists GPUs.
pub fn discover() -> Vec<DeviceEntry> {
    vec![DeviceEntry {
        kind: BackendKind::Cuda,
        device: None,
        unavailable: Some("cuda backend not implemented yet".into()),
    }]
}

/// CUDA device.
pub struct CudaBackend {
    info: DeviceInfo,
    head: Option<Arc<FusionHead>>,
}

impl CudaBackend {
    /// Opens GPU `index`.
    pub fn new(_index: usize, _opts: &OpenOptions) -> Result<CudaBackend> {
        Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: "not implemented yet".into(),
        })
    }
}

impl Backend for CudaBackend {
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
            backend: "cuda".into(),
            reason: "not implemented yet".into(),
        })
    }
}
