//! What a client gets back: the [`Event`]s a server sends, and [`ClientError`], each failure
//! with a stable code.

use serde_json::Value;

use crate::protocol::DecodedResult as FuseResult;

/// Client-side failures, each with a stable [`ClientError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection or handshake failed (HTTP 401 and 503 included).
    #[error("connect: {0}")]
    Connect(String),
    /// The server answered with an error message.
    #[error("server error {code}: {message}")]
    Server {
        /// The protocol's stable code (`wrong_width`, `overloaded`, ...).
        code: String,
        /// Its text.
        message: String,
    },
    /// The connection is closed.
    #[error("connection closed ({code:?}): {reason}")]
    Closed {
        /// WebSocket close code, if the server sent one.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// The server said something this client does not understand, or a bad argument.
    #[error("protocol: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl ClientError {
    /// Stable machine code.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Connect(_) => "connect",
            ClientError::Server { code, .. } => code,
            ClientError::Closed { .. } => "closed",
            ClientError::Protocol(_) => "protocol",
            ClientError::Timeout(_) => "timeout",
        }
    }
}

/// Client result.
pub type ClientResult<T> = std::result::Result<T, ClientError>;

/// Something the server sent.
#[derive(Debug, Clone)]
pub enum Event {
    /// A fused sample.
    Result(FuseResult),
    /// An `error` message (`code`, `message`, and the raw JSON).
    Error {
        /// Stable code.
        code: String,
        /// Text.
        message: String,
        /// The whole message.
        raw: Value,
    },
    /// Any other control message (`ack`, `notice`, `pong`, `heartbeat`, `welcome`).
    Control(Value),
    /// The connection closed (last event).
    Closed {
        /// Close code, if any.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
}
