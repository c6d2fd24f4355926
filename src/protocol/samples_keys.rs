//! The keys section of a `samples` frame (PROTOCOL 4.4: N x `{u16 key_len, key}`) read with one
//! UTF-8 check for the whole section instead of one per key, when every key is shorter than
//! 128 bytes: each `u16` length is then two ASCII bytes, so each key lies between ASCII bytes of
//! a section that is valid UTF-8 as a whole, and is valid on its own. One call per key cost the
//! ingest check ~470 instructions a sample (callgrind of `benches/ingest.rs`, docs/PERF.md
//! session 13). Anything else (a longer key, invalid UTF-8, a short frame) is left to the
//! per-key reading of `samples.rs`, which names the error.

/// The `n` keys starting at byte `at` of `b`, and where the section ends; None when the fast
/// path does not apply.
pub(crate) fn short_keys(b: &[u8], at: usize, n: usize) -> Option<(Vec<&str>, usize)> {
    let mut end = at;
    for _ in 0..n {
        let l = b.get(end..end + 2)?;
        let len = usize::from(u16::from_le_bytes([l[0], l[1]]));
        if len >= 128 {
            return None;
        }
        end += 2 + len;
    }
    let section = std::str::from_utf8(b.get(at..end)?).ok()?;
    let mut keys = Vec::with_capacity(n);
    let mut o = 0;
    for _ in 0..n {
        // The low byte of the length (its high byte is 0, checked above).
        let len = usize::from(*section.as_bytes().get(o)?);
        keys.push(section.get(o + 2..o + 2 + len)?);
        o += 2 + len;
    }
    Some((keys, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(keys: &[&str]) -> Vec<u8> {
        let mut v = vec![0xAA; 3]; // bytes before the section
        for k in keys {
            v.extend_from_slice(&(k.len() as u16).to_le_bytes());
            v.extend_from_slice(k.as_bytes());
        }
        v.extend_from_slice(&[1, 2, 3]); // and after it
        v
    }

    #[test]
    fn short_keys_read_every_key_or_leave_it_to_the_per_key_path() {
        let keys = ["a", "", "héllo", "k-000123", "日本語"];
        let b = section(&keys);
        let (got, end) = short_keys(&b, 3, keys.len()).expect("fast path");
        assert_eq!((got, end), (keys.to_vec(), b.len() - 3));
        assert_eq!(short_keys(&b, 3, 0), Some((vec![], 3)));
        // A key of 128 bytes or more: not here.
        let long = "x".repeat(128);
        assert_eq!(short_keys(&section(&["a", &long]), 3, 2), None);
        let just = "y".repeat(127);
        assert_eq!(
            short_keys(&section(&[&just]), 3, 1).map(|k| k.0),
            Some(vec![just.as_str()])
        );
        // Invalid UTF-8 inside a key, or a section cut short: not here either.
        let mut bad = section(&["ok", "ab"]);
        bad[3 + 2 + 2 + 2] = 0xFF;
        assert_eq!(short_keys(&bad, 3, 2), None);
        let cut = section(&["abc"]);
        assert_eq!(short_keys(&cut[..6], 3, 1), None);
        assert_eq!(short_keys(&cut, 3, 3), None);
        // A two-byte character split across two keys: invalid in each, and in the section too
        // (the length bytes between its halves are ASCII), so not taken here either.
        let mut split = vec![0xAA; 3];
        split.extend_from_slice(&[1, 0, 0xC3, 1, 0, 0xA9]);
        assert_eq!(short_keys(&split, 3, 2), None);
    }
}
