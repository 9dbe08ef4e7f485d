//! Events marking the end of an expert's copy, so that exactly the stream
//! that needs that expert waits, and only for that copy; and timed events,
//! whose pairs measure how long a stream spent between two points.

use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::context::report_drop_failure;
use crate::sys::{
    cu, handle_to_u64, u64_to_handle, CUevent, CUDA_ERROR_NOT_READY, CU_EVENT_BLOCKING_SYNC,
    CU_EVENT_DEFAULT, CU_EVENT_DISABLE_TIMING,
};
use crate::{Context, CudaError, Result};

/// Where an event stands, as [`Event::state`] finds it without blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventState {
    /// Never recorded: it captures no work (waiting on it costs nothing).
    NotRecorded,
    /// Recorded; the work it captured is still running or queued.
    Pending,
    /// Recorded, and the work it captured has finished.
    Complete,
}

impl EventState {
    /// Whether a stream waiting on the event would have to wait.
    pub fn is_pending(self) -> bool {
        self == Self::Pending
    }
}

/// A CUDA event: synchronization-only by default (timing disabled, cheaper
/// to record and query), or [`timed`](Event::timed) to measure intervals.
pub struct Event {
    context: Arc<Context>,
    raw: CUevent,
    /// Whether `record` has succeeded once: the driver reports a
    /// never-recorded event as complete, which `state` tells apart.
    recorded: AtomicBool,
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

    /// An event that keeps a timestamp, for [`elapsed_seconds`]. Only
    /// queried, never synchronized on.
    pub fn timed(context: &Arc<Context>) -> Result<Event> {
        Self::with_flags(context, CU_EVENT_DEFAULT)
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
            recorded: AtomicBool::new(false),
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
            )?
        };
        self.recorded.store(true, Ordering::Release);
        Ok(())
    }

    /// Blocks the calling thread until the captured work has finished.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: `raw` is our live event.
        unsafe { cu!(self.context.driver(), cuEventSynchronize(self.raw)) }
    }

    /// Whether the captured work has finished, without blocking. An event
    /// never recorded counts as complete.
    pub fn is_complete(&self) -> Result<bool> {
        Ok(!self.state()?.is_pending())
    }

    /// Where the event stands, without blocking (`cuEventQuery`: success
    /// is complete, `CUDA_ERROR_NOT_READY` pending; anything else, such as
    /// a sticky error of earlier work, is an error).
    pub fn state(&self) -> Result<EventState> {
        if !self.recorded.load(Ordering::Acquire) {
            return Ok(EventState::NotRecorded);
        }
        // Any thread may ask (a statistics call, say), current context or not.
        let _current = self.context.make_current()?;
        let driver = self.context.driver();
        // SAFETY: `raw` is our live event.
        let status = unsafe { (driver.cuEventQuery)(self.raw) };
        if status == CUDA_ERROR_NOT_READY {
            return Ok(EventState::Pending);
        }
        driver
            .check("cuEventQuery", status)
            .map(|()| EventState::Complete)
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

/// Seconds between two recorded [`timed`](Event::timed) events, once both
/// have completed; `None` while either is pending. Both must be timed and
/// recorded, else the driver reports an invalid handle. The span between
/// two records on one stream covers whatever that stream did in between.
pub fn elapsed_seconds(start: &Event, end: &Event) -> Result<Option<f64>> {
    let driver = start.context.driver();
    let Some(elapsed_time) = driver.cuEventElapsedTime else {
        return Err(CudaError::SymbolMissing {
            symbol: "cuEventElapsedTime",
            reason: "this driver does not export it".into(),
        });
    };
    let _current = start.context.make_current()?;
    let mut milliseconds = 0f32;
    // SAFETY: both events are live events of ours; `milliseconds` is a
    // valid out-pointer for the call.
    let status = unsafe { elapsed_time(&mut milliseconds, start.raw, end.raw) };
    if status == CUDA_ERROR_NOT_READY {
        return Ok(None);
    }
    driver.check("cuEventElapsedTime", status)?;
    Ok(Some(f64::from(milliseconds) / 1e3))
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
