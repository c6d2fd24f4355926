//! Fan-out: from a finished batch to every subscriber's socket, in flow order:
//!
//! - [`deliver`]: a batch's results of each stream, as one unit, get their stream seqs and go to
//!   the replay buffer and every subscriber (docs/DESIGN.md section 5.7); errors go to the
//!   producers.
//! - [`stored`]: a result encoded once, shared by the replay buffer and every queue.
//! - [`chunks`]: the pooled memory a run of encoded results shares.
//! - [`replay`]: per-stream seqs and the bounded replay buffer (PROTOCOL 7.4).
//! - [`remote`]: results from other gateways and from this gateway's earlier process
//!   (`serve --nats`), through [`deliver`]'s path.
//! - [`registry`]: which connections subscribe to which stream; device notices.
//! - [`outbound`]: a connection's per-class bounded send queues, drops, resume, conflation.
//! - [`writer`]: the one task per connection that writes its queues to the socket.
//! - [`bench`]: a fixed fan-out for benches/fanout.rs and tests/fanout_alloc.rs.

pub(crate) mod bench;
pub(crate) mod chunks;
pub(crate) mod deliver;
pub(crate) mod outbound;
pub(crate) mod registry;
pub(crate) mod remote;
pub(crate) mod replay;
pub(crate) mod stored;
pub(crate) mod writer;

#[cfg(test)]
mod tests;
