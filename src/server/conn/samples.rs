//! A connection's `samples` frames (PROTOCOL 4.4): validated as a whole and scanned for NaN/Inf
//! on this connection's task, their blocks kept in place in the frame's buffer or copied into
//! the engine's pooled (page-locked) buffers (docs/DESIGN.md section 4.2), then handed to the
//! pipeline as one message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;

use super::{check_name, Conn};
use crate::engine::{BufferPool, PooledBlocks, Priority};
use crate::model::FusionHead;
use crate::protocol::notices::About;
use crate::protocol::{self, Code, ProtoError};
use crate::server::ingest::keys::FrameKeys;
use crate::server::ingest::pipeline::refuse_samples;
use crate::server::ingest::queue::{IngestMsg, IngestSamples};
use crate::tensor::{copy_finite, find_non_finite_bytes, HostBytes};

impl Conn {
    /// A `samples` frame (PROTOCOL 4.4): validated as a whole (one error refuses every sample of
    /// it), then handed to the pipeline as one message weighing one ingest slot per row.
    pub(super) async fn samples(&mut self, frame: Bytes) {
        let f = match protocol::parse_samples(&frame) {
            Ok(f) => f,
            Err(e) => return self.frame_error(&frame, e),
        };
        let id = (f.id != 0).then(|| Value::from(f.id));
        let about = About {
            id: id.as_ref(),
            stream: Some(f.stream),
            ..About::default()
        };
        let ing = match self.validate_samples(&f, id.clone()) {
            Ok(i) => i,
            Err(e) => return self.error(e.code, &e.message, &about),
        };
        let rows = ing.rows();
        let sh = Arc::clone(&self.shared);
        sh.m.produce.increment(rows as u64);
        self.out.begin_request();
        let deadline = tokio::time::Instant::now() + sh.cfg.ingest_wait;
        let mut msg = IngestMsg::Samples(ing);
        let refused = loop {
            match sh.ingest.try_push(msg) {
                Ok(()) => return,
                Err(TrySendError::Closed(_)) => break None,
                Err(TrySendError::Full(m)) => msg = m,
            }
            // Full: BULK is shed at once, other classes wait up to `ingest_wait` (PROTOCOL 5.1).
            if f.priority == Priority::Bulk || tokio::time::Instant::now() >= deadline {
                break Some(msg);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        self.out.end_request();
        match refused {
            None => self.error(Code::Shutdown, "the server is shutting down", &about),
            Some(IngestMsg::Samples(ing)) => {
                let why = "the ingest queue is full (the server is saturated)";
                refuse_samples(&sh, &ing, why);
            }
            Some(IngestMsg::One(_)) => {}
        }
    }

    fn validate_samples(
        &mut self,
        f: &protocol::SamplesFrame<'_>,
        id: Option<Value>,
    ) -> Result<IngestSamples, ProtoError> {
        if self.draining {
            return Err(ProtoError::new(
                Code::Shutdown,
                "the server is shutting down",
            ));
        }
        let sh = &self.shared;
        let pool = sh.engine.buffer_pool();
        let place = placement(pool);
        let c = check_frame(&sh.head, sh.cfg.max_name_bytes, pool, place, f)?;
        let stream = self.use_stream(f.stream)?;
        Ok(IngestSamples {
            stream,
            keys: c.keys,
            dtype: f.dtype,
            priority: f.priority,
            modalities: c.modalities,
            blocks: c.blocks,
            ack: f.ack,
            id,
            producer: Arc::clone(&self.out),
        })
    }
}

/// Where this engine's batches read `samples` blocks from (docs/DESIGN.md section 4.1): in the
/// frames they came in, unless a device copies faster from the pool's page-locked buffers
/// (CUDA): then in the frame only where the frame lies in one (a payload over 64 KiB is read
/// into a buffer of the pool, locked once it has come back to it), else copied into one.
/// `FUSION_KEEP_FRAMES=0` (a measuring knob) copies every block.
fn placement(pool: &BufferPool) -> Placement {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let allowed =
        *ALLOWED.get_or_init(|| std::env::var("FUSION_KEEP_FRAMES").as_deref() != Ok("0"));
    match (allowed, pool.locks_pages()) {
        (false, _) => Placement::Copied,
        (true, false) => Placement::InFrame,
        (true, true) => Placement::InFrameIfLocked,
    }
}

/// Where [`check_frame`] puts a frame's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Where they are: slices of the frame's buffer, which they keep alive by reference.
    InFrame,
    /// Where they are when they lie in page-locked memory ([`BufferPool::is_page_locked`]),
    /// else copied.
    InFrameIfLocked,
    /// Copies in buffers from the pool.
    Copied,
}

/// What a `samples` frame becomes once checked: its modalities' head indices, their blocks
/// (kept in the frame or copied out of it), its keys.
pub(crate) struct CheckedFrame {
    pub modalities: Vec<usize>,
    pub blocks: PooledBlocks,
    pub keys: Arc<FrameKeys>,
}

/// Checks a parsed `samples` frame against the head and `max_name_bytes` (stream and key
/// names, modalities known, widths right) and scans each block for NaN/Inf (docs/DESIGN.md
/// section 4.1): with [`Placement::InFrame`] a block stays where it is in the frame's buffer (a
/// reference-counted slice of it); with [`Placement::Copied`] it is copied into a buffer from
/// `pool` in the same pass as the scan; with [`Placement::InFrameIfLocked`] it stays only if
/// it lies in page-locked memory, else it is copied. On an error nothing of the frame is kept
/// (the blocks taken so far are dropped, copies back to the pool).
pub(crate) fn check_frame(
    head: &FusionHead,
    max_name: usize,
    pool: &Arc<BufferPool>,
    place: Placement,
    f: &protocol::SamplesFrame<'_>,
) -> Result<CheckedFrame, ProtoError> {
    check_name(max_name, "stream", f.stream)?;
    for (i, k) in f.keys.iter().enumerate() {
        check_name(max_name, "key", k)
            .map_err(|e| ProtoError::new(e.code, format!("sample {i}: {}", e.message)))?;
    }
    let mut modalities = Vec::with_capacity(f.modalities.len());
    let mut blocks = PooledBlocks::new(Arc::clone(pool));
    for (&(name, width), block) in f.modalities.iter().zip(&f.blocks) {
        let Some(mi) = head.modality_index(name) else {
            return Err(ProtoError::new(
                Code::UnknownModality,
                format!(
                    "unknown modality \"{name}\" (the head has {})",
                    head.modality_list()
                ),
            ));
        };
        let want = head.modalities[mi].width;
        if width != want {
            return Err(ProtoError::new(
                Code::WrongWidth,
                format!("modality \"{name}\" has width {want}, got {width} values"),
            ));
        }
        let in_frame = match place {
            Placement::InFrame => true,
            Placement::InFrameIfLocked => pool.is_page_locked(block),
            Placement::Copied => false,
        };
        let taken = if in_frame {
            match find_non_finite_bytes(f.dtype, block) {
                Some(e) => Err(e),
                None => Ok(HostBytes::from(block.clone())),
            }
        } else {
            let mut buf = blocks.buffer(block.len());
            match copy_finite(f.dtype, block, &mut buf) {
                Ok(()) => Ok(HostBytes::from(buf)),
                Err(e) => {
                    blocks.give_back(buf);
                    Err(e)
                }
            }
        };
        let taken = taken.map_err(|e| {
            ProtoError::new(
                Code::NonFinite,
                format!(
                    "modality \"{name}\" of sample {} (key \"{}\"): element {} is NaN or Inf",
                    e / width,
                    f.keys.get(e / width).copied().unwrap_or_default(),
                    e % width
                ),
            )
        })?;
        blocks.push(taken);
        modalities.push(mi);
    }
    let keys = FrameKeys::new(&f.keys)
        .ok_or_else(|| ProtoError::new(Code::Malformed, "the frame's keys exceed 4 GiB"))?;
    Ok(CheckedFrame {
        modalities,
        blocks,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `rows` samples of modalities a (width 3) and b (width 5), f32, the last
    /// value of b `last` (its last row's last element), and the head it fits.
    fn frame(rows: usize, last: f32) -> (FusionHead, Bytes) {
        let dims = [("a".to_string(), 3), ("b".to_string(), 5)];
        let head = FusionHead::random(&dims, 4, 1e-5, 7);
        let a: Vec<u8> = (0..rows * 3)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let mut b: Vec<f32> = (0..rows * 5).map(|i| i as f32 * 0.5).collect();
        if let Some(v) = b.last_mut() {
            *v = last;
        }
        let b: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
        let keys: Vec<String> = (0..rows).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let f = protocol::encode_samples(
            "s",
            &keys,
            &["a", "b"],
            &[&a, &b],
            crate::tensor::DType::F32,
            Priority::Important,
            false,
            0,
        )
        .expect("encodes");
        (head, Bytes::from(f))
    }

    fn inside(frame: &Bytes, b: &[u8]) -> bool {
        let (f0, b0) = (frame.as_ptr() as usize, b.as_ptr() as usize);
        b0 >= f0 && b0 + b.len() <= f0 + frame.len()
    }

    #[test]
    fn in_frame_blocks_are_slices_of_the_frame_and_copies_are_not() {
        let (head, bytes) = frame(4, 1.5);
        let f = protocol::parse_samples(&bytes).expect("parses");
        let pool = Arc::new(BufferPool::default());
        let kept = check_frame(&head, 64, &pool, Placement::InFrame, &f).expect("ok");
        let copied = check_frame(&head, 64, &pool, Placement::Copied, &f).expect("ok");
        for (j, want) in f.blocks.iter().enumerate() {
            let (k, c) = (
                kept.blocks.get(j).expect("kept"),
                copied.blocks.get(j).expect("copied"),
            );
            assert_eq!(
                (k, c),
                (&want[..], &want[..]),
                "block {j}: the frame's bytes"
            );
            assert!(inside(&bytes, k), "block {j} is read in place");
            assert!(!inside(&bytes, c), "block {j} was copied out");
        }
        drop(f);
        assert!(!bytes.is_unique(), "the kept blocks hold the frame");
        drop((kept, copied));
        assert!(
            bytes.is_unique(),
            "nothing holds the frame once its blocks are dropped"
        );
        assert_eq!(pool.spare(), 2, "the copies went back to the pool");
    }

    #[test]
    fn under_a_page_lock_blocks_stay_in_frames_read_into_locked_buffers_and_others_are_copied() {
        use crate::backend::host_lock::LockedRanges;
        use crate::engine::buffers::lock_tests::FakeLock;
        /// A frame in a buffer of the pool, given back when its last slice drops (as the frame
        /// reader's are).
        struct Pooled(Vec<u8>, Arc<BufferPool>);
        impl AsRef<[u8]> for Pooled {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for Pooled {
            fn drop(&mut self) {
                self.1.give(std::mem::take(&mut self.0));
            }
        }
        let ranges: &'static LockedRanges = Box::leak(Box::new(LockedRanges::new()));
        let pool = Arc::new(BufferPool::with_registry(ranges));
        // The frame read into a buffer of the pool that has come back to it once (and so is
        // locked when the pool has a lock), as the frame reader does with a payload over 64 KiB.
        let read_into_pool = |frame: &Bytes| {
            let v = pool.take(frame.len());
            pool.give(v);
            let mut v = pool.take(frame.len());
            v.extend_from_slice(frame);
            Bytes::from_owner(Pooled(v, Arc::clone(&pool)))
        };
        // 4,000 rows: a frame of ~130 KB, over the 64 KiB a buffer needs to be locked.
        let (head, plain) = frame(4000, 1.5);
        let f = protocol::parse_samples(&plain).expect("parses");
        let kept = check_frame(&head, 64, &pool, Placement::InFrameIfLocked, &f).expect("ok");
        assert!(
            (0..2).all(|j| !inside(&plain, kept.blocks.get(j).expect("kept"))),
            "no lock installed: nothing is locked, every block copied"
        );
        drop((kept, f));

        let fake = Arc::new(FakeLock::default());
        pool.set_page_lock(fake.clone());
        let locked = read_into_pool(&plain);
        assert!(
            pool.is_page_locked(&locked),
            "the recycled buffer is locked"
        );
        assert!(!pool.is_page_locked(&plain), "a frame elsewhere is not");
        for (bytes, in_place) in [(&locked, true), (&plain, false)] {
            let f = protocol::parse_samples(bytes).expect("parses");
            let c = check_frame(&head, 64, &pool, Placement::InFrameIfLocked, &f).expect("ok");
            for (j, want) in f.blocks.iter().enumerate() {
                let got = c.blocks.get(j).expect("block");
                assert_eq!(got, &want[..], "block {j}: the frame's values");
                assert_eq!(
                    inside(bytes, got),
                    in_place,
                    "block {j}, locked frame: {in_place}"
                );
                if in_place {
                    assert!(pool.is_page_locked(got), "block {j} lies in locked memory");
                }
            }
        }
        drop(locked);

        // A NaN in the last row of a locked frame: refused, nothing of it kept.
        let (_, bad) = frame(4000, f32::NAN);
        let bad = read_into_pool(&bad);
        assert!(pool.is_page_locked(&bad));
        let f = protocol::parse_samples(&bad).expect("parses");
        let e = check_frame(&head, 64, &pool, Placement::InFrameIfLocked, &f)
            .err()
            .expect("refused");
        assert_eq!(e.code, Code::NonFinite);
        assert!(e.message.contains("sample 3999"), "{}", e.message);
        drop(f);
        let spare = pool.spare();
        drop(bad);
        assert_eq!(
            pool.spare(),
            spare + 1,
            "no block of the refused frame is kept: its buffer is back"
        );
        assert!(fake.misuse.lock().is_empty(), "{:?}", fake.misuse.lock());
    }

    #[test]
    fn a_nan_in_the_last_row_keeps_nothing_of_the_frame_either_way() {
        let (head, bytes) = frame(4, f32::NAN);
        let f = protocol::parse_samples(&bytes).expect("parses");
        let pool = Arc::new(BufferPool::default());
        for place in [Placement::InFrame, Placement::Copied] {
            let e = check_frame(&head, 64, &pool, place, &f)
                .err()
                .expect("refused");
            assert_eq!(e.code, Code::NonFinite);
            assert!(
                e.message
                    .contains("\"b\" of sample 3 (key \"k3\"): element 4"),
                "{}",
                e.message
            );
        }
        drop(f);
        assert!(bytes.is_unique(), "no block of the frame is kept");
        // The copies of a (accepted) and b (refused) went back to the pool.
        assert_eq!(pool.spare(), 2);
    }
}

/// `samples` frames in page-locked pool buffers, end to end (a fake lock).
#[cfg(test)]
#[path = "locked_frames_tests.rs"]
mod locked_frames_tests;
