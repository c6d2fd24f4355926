//! Scale-out on NATS JetStream, first slice (docs/DESIGN.md section 11; issue 20). One line per
//! room, in the order a batch flows:
//!
//! - [`fingerprint`]: the head's 64-bit fingerprint (weights + modality order) every batch
//!   carries; a worker with another head refuses the batch.
//! - [`wire`]: the batch and result message formats (compact binary, checked lengths).
//! - [`streams`]: the JetStream layout: the work-queue stream of batches (one subject and one
//!   shared durable pull consumer per class), the results stream and its duplicate window.
//! - [`gateway`]: `serve --nats`: the server's batcher publishes batches here instead of to its
//!   local engine and awaits each batch's results from NATS, delivering each batch id once.
//! - [`inbox`]: the gateway's results, read from the results stream (an ordered consumer that
//!   survives NATS restarts), each batch id delivered once.
//! - [`metrics`]: the gateway's and workers' metrics names; a worker's `/metrics` listener.
//! - [`worker`]: `fusion-engine worker`: pulls batches (CRITICAL first), runs them on a local
//!   engine, publishes the results, acks after the results publish is acknowledged.
//!
//! Children name each other only downwards (`gateway`/`worker` -> `inbox`, `streams`,
//! `wire`, `fingerprint`, `metrics`); this file re-exports nothing (scripts/import-cycles.sh).

pub mod fingerprint;
pub mod gateway;
pub mod inbox;
pub mod metrics;
pub mod streams;
pub mod wire;
pub mod worker;
