//! Events marking the end of an expert's copy, so that exactly the stream
//! that needs that expert waits, and only for that copy.

use std::ptr;
use std::sync::Arc;

use crate::context::report_drop_failure;
use crate::sys::{
    cu, handle_to_u64, u64_to_handle, CUevent, CUDA_ERROR_NOT_READY, CU_EVENT_BLOCKING_SYNC,
    CU_EVENT_DISABLE_TIMING,
};
use crate::{Context, Result};

/// A synchronization-only event (timing disabled: cheaper to record and
/// query, and nothing here measures durations with it).
pub struct Event {
    context: Arc<Context>,
    raw: CUevent,
}

// SAFETY: a CUevent is an opaque token the thread-safe driver accepts from
// any thread; we never dereference it, and its context is kept alive by the
// `Arc` we hold.
unsafe impl Send for Event {}
// SAFETY: recording on one thread while another waits on or queries the
// event is supported by the driver (each wait sees the latest record); all
// methods take `&self` and hold no state of their own.
unsafe impl Sync for Event {}

impl Event {
    pub fn new(context: &Arc<Context>) -> Result<Event> {
        Self::with_flags(context, CU_EVENT_DISABLE_TIMING)
    }

    /// An event whose `synchronize` sleeps instead of spinning: for a thread
    /// that waits for copies while other threads need the CPU.
    pub fn blocking(context: &Arc<Context>) -> Result<Event> {
        Self::with_flags(context, CU_EVENT_DISABLE_TIMING | CU_EVENT_BLOCKING_SYNC)
    }

    fn with_flags(context: &Arc<Context>, flags: std::ffi::c_uint) -> Result<Event> {
        let driver = context.driver();
        let _current = context.make_current()?;
        let mut raw: CUevent = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and `context` is current, so
        // the event is created in it.
        unsafe { cu!(driver, cuEventCreate(&mut raw, flags))? };
        Ok(Event {
            context: Arc::clone(context),
            raw,
        })
    }

    /// Captures all work queued on `stream` so far; later waits and queries
    /// refer to this capture. `stream` must be a live stream of the event's
    /// context; 0 is that context's legacy default stream (the event's
    /// context is made current for the call, whatever the calling thread
    /// had current).
    pub fn record(&self, stream: u64) -> Result<()> {
        let _current = self.context.make_current()?;
        // SAFETY: `raw` is our live event; `stream` is a stream handle per
        // this method's contract.
        unsafe {
            cu!(
                self.context.driver(),
                cuEventRecord(self.raw, u64_to_handle(stream))
            )
        }
    }

    /// Blocks the calling thread until the captured work has finished.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: `raw` is our live event.
        unsafe { cu!(self.context.driver(), cuEventSynchronize(self.raw)) }
    }

    /// Whether the captured work has finished, without blocking. An event
    /// never recorded counts as complete.
    pub fn is_complete(&self) -> Result<bool> {
        let driver = self.context.driver();
        // SAFETY: `raw` is our live event.
        let status = unsafe { (driver.cuEventQuery)(self.raw) };
        if status == CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        driver.check("cuEventQuery", status).map(|()| true)
    }

    pub fn raw(&self) -> u64 {
        handle_to_u64(self.raw)
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.context
    }

    pub(crate) fn handle(&self) -> CUevent {
        self.raw
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let driver = self.context.driver();
        // Destroying does not wait: streams already told to wait on the
        // event still do, and the driver frees it afterwards.
        let _current = self.context.make_current();
        // SAFETY: `raw` is ours, destroyed exactly once, here.
        let status = unsafe { (driver.cuEventDestroy_v2)(self.raw) };
        report_drop_failure(driver, "cuEventDestroy_v2", status);
    }
}
