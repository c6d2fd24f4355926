//! The `results` frame (docs/PROTOCOL.md section 4.5): the binary results of one send burst
//! in one WebSocket frame, each record a whole binary result (4.2).

use bytes::BufMut;

use super::frame::{KIND_RESULTS, MAGIC};

/// Header of a `results` frame (PROTOCOL 4.5): magic, version, kind, then the record count.
pub const RESULTS_HEADER: usize = 8;

/// Appends one result record (a whole binary result, 4.2) to a `results` frame being built
/// with [`results_frame_start`] (or [`results_frame_begin`]); returns false, appending
/// nothing, when the record cannot be framed (over `u32::MAX` bytes or records).
pub fn results_frame_push<F: BufMut + AsMut<[u8]>>(frame: &mut F, record: &[u8]) -> bool {
    let (Ok(len), Some(count)) = (
        u32::try_from(record.len()),
        frame
            .as_mut()
            .get(4..8)
            .and_then(|c| <[u8; 4]>::try_from(c).ok())
            .map(u32::from_le_bytes)
            .and_then(|c| c.checked_add(1)),
    ) else {
        return false;
    };
    if let Some(c) = frame.as_mut().get_mut(4..8) {
        c.copy_from_slice(&count.to_le_bytes());
    }
    frame.put_slice(&len.to_le_bytes());
    frame.put_slice(record);
    true
}

/// Appends the header of a `results` frame (PROTOCOL 4.5) of protocol `version` with no record
/// yet to an empty buffer (the server's writer reuses one buffer for its frames).
pub fn results_frame_begin<F: BufMut>(frame: &mut F, version: u8) {
    frame.put_slice(&MAGIC);
    frame.put_slice(&[version, KIND_RESULTS]);
    frame.put_slice(&0u32.to_le_bytes());
}

/// Starts a `results` frame (PROTOCOL 4.5) of protocol `version` with no record yet, in a
/// buffer with room for `capacity` bytes of records.
pub fn results_frame_start(version: u8, capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(RESULTS_HEADER + capacity);
    results_frame_begin(&mut v, version);
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
