//! Our own copy streams, and waits on streams we do not own.

use std::ptr;
use std::sync::Arc;

use crate::context::report_drop_failure;
use crate::sys::{cu, handle_to_u64, u64_to_handle, CUstream, CU_STREAM_NON_BLOCKING};
use crate::{driver, Context, Event, Result};

/// A non-blocking stream owned by this crate, used by one copy worker.
///
/// Non-blocking so that copies overlap with torch's work even when torch
/// runs on the legacy default stream, which would otherwise serialize with
/// every blocking stream.
pub struct Stream {
    context: Arc<Context>,
    raw: CUstream,
}

// SAFETY: a CUstream is an opaque token the thread-safe driver accepts from
// any thread; we never dereference it, and the context it belongs to is kept
// alive by the `Arc` we hold.
unsafe impl Send for Stream {}
// SAFETY: all methods take `&self` and only pass the token to the driver,
// which serializes concurrent submissions to one stream internally.
unsafe impl Sync for Stream {}

impl Stream {
    pub fn new(context: &Arc<Context>) -> Result<Stream> {
        let driver = context.driver();
        let _current = context.make_current()?;
        let mut raw: CUstream = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and `context` is current, so
        // the stream is created in it.
        unsafe { cu!(driver, cuStreamCreate(&mut raw, CU_STREAM_NON_BLOCKING))? };
        Ok(Stream {
            context: Arc::clone(context),
            raw,
        })
    }

    /// The handle as an integer, the form every function here and torch's
    /// `torch.cuda.ExternalStream` accept.
    pub fn raw(&self) -> u64 {
        handle_to_u64(self.raw)
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.context
    }

    /// Blocks the calling thread until all work queued so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: `raw` is a stream we created and have not destroyed.
        unsafe { cu!(self.context.driver(), cuStreamSynchronize(self.raw)) }
    }
}

/// Blocks until all work queued on `stream` (a live stream of `context`; 0
/// is its legacy default stream) has finished.
pub fn synchronize_stream(context: &Context, stream: u64) -> Result<()> {
    let _current = context.make_current()?;
    // SAFETY: `stream` is a stream handle per this function's contract.
    unsafe { cu!(context.driver(), cuStreamSynchronize(u64_to_handle(stream))) }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let driver = self.context.driver();
        // Destroying does not wait: the driver frees the stream once its
        // queued work is done, so in-flight copies still complete.
        let _current = self.context.make_current();
        // SAFETY: `raw` is ours, destroyed exactly once, here.
        let status = unsafe { (driver.cuStreamDestroy_v2)(self.raw) };
        report_drop_failure(driver, "cuStreamDestroy_v2", status);
    }
}

/// Makes work submitted to `stream` after this call wait until `event`'s
/// most recent record has completed, without blocking the host.
///
/// `stream` may be any live stream of the event's context, typically torch's
/// current stream (`torch.cuda.current_stream().cuda_stream`); 0 is the
/// legacy default stream of the event's context, which is made current for
/// the call (the calling thread may have another device's current). A
/// handle that is not a live stream is a caller bug the driver may or may
/// not detect.
pub fn stream_wait_event(stream: u64, event: &Event) -> Result<()> {
    let driver = driver()?;
    let _current = event.context().make_current()?;
    // SAFETY: `event` is a live event we own; `stream` is a stream handle
    // per this function's contract; flags 0 is the only plain-wait value.
    unsafe {
        cu!(
            driver,
            cuStreamWaitEvent(u64_to_handle(stream), event.handle(), 0)
        )
    }
}
