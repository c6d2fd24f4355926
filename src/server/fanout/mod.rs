//! Fan-out: from a finished batch to every subscriber's socket, in flow order:
//!
//! - [`deliver`]: each result gets its stream seq and goes to the replay buffer and every
//!   subscriber; errors go to the producers.
//! - [`stored`]: a result as kept for replay and queued for a subscriber.
//! - [`replay`]: per-stream seqs and the bounded replay buffer (PROTOCOL 7.4).
//! - [`remote`]: results from other gateways and from this gateway's earlier process
//!   (`serve --nats`), through [`deliver`]'s path.
//! - [`registry`]: which connections subscribe to which stream; device notices.
//! - [`outbound`]: a connection's per-class bounded send queues, drops, resume, conflation.
//! - [`writer`]: the one task per connection that writes its queues to the socket.

pub(crate) mod deliver;
pub(crate) mod outbound;
pub(crate) mod registry;
pub(crate) mod remote;
pub(crate) mod replay;
pub(crate) mod stored;
pub(crate) mod writer;
