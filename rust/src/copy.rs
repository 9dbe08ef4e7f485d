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

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_offload_cuda::{
    copy_host_to_device_async, stream_wait_event, synchronize_stream, Context, Event, Stream,
};

use crate::error::Result;
use crate::tiers::device::SlotId;

/// How bytes reach a slot.
pub enum CopyBackend {
    Host,
    Cuda(CudaCopies),
}

/// The CUDA side: the device's primary context and one ready/free event
/// pair per slot, created once.
pub struct CudaCopies {
    pub context: Arc<Context>,
    ready: Vec<Event>,
    free: Vec<Event>,
}

impl CudaCopies {
    pub fn new(context: Arc<Context>, n_slots: usize) -> Result<Self> {
        let ready = (0..n_slots)
            .map(|_| Event::new(&context))
            .collect::<std::result::Result<_, _>>()?;
        let free = (0..n_slots)
            .map(|_| Event::new(&context))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            context,
            ready,
            free,
        })
    }

    /// Makes `stream` (a reader's) wait until the slot's copy has landed.
    pub fn reader_waits(&self, slot: SlotId, stream: u64) -> Result<()> {
        Ok(stream_wait_event(stream, &self.ready[slot as usize])?)
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
}

/// One worker's means to copy: nothing for the host; for CUDA a stream,
/// an event to wait for its copies on (sleeping, not spinning: several
/// workers may wait at once), and whether every copy issued on it has
/// landed.
pub enum WorkerCopier {
    Host,
    Cuda {
        stream: Stream,
        landed: Event,
        idle: Cell<bool>,
    },
}

impl WorkerCopier {
    /// Set up on the worker thread itself (CUDA needs the context current).
    pub fn on_this_thread(backend: &CopyBackend) -> Result<Self> {
        match backend {
            CopyBackend::Host => Ok(Self::Host),
            CopyBackend::Cuda(cuda) => {
                cuda.context.bind_to_current_thread()?;
                Ok(Self::Cuda {
                    stream: Stream::new(&cuda.context)?,
                    landed: Event::blocking(&cuda.context)?,
                    idle: Cell::new(true),
                })
            }
        }
    }

    /// Copies `bytes` from `src` into slot `slot` at `dst`; with
    /// `until_landed`, returns only once the copy has completed (a worker
    /// waits when its source is about to be reused, or when nothing else
    /// is queued, so waiting delays nothing). Returns how long the copy
    /// took when that is known exactly: always for memcpy; for CUDA when
    /// the worker waited and nothing else ran on its stream meanwhile.
    ///
    /// # Safety
    /// `src` must be valid for `bytes` reads and `dst` for `bytes` writes
    /// (host memory for the host backend, device memory for CUDA), nobody
    /// else may write either range until the slot is marked ready, and for
    /// CUDA `src` must stay valid until the slot's ready event completes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn copy(
        &self,
        backend: &CopyBackend,
        slot: SlotId,
        src: *const u8,
        dst: u64,
        bytes: usize,
        wait_for_reader: bool,
        until_landed: bool,
    ) -> Result<Option<Duration>> {
        let started = Instant::now();
        match (self, backend) {
            (Self::Host, _) => {
                // SAFETY: the caller guarantees both ranges are valid and
                // unshared; they do not overlap (host tier vs slot pool).
                unsafe { std::ptr::copy_nonoverlapping(src, dst as *mut u8, bytes) };
                Ok(Some(started.elapsed()))
            }
            (
                Self::Cuda {
                    stream,
                    landed,
                    idle,
                },
                CopyBackend::Cuda(cuda),
            ) => {
                // Measurable only from an idle stream and without waiting
                // for a reader first.
                let measurable = idle.replace(false) && !wait_for_reader;
                // After the slot's last reader and its previous copy, on
                // whichever streams they ran (an event never recorded, or
                // whose work is done, costs nothing to wait on).
                stream_wait_event(stream.raw(), &cuda.free[slot as usize])?;
                stream_wait_event(stream.raw(), &cuda.ready[slot as usize])?;
                // SAFETY: the caller guarantees `src` is pinned host memory
                // valid until the ready event completes and `dst` is device
                // memory of at least `bytes`.
                unsafe { copy_host_to_device_async(dst, src, bytes, stream.raw())? };
                let ready = &cuda.ready[slot as usize];
                ready.record(stream.raw())?;
                if !until_landed {
                    return Ok(None);
                }
                landed.record(stream.raw())?;
                landed.synchronize()?;
                idle.set(true);
                Ok(measurable.then(|| started.elapsed()))
            }
            (Self::Cuda { .. }, CopyBackend::Host) => {
                unreachable!("a CUDA worker always has a CUDA backend")
            }
        }
    }
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
