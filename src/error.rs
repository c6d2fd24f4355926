//! The crate error type. Every variant has a stable machine code (`Error::code`) used in
//! protocol error messages, metric labels and CLI output, so callers can match on it.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in fusion-engine. Input problems name the tensor (in quotes),
/// the row where relevant, and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid safetensors file.
    #[error("{context}: not a valid safetensors file: {reason}")]
    Safetensors {
        /// What was being read (a path or "input").
        context: String,
        /// The parser's message.
        reason: String,
    },
    /// A model tensor is missing.
    #[error("model: missing tensor \"{name}\" (expected shape {expected})")]
    ModelMissingTensor {
        /// Tensor name.
        name: String,
        /// Expected shape, e.g. `[512, 768]`.
        expected: String,
    },
    /// A model tensor has the wrong shape.
    #[error("model: tensor \"{name}\" has shape {actual}, expected {expected}")]
    ModelShape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: String,
        /// Shape found.
        actual: String,
    },
    /// A model tensor has a dtype the engine does not load.
    #[error("model: tensor \"{name}\" has dtype {actual}, expected F32, F16 or BF16")]
    ModelDtype {
        /// Tensor name.
        name: String,
        /// Dtype found.
        actual: String,
    },
    /// The model file holds a tensor that is not part of the fusion head.
    #[error("model: unexpected tensor \"{name}\" ({reason})")]
    ModelUnexpectedTensor {
        /// Tensor name.
        name: String,
        /// Why it does not fit.
        reason: String,
    },
    /// The model's metadata is inconsistent.
    #[error("model: metadata \"{key}\": {reason}")]
    ModelMetadata {
        /// Metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A model parameter holds NaN or Inf.
    #[error("model: tensor \"{name}\" holds a non-finite value at element {index}")]
    ModelNonFinite {
        /// Tensor name.
        name: String,
        /// Flat element index.
        index: usize,
    },
    /// An input tensor named by the model is missing.
    #[error("input: missing tensor \"{name}\" (expected shape {expected})")]
    InputMissingTensor {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: String,
    },
    /// An input tensor has the wrong shape.
    #[error("input: tensor \"{name}\" has shape {actual}, expected {expected}")]
    InputShape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: String,
        /// Shape found.
        actual: String,
    },
    /// An input tensor has an unsupported dtype.
    #[error("input: tensor \"{name}\" has dtype {actual}, expected {expected}")]
    InputDtype {
        /// Tensor name.
        name: String,
        /// Expected dtype(s).
        expected: String,
        /// Dtype found.
        actual: String,
    },
    /// The input file holds a tensor the model does not know.
    #[error("input: unknown tensor \"{name}\" (the model's modalities are {known}, plus optional \"mask\")")]
    InputUnknownTensor {
        /// Tensor name.
        name: String,
        /// The modality names the model expects.
        known: String,
    },
    /// An input value is NaN or Inf.
    #[error(
        "input: tensor \"{name}\" row {row} holds a non-finite value (NaN or Inf) at column {col}"
    )]
    InputNonFinite {
        /// Tensor name.
        name: String,
        /// Sample row.
        row: usize,
        /// Column.
        col: usize,
    },
    /// Finite inputs whose projection overflows f32 (values far outside any embedding's range).
    #[error("input: row {row} overflows f32 in the projection (inputs far too large)")]
    InputOverflow {
        /// Sample row.
        row: usize,
    },
    /// A sample has no modality present.
    #[error(
        "input: tensor \"mask\" row {row} marks no modality present (expected at least one 1)"
    )]
    NoModality {
        /// Sample row.
        row: usize,
    },
    /// A mask value other than 0 or 1.
    #[error("input: tensor \"mask\" row {row} column {col} holds {value}, expected 0 or 1")]
    BadMask {
        /// Sample row.
        row: usize,
        /// Column.
        col: usize,
        /// The value.
        value: u8,
    },
    /// A batch with zero samples.
    #[error("input: empty batch (B = 0)")]
    EmptyBatch,
    /// Caller-provided output buffers have the wrong size.
    #[error("output buffer \"{name}\" has {actual} elements, expected {expected}")]
    OutputSize {
        /// Which buffer.
        name: &'static str,
        /// Expected length.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// The requested backend or device is not usable here.
    #[error("backend {backend} unavailable: {reason}")]
    BackendUnavailable {
        /// Backend name.
        backend: String,
        /// Why.
        reason: String,
    },
    /// The backend failed while running (driver error, lost device, ...).
    #[error("backend {backend} failed: {reason}")]
    Device {
        /// Backend name.
        backend: String,
        /// Why.
        reason: String,
    },
    /// A request was refused because a bounded queue is full.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A request waited past its time limit (e.g. no device took a batch within
    /// `queue_timeout`).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The engine is shutting down and did not run the request.
    #[error("shut down: {0}")]
    Shutdown(String),
    /// Bad configuration or command-line usage.
    #[error("config: {0}")]
    Config(String),
    /// What the process runs on could not be set up or failed under it: the async runtime, a
    /// task that panicked, writing a report.
    #[error("runtime: {0}")]
    Runtime(String),
    /// A tool (`loadgen`, `demo`) failed while running.
    #[error("{0}")]
    Tool(String),
}

impl Error {
    /// Stable machine-readable code for this error, used in protocol messages and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Safetensors { .. } => "bad_safetensors",
            Error::ModelMissingTensor { .. } => "model_missing_tensor",
            Error::ModelShape { .. } => "model_shape",
            Error::ModelDtype { .. } => "model_dtype",
            Error::ModelUnexpectedTensor { .. } => "model_unexpected_tensor",
            Error::ModelMetadata { .. } => "model_metadata",
            Error::ModelNonFinite { .. } => "model_non_finite",
            Error::InputMissingTensor { .. } => "input_missing_tensor",
            Error::InputShape { .. } => "input_shape",
            Error::InputDtype { .. } => "input_dtype",
            Error::InputUnknownTensor { .. } => "input_unknown_tensor",
            Error::InputNonFinite { .. } => "non_finite",
            Error::InputOverflow { .. } => "overflow",
            Error::NoModality { .. } => "no_modality",
            Error::BadMask { .. } => "bad_mask",
            Error::EmptyBatch => "empty_batch",
            Error::OutputSize { .. } => "output_size",
            Error::BackendUnavailable { .. } => "backend_unavailable",
            Error::Device { .. } => "device_error",
            Error::Overloaded(_) => "overloaded",
            Error::Timeout(_) => "timeout",
            Error::Shutdown(_) => "shutdown",
            Error::Config(_) => "config",
            Error::Runtime(_) => "runtime",
            Error::Tool(_) => "tool_failed",
        }
    }

    /// True when the error is the input's fault (the caller should not retry it elsewhere).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            Error::InputMissingTensor { .. }
                | Error::InputShape { .. }
                | Error::InputDtype { .. }
                | Error::InputUnknownTensor { .. }
                | Error::InputNonFinite { .. }
                | Error::InputOverflow { .. }
                | Error::NoModality { .. }
                | Error::BadMask { .. }
                | Error::EmptyBatch
                | Error::OutputSize { .. }
        )
    }
}

/// Formats a shape as `[a, b]`.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}
