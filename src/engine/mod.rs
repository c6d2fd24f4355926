//! The engine core (docs/DESIGN.md section 6): device workers, bounded queues, latency-aware routing,
//! slow-device detection, retries.
//!
//! ```text
//! submit ──> admission (max_pending, else Error::Overloaded at once)
//!        ──> pending queue (per priority class)
//!        ──> router: least expected completion time among HEALTHY devices,
//!            probes to SLOW ones, nothing to FAILED ones
//!        ──> per-device bounded crossbeam queue ──> worker thread (owns the backend)
//!        ──> completion ──> Ticket (a future, or a blocking wait) resolves once
//! ```
//!
//! In flow order:
//! - [`config`]: [`EngineConfig`] (every default in one place) and the device list syntax
//!   ([`DeviceSpec`]: `cpu,cpu:threads=1:delay=50ms,cuda:0`).
//! - `handle.rs`: [`Engine`], the handle callers use (start, submit, stats, faults, shutdown).
//! - `core.rs`: the shared state behind one lock (`RoutingState`, [`DeviceCounters`]),
//!   admission and dispatch.
//! - `router.rs`: the dispatch plan (least expected completion time).
//! - [`health`]: HEALTHY / SLOW / FAILED and the latency average behind them.
//! - `job.rs`: a submitted batch, its [`Priority`] and its [`Ticket`].
//! - `buffers.rs`: batch input buffers recycled from dropped batches ([`Engine::batch_buffer`]),
//!   page-locked in place when a CUDA device is open (docs/DESIGN.md section 6.7).
//! - `worker.rs`: the device thread (`worker_loop`); it owns `RunResult`.
//! - `lifecycle.rs`: completion, failure, retry, restart, timeouts, shutdown.
//! - [`fault`]: fault injection (latency, jitter, failures, hangs), changeable at run time.
//! - [`metrics`]: the metric names.
//! - [`bench`]: the engine under synthetic load (`fusion-engine bench --devices`).
//!
//! In-flight accounting: a batch is *in flight* on a device from the moment the router hands it
//! to the device's worker queue until the worker completes it, so `in_flight` = queued at the
//! worker + running, and the router never lets it exceed `max_in_flight` (4). Batches beyond
//! that wait in the engine's pending queue, bounded by `max_pending` (default `queue_capacity`
//! = 100 batches per device), and are bound to a device only when one has room. This late
//! binding means a device that fails or turns slow strands at most 4 batches, and routing
//! uses fresh latency estimates. Each worker queue is a bounded crossbeam channel of
//! `queue_capacity` slots, which the in-flight bound keeps from ever filling.

pub(crate) mod buffers;
pub mod config;
mod core;
pub mod fault;
mod handle;
pub mod health;
mod job;
mod lifecycle;
pub mod metrics;
pub(crate) mod out_pool;
pub(crate) mod page_locks;
mod router;
mod worker;

pub(crate) use buffers::{BufferPool, PooledBlocks};
pub use config::{DeviceSpec, EngineConfig, FaultSpec};
pub use core::DeviceCounters;
pub use handle::{DeviceStats, Engine, EngineStats};
pub use health::DeviceState;
pub use job::{BatchResult, Priority, Ticket};
