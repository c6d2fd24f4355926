//! The protocol's stable error codes (docs/PROTOCOL.md section 6) and the error type every
//! decoder returns.

/// Stable error codes of the protocol (section 6 of docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// Undecodable frame or message.
    Malformed,
    /// Protocol version other than 1.
    UnsupportedVersion,
    /// Unknown message type or binary kind.
    UnknownType,
    /// The head has no such modality.
    UnknownModality,
    /// Wrong element count.
    WrongWidth,
    /// Unknown dtype code.
    BadDtype,
    /// Unknown priority.
    BadPriority,
    /// NaN or Inf in the payload.
    NonFinite,
    /// Empty or too long stream or key.
    InvalidName,
    /// Unsubscribe from a stream not subscribed.
    UnknownStream,
    /// Too many distinct streams on one connection.
    TooManyStreams,
    /// The modality already arrived for the open sample.
    DuplicateModality,
    /// Align timeout with fewer than `min_modalities`.
    IncompleteSample,
    /// A bounded queue is full; retry later.
    Overloaded,
    /// The batch failed on the devices.
    DeviceError,
    /// The batch timed out in the engine.
    Timeout,
    /// The server is shutting down.
    Shutdown,
    /// Frame over `max_frame_bytes`.
    FrameTooLarge,
    /// A server bug.
    Internal,
}

impl Code {
    /// The stable machine tag.
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::Malformed => "malformed",
            Code::UnsupportedVersion => "unsupported_version",
            Code::UnknownType => "unknown_type",
            Code::UnknownModality => "unknown_modality",
            Code::WrongWidth => "wrong_width",
            Code::BadDtype => "bad_dtype",
            Code::BadPriority => "bad_priority",
            Code::NonFinite => "non_finite",
            Code::InvalidName => "invalid_name",
            Code::UnknownStream => "unknown_stream",
            Code::TooManyStreams => "too_many_streams",
            Code::DuplicateModality => "duplicate_modality",
            Code::IncompleteSample => "incomplete_sample",
            Code::Overloaded => "overloaded",
            Code::DeviceError => "device_error",
            Code::Timeout => "timeout",
            Code::Shutdown => "shutdown",
            Code::FrameTooLarge => "frame_too_large",
            Code::Internal => "internal",
        }
    }

    /// The protocol code for an engine error.
    pub fn of_engine_error(e: &crate::error::Error) -> Code {
        use crate::error::Error as E;
        match e {
            E::Overloaded(_) => Code::Overloaded,
            E::Timeout(_) => Code::Timeout,
            E::Shutdown(_) => Code::Shutdown,
            E::InputNonFinite { .. } => Code::NonFinite,
            E::InputShape { .. } => Code::WrongWidth,
            E::Device { .. } | E::BackendUnavailable { .. } => Code::DeviceError,
            _ => Code::Internal,
        }
    }
}

/// A protocol error: code + human text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// Stable code.
    pub code: Code,
    /// Human-readable explanation.
    pub message: String,
}

impl ProtoError {
    /// A new error.
    pub fn new(code: Code, message: impl Into<String>) -> ProtoError {
        ProtoError {
            code,
            message: message.into(),
        }
    }
}
