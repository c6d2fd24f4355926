//! The bytes of a host matrix: owned (a batch buffer the engine's pool recycles), or a shared
//! slice of the buffer a frame arrived in, kept alive by reference counting (the server's
//! `samples` blocks on engines whose devices read pageable memory: docs/DESIGN.md section 4.2).
//! Either way a backend reads plain `&[u8]`; only the pool cares which it is.

use std::ops::Deref;

use bytes::Bytes;

/// Little-endian element bytes of a [`super::HostMat`].
#[derive(Clone)]
pub enum HostBytes {
    /// A buffer of its own (recycled through the engine's pool when a batch is done).
    Owned(Vec<u8>),
    /// A slice of a received frame: read in place, freed with the last reference.
    Shared(Bytes),
}

impl HostBytes {
    /// The owned buffer, when it is one (for the pool to recycle).
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self {
            HostBytes::Owned(v) => Some(v),
            HostBytes::Shared(_) => None,
        }
    }

    /// The bytes as a buffer of their own: the owned one itself, a copy of a shared slice.
    pub fn into_owned(self) -> Vec<u8> {
        match self {
            HostBytes::Owned(v) => v,
            HostBytes::Shared(b) => b.to_vec(),
        }
    }

    /// The bytes to write (tests): the owned buffer, a shared slice copied into one first.
    #[cfg(test)]
    pub(crate) fn to_mut(&mut self) -> &mut Vec<u8> {
        if let HostBytes::Shared(b) = self {
            *self = HostBytes::Owned(b.to_vec());
        }
        match self {
            HostBytes::Owned(v) => v,
            // Replaced by an owned copy just above.
            HostBytes::Shared(_) => unreachable!("a shared slice was made owned above"),
        }
    }

    /// Whether these bytes are a slice of a received frame.
    pub fn is_shared(&self) -> bool {
        matches!(self, HostBytes::Shared(_))
    }
}

impl Default for HostBytes {
    fn default() -> HostBytes {
        HostBytes::Owned(Vec::new())
    }
}

impl Deref for HostBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            HostBytes::Owned(v) => v,
            HostBytes::Shared(b) => b,
        }
    }
}

impl AsRef<[u8]> for HostBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl From<Vec<u8>> for HostBytes {
    fn from(v: Vec<u8>) -> HostBytes {
        HostBytes::Owned(v)
    }
}

impl From<Bytes> for HostBytes {
    fn from(b: Bytes) -> HostBytes {
        HostBytes::Shared(b)
    }
}

impl PartialEq for HostBytes {
    /// Equal bytes, however they are held.
    fn eq(&self, other: &HostBytes) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_shared() { "Shared" } else { "Owned" };
        write!(f, "{kind}({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_read_and_compare_as_their_bytes() {
        let frame = Bytes::from(vec![9u8, 1, 2, 3, 9]);
        let shared = HostBytes::from(frame.slice(1..4));
        let owned = HostBytes::from(vec![1u8, 2, 3]);
        assert_eq!(&*shared, &[1, 2, 3]);
        assert_eq!(shared, owned);
        assert!(shared.is_shared() && !owned.is_shared());
        assert_eq!(
            shared.clone().into_vec(),
            None,
            "a frame's slice is not the pool's"
        );
        assert_eq!(owned.clone().into_vec(), Some(vec![1, 2, 3]));
        assert_eq!(shared.into_owned(), vec![1, 2, 3]);
        assert_eq!(format!("{owned:?}"), "Owned(3 bytes)");
    }
}
