//! Scale-out on NATS JetStream, first slice (docs/DESIGN.md section 11; issue 20). One line per
//! room, in the order a batch flows:
//!
//! - [`fingerprint`]: the head's 64-bit fingerprint (weights + modality order) every batch
//!   carries; a worker with another head refuses the batch.
//! - [`identity`]: a gateway's stable id (`--gateway-id`) and its process's incarnation.
//! - [`wire`]: the batch and result message formats (compact binary, checked lengths).
//! - [`wire_rows`]: one batch's results for one stream, as gateways share them.
//! - [`streams`]: the JetStream layout: the work-queue stream of batches (one subject and one
//!   shared durable pull consumer per class), the results stream and its duplicate window (one
//!   durable consumer per gateway id), the stream of results shared between gateways.
//! - [`gateway`]: `serve --nats`: the server's batcher publishes batches here instead of to its
//!   local engine and awaits each batch's results from NATS, delivering each batch id once.
//! - [`inbox`]: the gateway's results, read from the results stream (the id's durable
//!   consumer: survives NATS and gateway restarts), each batch id delivered once; an earlier
//!   process's batches fanned out to their streams' subscribers.
//! - [`share`]: each batch's results shared per stream with the other gateways, and the streams
//!   this gateway's subscribers follow read from them.
//! - [`metrics`]: the gateway's and workers' metrics names; a worker's `/metrics` listener.
//! - [`worker`]: `fusion-engine worker`: pulls batches (CRITICAL first), runs them on a local
//!   engine, publishes the results, acks after the results publish is acknowledged.
//!
//! Children name each other only downwards (`gateway`/`worker` -> `inbox` -> `share` ->
//! `streams`, `wire_rows` -> `wire`, `identity`, `fingerprint`, `metrics`); this file re-exports
//! nothing (scripts/import-cycles.sh).

pub mod fingerprint;
pub mod gateway;
pub mod identity;
pub mod inbox;
pub mod metrics;
pub mod share;
pub mod streams;
pub mod wire;
pub mod wire_rows;
pub mod worker;
