//! Shared by the fuzz targets and the seed generator: the selector byte that picks what a fuzz
//! input drives, and the small head the safetensors target reads features against.

use fusion_engine::FusionHead;

/// `protocol`: the rest of the input is a binary produce frame.
pub const PROTOCOL_PRODUCE: u8 = 0;
/// `protocol`: the rest of the input is a binary result frame (the client's decoder).
pub const PROTOCOL_RESULT: u8 = 1;
/// `protocol`: the rest of the input is a client text frame (JSON control message).
pub const PROTOCOL_TEXT: u8 = 2;
/// Number of `protocol` modes (the selector byte is taken modulo this).
pub const PROTOCOL_MODES: u8 = 3;

/// `safetensors_input`: a features file read against [`tiny_head`].
pub const INPUT_TINY: u8 = 0;
/// `safetensors_input`: a features file read against the embedded default head.
pub const INPUT_EMBEDDED: u8 = 1;
/// `safetensors_input`: a model file loaded as a [`FusionHead`].
pub const INPUT_MODEL: u8 = 2;
/// Number of `safetensors_input` modes.
pub const INPUT_MODES: u8 = 3;

/// A small head with the embedded head's modality names (so that mutations of seeds written for
/// either head stay meaningful): vision=4, text=3, audio=2, D=4.
pub fn tiny_head() -> FusionHead {
    let dims = [("vision", 4), ("text", 3), ("audio", 2)].map(|(n, w)| (n.to_string(), w));
    FusionHead::random(&dims, 4, 1e-5, 7)
}

/// `selector` followed by `body`.
pub fn with_selector(selector: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 1);
    v.push(selector);
    v.extend_from_slice(body);
    v
}
