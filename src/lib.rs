//! fusion-engine: a GPU-native multi-modal fusion engine.
//!
//! Producers stream per-modality feature vectors; the engine joins the modalities of each sample,
//! batches them, runs a learned attention fusion head on a device, and returns fused vectors.
//! SPEC.md (shared) is the contract; this crate is organised in the order data flows through it:
//!
//! - [`error`]: the crate [`Error`] with a stable machine code per variant.
//! - [`tensor`]: element types and borrowed/owned views of little-endian feature matrices.
//! - [`model`]: the fusion head's parameters: safetensors loading, validation, the embedded head.
//! - [`batch`]: a batch of samples (inputs + presence mask) and the caller-provided outputs.
//! - [`backend`]: the device boundary ([`backend::Backend`], [`backend::AnyBackend`]), device
//!   discovery, and the CPU, wgpu and CUDA backends.
//! - [`engine`]: device workers on bounded queues, latency-aware routing, slow-device detection,
//!   retries and restarts (SPEC section 6).
//! - [`server`]: the WebSocket streaming server (aligner, batcher, prioritised backpressured
//!   fan-out); the protocol is docs/PROTOCOL.md. [`client`]: its Rust client.
//! - [`loadgen`]: end-to-end load scenarios over loopback WebSocket with a report and a plot;
//!   [`demo`]: a ten-second live view of the server under load.
//! - [`reference`]: the float64 reference every backend is checked against.
//! - [`io`]: offline-mode files (`fuse`): reading features, writing results atomically.
//! - [`selftest`]: agreement of every available backend with the reference on random inputs.
//! - [`bench`]: kernel timing shared by the `bench` command and the criterion benches.

pub mod backend;
pub mod batch;
pub mod client;
pub mod engine;
pub mod error;
pub mod io;
pub mod model;
pub mod protocol;
pub mod reference;
pub mod selftest;
pub mod server;
pub mod tensor;
#[cfg(feature = "tools")]
pub mod tools;

pub use backend::{AnyBackend, Backend, BackendChoice, BackendKind, DeviceInfo};
pub use batch::{Batch, BatchRef, Outputs, OutputsMut};
pub use error::{Error, Result};
pub use model::FusionHead;
pub use tensor::DType;
