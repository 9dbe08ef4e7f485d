//! The copy engine: worker threads that take requests from the prefetch
//! queue and move expert blobs from the host tier into device slots.
//!
//! Host backend: a plain memcpy, complete when the worker marks the slot
//! ready. CUDA backend: each worker issues `cuMemcpyHtoDAsync` on its own
//! stream and records the slot's *ready* event; a reader's stream waits on
//! that event. Before overwriting a slot, the worker's stream waits on the
//! slot's *free* event, recorded on the reader's stream when it released
//! the slot, so a copy never clobbers bytes a kernel still reads, and on
//! its *ready* event, so it lands after the slot's previous copy even when
//! another worker's stream issued that one.
//!
//! The slot pool is torch's memory, allocated in stream order on the stream
//! current when the cache was made: every copy stream waits once for that
//! stream's work at that point (the allocator may hand out memory whose
//! previous owner's kernels are still queued there), and the cache is not
//! gone, so the pool not freed, before every slot's last reader is done.
//!
//! What the device does is measured on the device, with timed events read
//! once the stream has passed them (never by waiting): each copy, and each
//! wait of a reader's stream for a copy still in flight (the real stall).

use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use moe_offload_cuda::{
    copy_host_to_device_async, elapsed_seconds, stream_wait_event, synchronize_stream, Context,
    Event, EventState, Stream,
};

use crate::cache::core::SlotEvents;
use crate::error::Result;
use crate::tiers::device::SlotId;
use crate::timing::{Interval, Intervals};

/// Copies measured per worker and not yet read: enough for the copies a
/// worker has in flight at once.
const COPY_INTERVALS: usize = 64;

/// How bytes reach a slot.
pub enum CopyBackend {
    Host,
    Cuda(Arc<CudaCopies>),
}

/// A copy that took `seconds` to move `bytes`.
pub type CopyTime = (usize, f64);

/// Two timed events recorded on one stream: how long it spent in between.
pub struct TimedInterval {
    start: Event,
    end: Event,
}

impl TimedInterval {
    fn new(context: &Arc<Context>) -> Result<Self> {
        Ok(Self {
            start: Event::timed(context)?,
            end: Event::timed(context)?,
        })
    }
}

impl Interval for TimedInterval {
    fn seconds(&self) -> Result<Option<f64>> {
        Ok(elapsed_seconds(&self.start, &self.end)?)
    }
}

/// The CUDA side: the device's primary context, one ready/free event pair
/// per slot, created once, the event that orders copies after the pool's
/// allocation, and the readers' stalls measured and not yet read.
pub struct CudaCopies {
    pub context: Arc<Context>,
    ready: Vec<Event>,
    /// Blocking-sync: a copy worker may wait for one on the host (see
    /// [`wait_for_reader`](Self::wait_for_reader)) and should sleep, not spin.
    free: Vec<Event>,
    /// Recorded on the pool's allocation stream when the cache was made.
    pool_allocated: Event,
    stalls: Mutex<Intervals<TimedInterval, ()>>,
}

impl CudaCopies {
    /// `pool_stream`: the stream the slot pool was allocated on (torch's
    /// current stream then; 0 is the legacy default stream).
    pub fn new(context: Arc<Context>, n_slots: usize, pool_stream: u64) -> Result<Self> {
        let ready = (0..n_slots)
            .map(|_| Event::new(&context))
            .collect::<std::result::Result<_, _>>()?;
        let free = (0..n_slots)
            .map(|_| Event::blocking(&context))
            .collect::<std::result::Result<_, _>>()?;
        let pool_allocated = Event::new(&context)?;
        pool_allocated.record(pool_stream)?;
        Ok(Self {
            context,
            ready,
            free,
            pool_allocated,
            // One layer's waits are read at the next layer at the latest.
            stalls: Mutex::new(Intervals::new(n_slots.clamp(16, 1024))),
        })
    }

