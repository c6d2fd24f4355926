//! Sample keys without an allocation per sample (docs/DESIGN.md section 4): the keys of one
//! `samples` frame are copied once into one [`FrameKeys`], and each of its samples' [`SampleKey`]
//! is a reference to it and a row index, from the batcher to the fan-out.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// The keys of one `samples` frame in one allocation: their bytes back to back, and where
/// each one ends.
pub(crate) struct FrameKeys {
    text: String,
    ends: Vec<u32>,
}

impl FrameKeys {
    /// The frame's keys, in row order. None when their bytes together exceed `u32::MAX` (a
    /// frame is at most a few MiB, so a validated frame never does).
    pub fn new(keys: &[&str]) -> Option<Arc<FrameKeys>> {
        let mut text = String::with_capacity(keys.iter().map(|k| k.len()).sum());
        let mut ends = Vec::with_capacity(keys.len());
        for k in keys {
            text.push_str(k);
            ends.push(u32::try_from(text.len()).ok()?);
        }
        Some(Arc::new(FrameKeys { text, ends }))
    }

    /// Keys (rows) it holds.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The key of row `i` ("" past the end).
    pub fn get(&self, i: usize) -> &str {
        let start = match i.checked_sub(1) {
            Some(j) => self.ends.get(j).copied(),
            None => Some(0),
        };
        match (start, self.ends.get(i)) {
            // Each end is a char boundary: it is where a whole `&str` was pushed.
            (Some(s), Some(&e)) => self.text.get(s as usize..e as usize).unwrap_or(""),
            _ => "",
        }
    }

    /// Every key, in row order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl fmt::Debug for FrameKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// One sample's key: its own string (a sample the aligner joined from produce messages), or
/// row `i` of its `samples` frame's keys (a reference count, no allocation).
#[derive(Clone)]
pub(crate) enum SampleKey {
    Own(String),
    Row(Arc<FrameKeys>, u32),
}

impl SampleKey {
    /// Row `i` of `keys`.
    pub fn row(keys: &Arc<FrameKeys>, i: usize) -> SampleKey {
        SampleKey::Row(Arc::clone(keys), u32::try_from(i).unwrap_or(u32::MAX))
    }

    pub fn as_str(&self) -> &str {
        match self {
            SampleKey::Own(s) => s,
            SampleKey::Row(k, i) => k.get(*i as usize),
        }
    }
}

impl Deref for SampleKey {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for SampleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_keys_give_back_each_key_and_nothing_past_the_end() {
        let keys = ["a", "", "héllo", "k-0003"];
        let f = FrameKeys::new(&keys).expect("keys");
        assert_eq!(f.len(), 4);
        assert_eq!(f.iter().collect::<Vec<_>>(), keys);
        assert_eq!(f.get(4), "");
        assert_eq!(&*SampleKey::row(&f, 2), "héllo");
        assert_eq!(&*SampleKey::row(&f, 9), "");
        assert_eq!(&*SampleKey::Own("x".into()), "x");
        let none = FrameKeys::new(&[]).expect("no keys");
        assert_eq!((none.len(), none.get(0)), (0, ""));
    }
}
