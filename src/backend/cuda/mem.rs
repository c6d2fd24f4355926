//! Device buffers, pinned host staging buffers and events: thin owners of raw driver handles.
//!
//! Buffers only grow (a run sizes them for its chunk plan; steady state allocates nothing) and
//! are reallocated only when every stream is idle: [`super::pipeline`] synchronises before growing.
//! Raw handles (rather than cudarc's `CudaSlice`) keep cudarc's per-use event tracking off the
//! hot path; ordering between the copy and compute streams is explicit, with [`Event`]s.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUevent, CUevent_flags, CUstream};
use cudarc::driver::{result as dr, CudaContext};

/// A driver error as a reason string.
pub(crate) fn de(what: &str, e: dr::DriverError) -> String {
    format!("{what}: {e}")
}

/// Rounds up to a multiple of 256 bytes (cuBLAS and vector loads like aligned operands).
pub(crate) const fn align256(n: usize) -> usize {
    n.div_ceil(256) * 256
}

/// Grow-only device memory.
pub(crate) struct DeviceBuf {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
    bytes: usize,
}

// SAFETY: the buffer is a device address owned by this value; the driver API is thread-safe and
// every use binds the context first.
unsafe impl Send for DeviceBuf {}

impl DeviceBuf {
    /// An empty buffer.
    pub fn new(ctx: &Arc<CudaContext>) -> DeviceBuf {
        DeviceBuf {
            ctx: ctx.clone(),
            ptr: 0,
            bytes: 0,
        }
    }

    /// Device address (0 while empty).
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Uploads `data` synchronously at `offset` (weights, once per head).
    pub fn upload(&mut self, offset: usize, data: &[u8]) -> Result<(), String> {
        if offset + data.len() > self.bytes {
            return Err(format!(
                "upload of {} B at {offset} past a {} B buffer",
                data.len(),
                self.bytes
            ));
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| de("cuCtxSetCurrent", e))?;
        // SAFETY: the destination range is inside this allocation (checked above) and the copy
        // is synchronous, so `data` outlives it.
        unsafe { dr::memcpy_htod_sync(self.ptr + offset as u64, data) }
            .map_err(|e| de("cuMemcpyHtoD", e))
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// Grow-only page-locked host memory, the source/destination of async copies.
pub(crate) struct PinnedBuf {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    bytes: usize,
    flags: u32,
}

// SAFETY: the pinned allocation is owned by this value and only accessed through `&mut self`
// or `&self`; the driver API is thread-safe.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    /// An empty buffer; `write_combined` for buffers the host only writes (upload staging).
    pub fn new(ctx: &Arc<CudaContext>, write_combined: bool) -> PinnedBuf {
        PinnedBuf {
            ctx: ctx.clone(),
            ptr: std::ptr::null_mut(),
            bytes: 0,
            // FUSION_CUDA_WC=0 turns write combining off (an experiment knob).
            flags: if write_combined && std::env::var("FUSION_CUDA_WC").as_deref() != Ok("0") {
                sys::CU_MEMHOSTALLOC_WRITECOMBINED
            } else {
                0
            },
        }
    }

    /// The first `n` bytes. No copy may be writing them (caller's contract, kept by waiting on
    /// the copy's event first). More than was reserved is an error, never a shorter slice.
    pub fn bytes(&self, n: usize) -> Result<&[u8], String> {
        self.check(n)?;
        if n == 0 {
            return Ok(&[]);
        }
        // SAFETY: `ptr` points to `self.bytes` >= n bytes of host memory owned by this value
        // (`check`). Page-locked memory is ordinary readable host memory.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, n) })
    }

    /// The first `n` bytes, mutable (no copy may be reading them); as [`PinnedBuf::bytes`].
    pub fn bytes_mut(&mut self, n: usize) -> Result<&mut [u8], String> {
        self.check(n)?;
        if n == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `bytes`, and `&mut self` makes this the only host reference.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, n) })
    }

    /// `n` bytes fit what was reserved (and, when n > 0, something was).
    fn check(&self, n: usize) -> Result<(), String> {
        if n > self.bytes || (n > 0 && self.ptr.is_null()) {
            return Err(format!(
                "pinned staging holds {} B, {n} B asked for",
                self.bytes
            ));
        }
        Ok(())
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// Grow-only memory: both buffers keep their allocation until a larger one is asked for, and
/// share [`GrowOnly::reserve`]; they differ only in how they allocate and free.
pub(crate) trait GrowOnly {
    /// Bytes allocated now.
    fn capacity(&self) -> usize;

    /// The context the memory belongs to.
    fn context(&self) -> &CudaContext;

    /// Allocates `bytes` (the context is bound) and records the allocation.
    fn alloc(&mut self, bytes: usize) -> Result<(), String>;

    /// Frees the allocation, if any. No queued work may use it.
    fn free(&mut self);

    /// Makes the capacity at least `bytes`. The old contents are dropped. The caller guarantees
    /// that no queued work (kernel or copy) uses the buffer.
    fn reserve(&mut self, bytes: usize) -> Result<(), String> {
        if bytes <= self.capacity() {
            return Ok(());
        }
        self.free();
        let bytes = align256(bytes.max(256));
        self.context()
            .bind_to_thread()
            .map_err(|e| de("cuCtxSetCurrent", e))?;
        self.alloc(bytes)
    }
}

impl GrowOnly for DeviceBuf {
    fn capacity(&self) -> usize {
        self.bytes
    }

    fn context(&self) -> &CudaContext {
        &self.ctx
    }

    fn alloc(&mut self, bytes: usize) -> Result<(), String> {
        // SAFETY: plain allocation in the bound context; the memory is only accessed through
        // device pointers the caller bounds by `len()`.
        self.ptr = unsafe { dr::malloc_sync(bytes) }
            .map_err(|e| de(&format!("cuMemAlloc({bytes} B)"), e))?;
        self.bytes = bytes;
        Ok(())
    }

    fn free(&mut self) {
        if self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `ptr` came from cuMemAlloc and no queued work uses it (contract of
            // `reserve` and of drop, which happens after the owner synchronised).
            let _ = unsafe { dr::free_sync(self.ptr) };
            self.ptr = 0;
            self.bytes = 0;
        }
    }
}

impl GrowOnly for PinnedBuf {
    fn capacity(&self) -> usize {
        self.bytes
    }

    fn context(&self) -> &CudaContext {
        &self.ctx
    }

    fn alloc(&mut self, bytes: usize) -> Result<(), String> {
        // SAFETY: plain allocation; the pointer is only used within `bytes`.
        let p = unsafe { dr::malloc_host(bytes, self.flags) }
            .map_err(|e| de(&format!("cuMemHostAlloc({bytes} B)"), e))?;
        self.ptr = p as *mut u8;
        self.bytes = bytes;
        Ok(())
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `ptr` came from cuMemHostAlloc and no queued copy uses it.
            let _ = unsafe { dr::free_host(self.ptr as *mut c_void) };
            self.ptr = std::ptr::null_mut();
            self.bytes = 0;
        }
    }
}