    /// Makes `stream` (a reader's) wait until the slot's copy has landed.
    /// When the copy is still in flight, the wait is measured: timed events
    /// on `stream` before and after it capture how long `stream` sat there.
    pub fn reader_waits(&self, slot: SlotId, stream: u64) -> Result<()> {
        let ready = &self.ready[slot as usize];
        if !ready.state()?.is_pending() {
            return Ok(stream_wait_event(stream, ready)?);
        }
        let mut stalls = lock(&self.stalls);
        let Some(interval) = stalls.take(|| TimedInterval::new(&self.context))? else {
            return Ok(stream_wait_event(stream, ready)?);
        };
        let waited = (|| {
            interval.start.record(stream)?;
            stream_wait_event(stream, ready)?;
            interval.end.record(stream)
        })();
        match waited {
            Ok(()) => stalls.recorded(interval, ()),
            Err(_) => stalls.give_back(interval),
        }
        Ok(waited?)
    }

    /// Seconds readers' streams spent waiting for copies, among the waits
    /// the device has got past since the last call.
    pub fn stalled_seconds(&self) -> f64 {
        lock(&self.stalls)
            .harvest()
            .into_iter()
            .map(|((), seconds)| seconds)
            .sum()
    }

    /// The reader on `stream` is done with the slot once `stream` gets here.
    pub fn reader_done(&self, slot: SlotId, stream: u64) -> Result<()> {
        Ok(self.free[slot as usize].record(stream)?)
    }

    /// Blocks until `stream` has done all its work: when the free event of
    /// a slot read on it could not be recorded, the slot may be overwritten
    /// only after this.
    pub fn reader_finished(&self, stream: u64) -> Result<()> {
        Ok(synchronize_stream(&self.context, stream)?)
    }

    /// Blocks until the slot's last reader is done with it. For a worker
    /// that must not hold anything others need while the reader runs: a
    /// host cache slot is taken only after this.
    pub fn wait_for_reader(&self, slot: SlotId) -> Result<()> {
        let free = &self.free[slot as usize];
        if free.state()?.is_pending() {
            free.synchronize()?;
        }
        Ok(())
    }
}

impl SlotEvents for CudaCopies {
    fn copy_state(&self, slot: SlotId) -> EventState {
        self.ready[slot as usize]
            .state()
            .unwrap_or(EventState::Pending)
    }

    fn reader_state(&self, slot: SlotId) -> EventState {
        self.free[slot as usize]
            .state()
            .unwrap_or(EventState::Pending)
    }
}

impl Drop for CudaCopies {
    /// The last of the cache to go (the copy workers have stopped, their
    /// streams synchronized): every slot's last reader must be done before
    /// the caller may free the pool, which torch's allocator would hand out
    /// again in its own stream order, blind to the readers' streams.
    fn drop(&mut self) {
        for free in &self.free {
            let _ = free.synchronize();
        }
    }
}

/// One worker's means to copy: nothing for the host; for CUDA a stream,
/// an event to wait for its copies on (sleeping, not spinning: several
/// workers may wait at once), and its copies measured and not yet read.
pub enum WorkerCopier {
    Host,
    Cuda {
        stream: Stream,
        landed: Event,
        timed: RefCell<Intervals<TimedInterval, usize>>,
    },
    /// Panics on every copy: for tests of what a panicking copy does.
    #[cfg(test)]
    Panics,
}

impl WorkerCopier {
    /// Set up on the worker thread itself (CUDA needs the context current).
    /// The worker's stream first waits for the pool's allocation.
    pub fn on_this_thread(backend: &CopyBackend) -> Result<Self> {
        match backend {
            CopyBackend::Host => Ok(Self::Host),
            CopyBackend::Cuda(cuda) => {
                cuda.context.bind_to_current_thread()?;
                let stream = Stream::new(&cuda.context)?;
                stream_wait_event(stream.raw(), &cuda.pool_allocated)?;
                Ok(Self::Cuda {
                    stream,
                    landed: Event::blocking(&cuda.context)?,
                    timed: RefCell::new(Intervals::new(COPY_INTERVALS)),
                })
            }
        }
    }

