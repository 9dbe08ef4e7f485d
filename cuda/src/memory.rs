//! Pinned host memory (where experts live between uses), device memory, and
//! the copies between them.

use std::ffi::c_void;
use std::ptr::{self, NonNull};
use std::slice;
use std::sync::Arc;

use crate::context::report_drop_failure;
use crate::sys::{cu, u64_to_handle, CUdeviceptr, CU_MEMHOSTALLOC_PORTABLE};
use crate::{driver, Context, Result};

/// Page-locked host memory, the only kind the DMA engines can read while the
/// host goes on, which is what makes host-to-device copies truly async.
///
/// Allocated portable, so it counts as pinned in every context, and zeroed,
/// so the safe slice views never expose uninitialized bytes. A zero-byte
/// buffer allocates nothing.
pub struct PinnedHostBuffer {
    context: Arc<Context>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer exclusively owns its allocation, like a `Box<[u8]>`;
// pinned memory is ordinary host memory to every thread, and freeing it from
// another thread is allowed by the driver.
unsafe impl Send for PinnedHostBuffer {}
// SAFETY: shared access only yields `&[u8]` or raw pointers; writing through
// a pointer from `as_mut_ptr(&self)` is already `unsafe` for the writer, who
// must rule out concurrent readers.
unsafe impl Sync for PinnedHostBuffer {}

impl PinnedHostBuffer {
    pub fn new(context: &Arc<Context>, bytes: usize) -> Result<PinnedHostBuffer> {
        let ptr = if bytes == 0 {
            NonNull::dangling()
        } else {
            allocate_pinned(context, bytes)?
        };
        Ok(PinnedHostBuffer {
            context: Arc::clone(context),
            ptr,
            len: bytes,
        })
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Takes `&self` because the host tier hands out pointers into disjoint
    /// expert blobs from a shared reference; writers uphold exclusivity.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid (or dangling with len 0) for `len`
        // initialized bytes for as long as `self` lives.
        unsafe { slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the view unique.
        unsafe { slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Allocates `bytes > 0` of zeroed pinned memory in `context`.
fn allocate_pinned(context: &Context, bytes: usize) -> Result<NonNull<u8>> {
    let _current = context.make_current()?;
    let mut raw: *mut c_void = ptr::null_mut();
    // SAFETY: `raw` is a valid out-pointer and the context is current.
    unsafe {
        cu!(
            context.driver(),
            cuMemHostAlloc(&mut raw, bytes, CU_MEMHOSTALLOC_PORTABLE)
        )?
    };
    let Some(ptr) = NonNull::new(raw.cast::<u8>()) else {
        unreachable!("cuMemHostAlloc reported success with a null pointer");
    };
    // SAFETY: the driver just gave us `bytes` writable bytes at `ptr`.
    unsafe { ptr::write_bytes(ptr.as_ptr(), 0, bytes) };
    Ok(ptr)
}

impl Drop for PinnedHostBuffer {
    /// Frees immediately: any async copy still reading from the buffer must
    /// have been waited for by the owner (see [`copy_host_to_device_async`]).
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let driver = self.context.driver();
        let _current = self.context.make_current();
        // SAFETY: `ptr` came from cuMemHostAlloc and is freed once, here.
        let status = unsafe { (driver.cuMemFreeHost)(self.ptr.as_ptr().cast()) };
        report_drop_failure(driver, "cuMemFreeHost", status);
    }
}

/// Device memory owned by this crate. The expert slots themselves are
/// torch's; this type serves tests and benchmarks. A zero-byte buffer
/// allocates nothing and has address 0.
pub struct DeviceBuffer {
    context: Arc<Context>,
    ptr: CUdeviceptr,
    len: usize,
}

impl DeviceBuffer {
    pub fn new(context: &Arc<Context>, bytes: usize) -> Result<DeviceBuffer> {
        let mut ptr: CUdeviceptr = 0;
        if bytes > 0 {
            let _current = context.make_current()?;
            // SAFETY: `ptr` is a valid out-pointer and the context is current.
            unsafe { cu!(context.driver(), cuMemAlloc_v2(&mut ptr, bytes))? };
        }
        Ok(DeviceBuffer {
            context: Arc::clone(context),
            ptr,
            len: bytes,
        })
    }

    /// The device address, valid in torch too since the context is shared.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let driver = self.context.driver();
        let _current = self.context.make_current();
        // SAFETY: `ptr` came from cuMemAlloc_v2 and is freed once, here.
        let status = unsafe { (driver.cuMemFree_v2)(self.ptr) };
        report_drop_failure(driver, "cuMemFree_v2", status);
    }
}

/// Queues a copy of `bytes` from host `src` to device `dst` on `stream` and
/// returns at once; record an [`crate::Event`] on `stream` right after to
/// know when it has landed.
///
/// The calling thread must have the destination's context current
/// ([`Context::bind_to_current_thread`]); this is the hot path, so it does
/// not switch contexts itself.
///
/// # Safety
/// - `src` must be valid for reads of `bytes` and must stay allocated and
///   unmodified until the copy has completed (an event recorded on `stream`
///   after this call completes). Pinned memory is what makes the copy
///   async; pageable memory still works, but the driver stages it and the
///   call blocks until the source has been read.
/// - `dst` must point to at least `bytes` of device memory in the current
///   context that nothing else reads or writes until the copy completes.
/// - `stream` must be a live stream of that context (0 is the legacy default
///   stream).
pub unsafe fn copy_host_to_device_async(
    dst: u64,
    src: *const u8,
    bytes: usize,
    stream: u64,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let driver = driver()?;
    // SAFETY: the caller upholds the contract above for all three handles.
    unsafe {
        cu!(
            driver,
            cuMemcpyHtoDAsync_v2(dst, src.cast(), bytes, u64_to_handle(stream))
        )
    }
}

/// Copies `dst.len()` bytes from device address `src` into `dst` and waits
/// for it. It runs on the legacy default stream, which does not order
/// against our non-blocking streams: wait for their events first.
///
/// The calling thread must have `src`'s context current. An invalid `src`
/// range is reported by the driver as an error; the host side is always
/// exactly `dst`.
pub fn copy_device_to_host(dst: &mut [u8], src: u64) -> Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    let driver = driver()?;
    // SAFETY: `dst` is a live, exclusively borrowed host range of exactly
    // the length we pass; the driver validates the device range.
    unsafe {
        cu!(
            driver,
            cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len())
        )
    }
}