/// A reusable event without timing (cheapest to record and wait on).
pub(crate) struct Event {
    ev: CUevent,
    /// Recorded at least once (waiting on a never-recorded event is a no-op, but being explicit
    /// keeps the pipeline's reasoning local).
    pub recorded: bool,
}

// SAFETY: events are driver handles usable from any thread with the context bound.
unsafe impl Send for Event {}

impl Event {
    /// A new event in the current context.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Event, String> {
        ctx.bind_to_thread().map_err(|e| de("cuCtxSetCurrent", e))?;
        // Timing enabled: the pipeline reads copy and kernel times from its events (a timing
        // event costs a timestamp per record, nothing measurable at chunk granularity).
        let ev = dr::event::create(CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| de("cuEventCreate", e))?;
        Ok(Event {
            ev,
            recorded: false,
        })
    }

    /// Records the work queued so far on `stream`.
    pub fn record(&mut self, stream: CUstream) -> Result<(), String> {
        // SAFETY: `ev` is a live event and `stream` a live stream of the same context.
        unsafe { dr::event::record(self.ev, stream) }.map_err(|e| de("cuEventRecord", e))?;
        self.recorded = true;
        Ok(())
    }

    /// Makes `stream` wait for the last recorded work (no-op if never recorded).
    pub fn wait_on(&self, stream: CUstream) -> Result<(), String> {
        if !self.recorded {
            return Ok(());
        }
        // SAFETY: live event and stream of the same context.
        unsafe {
            dr::stream::wait_event(
                stream,
                self.ev,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| de("cuStreamWaitEvent", e))
    }

    /// Blocks the host until the last recorded work is done (no-op if never recorded).
    pub fn sync(&self) -> Result<(), String> {
        if !self.recorded {
            return Ok(());
        }
        // SAFETY: live event.
        unsafe { dr::event::synchronize(self.ev) }.map_err(|e| de("cuEventSynchronize", e))
    }
}

impl Event {
    /// Milliseconds between `start` and this event, both recorded and completed (the caller has
    /// synchronised on this event or on later work of a stream that waited on it).
    pub fn elapsed_since(&self, start: &Event) -> Result<f64, String> {
        if !(self.recorded && start.recorded) {
            return Ok(0.0);
        }
        // SAFETY: both events are live, timing-enabled and complete.
        unsafe { dr::event::elapsed(start.ev, self.ev) }
            .map(f64::from)
            .map_err(|e| de("cuEventElapsedTime", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `ev` is live and destroyed once; pending work releases it asynchronously.
        let _ = unsafe { dr::event::destroy(self.ev) };
    }
}
