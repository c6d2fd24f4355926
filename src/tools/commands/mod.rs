//! The commands that are not tools of their own: `fuse` (offline mode), `devices`, `selftest`.

pub mod devices;
pub mod fuse;
pub mod selftest;
