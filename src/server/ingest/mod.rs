//! Ingest: from a validated produce message (or `samples` frame) to a batch on the engine, in
//! flow order:
//!
//! - [`queue`]: the bounded queue from the connection readers, and its row accounting.
//! - [`aligner`]: joins the modalities of each `(stream, key)` (docs/DESIGN.md section 4).
//! - [`waiting`]: what waits for a batch: an aligned sample, or a run of a `samples` frame.
//! - [`batcher`]: per-class waiting samples, `max_batch` / `max_batch_delay`, batch assembly.
//! - [`pressure`]: producer flow control (`ingest_backpressure` notices, PROTOCOL 5.1).
//! - [`pipeline`]: the one task that runs the aligner and the batcher.

pub(crate) mod aligner;
pub(crate) mod batcher;
pub(crate) mod keys;
pub(crate) mod pipeline;
pub(crate) mod pressure;
pub(crate) mod queue;
pub(crate) mod waiting;
