//! fusion-engine: a GPU-native multi-modal fusion engine.
//!
//! Producers stream per-modality feature vectors; the engine joins the modalities of each sample,
//! batches them, runs a learned attention fusion head on a device, and returns fused vectors.
//! docs/DESIGN.md is what the code relies on (the head's math, streaming, priorities, routing,
//! limits); docs/PROTOCOL.md is the wire format. One line per room, in the order data flows:
//!
//! - [`error`]: the crate [`Error`] with a stable machine code per variant.
//! - [`tensor`]: element types, views of little-endian feature matrices, safetensors writing.
//! - [`model`]: the fusion head's parameters: safetensors loading, validation, the embedded head.
//! - [`batch`]: a batch of samples (inputs + presence mask) and the caller-provided outputs.
//! - [`reference`]: the float64 reference every backend is checked against.
//! - [`io`]: offline-mode files (`fuse`): reading features, writing results atomically.
//! - [`backend`]: the device boundary ([`backend::Backend`], [`backend::AnyBackend`]), device
//!   discovery, and the CPU, wgpu and CUDA backends.
//! - [`selftest`]: agreement of every available backend with the reference on random inputs.
//! - [`engine`]: device workers on bounded queues, latency-aware routing, slow-device detection,
//!   retries and restarts (docs/DESIGN.md section 6).
//! - [`protocol`]: the wire format (frames, control messages, notices, error codes), shared by
//!   the server, the client, the load generator and the fuzz targets.
//! - [`server`]: the WebSocket streaming server: listener and connections, ingest (aligner,
//!   batcher), fan-out (replay, per-class queues, writers).
//! - [`client`]: the Rust client of the protocol.
//! - [`cluster`]: scale-out on NATS JetStream (first slice): `serve --nats` as a gateway,
//!   `fusion-engine worker` as a device host (docs/DESIGN.md section 11).
//! - `tools` (cargo feature `tools`, on by default): the commands' arguments and reports,
//!   `loadgen`, `demo`, the bench drivers. Embedders build without it.

pub mod backend;
pub mod batch;
pub mod client;
pub mod cluster;
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
