//! The wire format of docs/PROTOCOL.md, shared by everything that speaks it: the server, the
//! Rust client, the load generator and the fuzz targets import this room, never the server.
//! Pure functions, no I/O. In the order a message travels:
//!
//! - [`code`]: the stable error codes ([`Code`]) and [`ProtoError`] (PROTOCOL 6).
//! - [`control`]: client text messages (`hello`, `subscribe`, `produce` in JSON, ...), decoded.
//! - [`produce`]: the binary produce frame (PROTOCOL 4.1): parse and encode.
//! - [`samples`]: the binary `samples` frame of whole samples (PROTOCOL 4.4): parse and encode.
//! - [`result`]: one fused result, binary (4.2) and JSON: encode and decode.
//! - [`results_frame`]: several binary results in one frame (PROTOCOL 4.5).
//! - [`notices`]: every JSON message the server sends: `welcome`, `ack`, `error`, `pong` and the
//!   `notice`s (PROTOCOL 3 and 5).
//!
//! - [`frame`]: the header constants every frame shares and the wire codes of dtypes and
//!   priorities.
//!
//! This file only re-exports the names users of the protocol need.

pub mod code;
pub mod control;
pub mod frame;
pub mod notices;
pub mod produce;
pub mod result;
pub mod results_frame;
pub mod samples;
mod samples_keys;

pub use code::{Code, ProtoError};
pub use control::{decode_client_message, parse_client_json, ClientMessage};
pub use frame::{
    dtype_code, priority_code, priority_name, priority_named, priority_of, FLAG_ACK, FLAG_LAST,
    KIND_PRODUCE, KIND_RESULT, KIND_RESULTS, MAGIC, PRODUCE_HEADER, RESULT_FLAG_REPLAYED,
    RESULT_HEADER, RESULT_HEADER_V2, VERSION, VERSION_2,
};
pub use produce::{encode_produce, parse_produce, produce_id, Produce, ProduceFrame};
pub use result::{
    decode_result, encode_result, encode_result_into, encoded_result_len, json_result,
    json_result_tail, patch_result, result_v1_of_v2, with_seq, DecodedResult, ResultView,
    SEQ_OFFSET,
};
pub use results_frame::{
    results_frame_begin, results_frame_push, results_frame_start, split_results, RESULTS_HEADER,
};
pub use samples::{
    encode_samples, encode_samples_into, encode_samples_keyed, parse_samples, SamplesFrame,
    KIND_SAMPLES,
};
