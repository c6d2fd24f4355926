//! Sample keys without an allocation per sample (docs/DESIGN.md section 4): the keys of one
//! `samples` frame are copied once into one [`FrameKeys`], and each run of its rows in a batch
//! ([`RunKeys`]) is a reference to it and a row range, from the batcher to the fan-out.

use std::fmt;
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

/// The keys of a run of a batch's samples: one sample's own (a sample the aligner joined from
/// produce messages), or rows `start..end` of its `samples` frame's keys (a reference count
/// per run, no allocation).
#[derive(Clone)]
pub(crate) enum RunKeys {
    Own(String),
    Rows(Arc<FrameKeys>, u32, u32),
}

impl RunKeys {
    /// Rows `start..end` of `keys` (clamped to the keys it holds).
    pub fn rows(keys: &Arc<FrameKeys>, start: usize, end: usize) -> RunKeys {
        let end = end.min(keys.len());
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        RunKeys::Rows(Arc::clone(keys), n(start.min(end)), n(end))
    }

    /// Samples in the run.
    pub fn len(&self) -> usize {
        match self {
            RunKeys::Own(_) => 1,
            RunKeys::Rows(_, s, e) => e.saturating_sub(*s) as usize,
        }
    }

    /// The run's keys, in row order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        let (own, rows) = match self {
            RunKeys::Own(k) => (Some(k.as_str()), None),
            RunKeys::Rows(f, s, e) => (None, Some((*s..*e).map(|i| f.get(i as usize)))),
        };
        own.into_iter().chain(rows.into_iter().flatten())
    }
}

impl fmt::Debug for RunKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
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
        let run = |a, b| {
            let r = RunKeys::rows(&f, a, b);
            r.iter().map(str::to_string).collect::<Vec<_>>()
        };
        assert_eq!(run(1, 3), ["", "héllo"]);
        assert_eq!(run(2, 9), ["héllo", "k-0003"]);
        assert_eq!(RunKeys::rows(&f, 2, 9).len(), 2);
        assert!(run(9, 12).is_empty());
        assert_eq!(RunKeys::rows(&f, 9, 12).len(), 0);
        assert_eq!(RunKeys::Own("x".into()).iter().collect::<Vec<_>>(), ["x"]);
        let none = FrameKeys::new(&[]).expect("no keys");
        assert_eq!((none.len(), none.get(0)), (0, ""));
    }
}
