//! The `results` frame (docs/PROTOCOL.md section 4.5): the binary results of one send burst
//! in one WebSocket frame, each record a whole binary result (4.2).

use super::frame::{KIND_RESULTS, MAGIC};

/// Header of a `results` frame (PROTOCOL 4.5): magic, version, kind, then the record count.
pub const RESULTS_HEADER: usize = 8;

/// Appends one result record (a whole binary result, 4.2) to a `results` frame being built
/// with [`results_frame_start`]; returns false, appending nothing, when the record cannot be
/// framed (over `u32::MAX` bytes or records).
pub fn results_frame_push(frame: &mut Vec<u8>, record: &[u8]) -> bool {
    let (Ok(len), Some(count)) = (
        u32::try_from(record.len()),
        frame
            .get(4..8)
            .and_then(|c| <[u8; 4]>::try_from(c).ok())
            .map(u32::from_le_bytes)
            .and_then(|c| c.checked_add(1)),
    ) else {
        return false;
    };
    frame[4..8].copy_from_slice(&count.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(record);
    true
}

/// Starts a `results` frame (PROTOCOL 4.5) of protocol `version` with no record yet, in a
/// buffer with room for `capacity` bytes of records.
pub fn results_frame_start(version: u8, capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(RESULTS_HEADER + capacity);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&[version, KIND_RESULTS]);
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// The records of a `results` frame (PROTOCOL 4.5), each a whole binary result (4.2); `None`
/// when the frame is not one or its lengths do not add up to the frame exactly.
pub fn split_results(b: &[u8]) -> Option<Vec<&[u8]>> {
    if b.len() < RESULTS_HEADER || b[0..2] != MAGIC || b[3] != KIND_RESULTS {
        return None;
    }
    let count = u32::from_le_bytes(b[4..8].try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(count.min(b.len() / 4));
    let mut at = RESULTS_HEADER;
    for _ in 0..count {
        let len = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4;
        out.push(b.get(at..at.checked_add(len)?)?);
        at += len;
    }
    (at == b.len()).then_some(out)
}
