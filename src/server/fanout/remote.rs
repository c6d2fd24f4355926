//! Results that did not come from this server's own batches: other gateways' results of the
//! streams this gateway's subscribers follow, and the results of batches this gateway id's
//! earlier process published (docs/DESIGN.md section 11). They take the path of a local result
//! ([`Replay::deliver_stream`]: this gateway's stream seqs, its replay buffer, every
//! subscriber); stream seqs are this gateway's own, as for any result it fans out.
//!
//! [`Replay::deliver_stream`]: super::replay::Replay::deliver_stream

use std::sync::{Arc, Weak};

use crate::cluster::share::Sink;
use crate::cluster::wire_rows::StreamRows;
use crate::protocol::ResultView;
use crate::server::shared::Shared;

/// The server's fan-out as the NATS gateway's [`Sink`]; holds the server weakly (the server
/// holds the gateway).
pub(crate) struct RemoteSink(pub Weak<Shared>);

impl Sink for RemoteSink {
    fn deliver(&self, rows: &StreamRows) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let (d, m) = (shared.head.dim, shared.head.num_modalities());
        let stream: Arc<str> = Arc::from(rows.stream.as_str());
        // Checked at decode against the message's own D and M; here against this head's.
        let views: Vec<ResultView<'_>> = rows
            .rows
            .iter()
            .filter(|r| r.fused.len() == d && r.weights.len() == m && r.mask.len() == m)
            .map(|r| ResultView {
                stream: &stream,
                key: &r.key,
                priority: r.priority,
                mask: &r.mask,
                fused: &r.fused,
                weights: &r.weights,
                stream_seq: 0,
                replayed: false,
            })
            .collect();
        // One unit, as a local batch's results of a stream (docs/DESIGN.md section 5.7).
        shared
            .replay
            .deliver_stream(&shared.registry, &stream, &views);
    }

    fn wants(&self, stream: &str) -> bool {
        self.0.upgrade().is_some_and(|shared| {
            shared.registry.subscribers(stream).is_some() || shared.replay.knows(stream)
        })
    }
}