    /// Copies `bytes` from `src` into slot `slot` at `dst`; with
    /// `until_landed`, returns only once the copy has completed (a worker
    /// waits when its source is about to be reused). Returns the copies
    /// whose duration became known: for memcpy this one; for CUDA those of
    /// this worker's earlier copies (this one included when it waited) that
    /// the device has finished, each timed on the stream from the moment
    /// it could start (after the slot's reader) to its landing.
    ///
    /// # Safety
    /// `src` must be valid for `bytes` reads and `dst` for `bytes` writes
    /// (host memory for the host backend, device memory for CUDA), nobody
    /// else may write either range until the slot is marked ready, and for
    /// CUDA `src` must stay valid until the slot's ready event completes.
    pub unsafe fn copy(
        &self,
        backend: &CopyBackend,
        slot: SlotId,
        src: *const u8,
        dst: u64,
        bytes: usize,
        until_landed: bool,
    ) -> Result<Vec<CopyTime>> {
        match (self, backend) {
            (Self::Host, _) => {
                let started = Instant::now();
                // SAFETY: the caller guarantees both ranges are valid and
                // unshared; they do not overlap (host tier vs slot pool).
                unsafe { std::ptr::copy_nonoverlapping(src, dst as *mut u8, bytes) };
                Ok(vec![(bytes, started.elapsed().as_secs_f64())])
            }
            (
                Self::Cuda {
                    stream,
                    landed,
                    timed,
                },
                CopyBackend::Cuda(cuda),
            ) => {
                let stream = stream.raw();
                // After the slot's last reader and its previous copy, on
                // whichever streams they ran (an event never recorded, or
                // whose work is done, costs nothing to wait on).
                stream_wait_event(stream, &cuda.free[slot as usize])?;
                stream_wait_event(stream, &cuda.ready[slot as usize])?;
                let mut timed = timed.borrow_mut();
                let interval = timed.take(|| TimedInterval::new(&cuda.context))?;
                // SAFETY: this function's contract.
                let issued =
                    unsafe { issue(cuda, slot, src, dst, bytes, stream, interval.as_ref()) };
                match interval {
                    Some(interval) if issued.is_ok() => timed.recorded(interval, bytes),
                    Some(interval) => timed.give_back(interval),
                    None => {}
                }
                issued?;
                if until_landed {
                    landed.record(stream)?;
                    landed.synchronize()?;
                }
                Ok(timed.harvest())
            }
            (Self::Cuda { .. }, CopyBackend::Host) => {
                unreachable!("a CUDA worker always has a CUDA backend")
            }
            #[cfg(test)]
            (Self::Panics, _) => panic!("the copy into slot {slot} blew up"),
        }
    }
}

/// Queues the copy into `slot` on `stream` and records the slot's ready
/// event after it; with `interval`, times the copy on the stream.
///
/// # Safety
/// As for [`WorkerCopier::copy`], with `src` pinned host memory and `dst`
/// device memory; `stream` is the calling worker's.
unsafe fn issue(
    cuda: &CudaCopies,
    slot: SlotId,
    src: *const u8,
    dst: u64,
    bytes: usize,
    stream: u64,
    interval: Option<&TimedInterval>,
) -> Result<()> {
    if let Some(interval) = interval {
        interval.start.record(stream)?;
    }
    // SAFETY: the caller guarantees `src` is pinned host memory valid until
    // the ready event completes and `dst` is device memory of at least
    // `bytes`.
    unsafe { copy_host_to_device_async(dst, src, bytes, stream)? };
    cuda.ready[slot as usize].record(stream)?;
    if let Some(interval) = interval {
        interval.end.record(stream)?;
    }
    Ok(())
}

impl Drop for WorkerCopier {
    fn drop(&mut self) {
        // A worker stops once the queue is closed: its last copies must land
        // before the host memory they read and the slots they write go away.
        if let Self::Cuda { stream, .. } = self {
            let _ = stream.synchronize();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
