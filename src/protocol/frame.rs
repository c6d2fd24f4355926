//! What every frame shares: the header constants (magic, versions, kinds, flags, header
//! lengths; docs/PROTOCOL.md section 4) and the wire codes of dtypes and priorities.

use crate::engine::Priority;
use crate::tensor::DType;

/// Protocol version of produce frames (their layout is the same in both protocol versions).
pub const VERSION: u8 = 1;
/// The newest protocol version: results carry the stream seq (32-byte binary header).
pub const VERSION_2: u8 = 2;
/// Binary result flag (version 2): the result is a replay (docs/PROTOCOL.md section 7.4).
pub const RESULT_FLAG_REPLAYED: u8 = 1;
/// First two bytes of every binary frame.
pub const MAGIC: [u8; 2] = *b"FE";
/// Binary `kind`: produce (client to server).
pub const KIND_PRODUCE: u8 = 1;
/// Binary `kind`: result (server to client).
pub const KIND_RESULT: u8 = 2;
/// Binary frame kind: several results in one frame (PROTOCOL 4.5, after `batch_results`).
pub const KIND_RESULTS: u8 = 4;
/// Produce flag: answer with an ack.
pub const FLAG_ACK: u8 = 1;
/// Produce flag: last modality of the sample.
pub const FLAG_LAST: u8 = 2;
/// Produce header length.
pub const PRODUCE_HEADER: usize = 24;
/// Result header length (protocol version 1).
pub const RESULT_HEADER: usize = 24;
/// Result header length (protocol version 2: the stream seq follows the seq).
pub const RESULT_HEADER_V2: usize = 32;

/// Wire code of a dtype.
pub const fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// The dtype of a wire code.
pub(crate) fn dtype_of(c: u8) -> Option<DType> {
    match c {
        0 => Some(DType::F32),
        1 => Some(DType::F16),
        2 => Some(DType::BF16),
        _ => None,
    }
}

/// Wire code of a priority.
pub const fn priority_code(p: Priority) -> u8 {
    p as u8
}

/// The priority of a wire code.
pub fn priority_of(c: u8) -> Option<Priority> {
    match c {
        0 => Some(Priority::Critical),
        1 => Some(Priority::Important),
        2 => Some(Priority::Bulk),
        _ => None,
    }
}

/// The priority named in JSON.
pub fn priority_named(s: &str) -> Option<Priority> {
    match s {
        "critical" => Some(Priority::Critical),
        "important" => Some(Priority::Important),
        "bulk" => Some(Priority::Bulk),
        _ => None,
    }
}

/// Lower-case name of a priority.
pub const fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::Critical => "critical",
        Priority::Important => "important",
        Priority::Bulk => "bulk",
    }
}

/// The little-endian u16 at `i` (the caller checked the length).
pub(crate) fn u16_at(b: &[u8], i: usize) -> usize {
    u16::from_le_bytes([b[i], b[i + 1]]) as usize
}

/// The little-endian u32 at `i` (the caller checked the length).
pub(crate) fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
