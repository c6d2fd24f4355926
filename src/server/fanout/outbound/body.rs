//! What a queued item sends: a message made for one connection, or a binary result encoded
//! once and shared by every queue that holds it (docs/DESIGN.md section 5.7).

use std::fmt;

use tokio_tungstenite::tungstenite::Message;

use crate::server::fanout::chunks::SharedFrame;

/// What a queued item sends.
#[derive(Debug)]
pub(crate) enum Body {
    /// A message made for this connection (CONTROL, JSON results, version 1 replays).
    Message(Message),
    /// A binary result (PROTOCOL 4.2) encoded once with seq 0 and shared by every queue that
    /// holds it: the writer writes the item's seq (and, `replayed`, the version 2 replayed
    /// flag) into the copy it sends, or into its record of a `results` frame (4.5).
    Shared { frame: SharedFrame, replayed: bool },
}

impl Body {
    /// The bytes it sends (a `Shared` result: exactly its encoding's length).
    pub fn len(&self) -> usize {
        match self {
            Body::Message(m) => m.len(),
            Body::Shared { frame, .. } => frame.len(),
        }
    }
}

/// For logs and tests: a message as tungstenite shows it; a shared result as its length.
impl fmt::Display for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Message(m) => m.fmt(f),
            Body::Shared { frame, .. } => write!(f, "Shared result<length={}>", frame.len()),
        }
    }
}
