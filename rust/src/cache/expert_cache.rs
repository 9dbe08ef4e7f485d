//! [`ExpertCache`]: the host tier, the device slot pool, the eviction policy,
//! the prefetch queue and the copy workers behind one fetch / wait / release
//! protocol:
//!
//! 1. `fetch(layer, experts)` pins a slot for each expert (a hit, or a miss
//!    whose copy is queued on demand) and returns the slots.
//! 2. `wait(layer, expert, stream)` returns once that slot may be read on
//!    `stream` (host: the copy is done; CUDA: `stream` waits on its event).
//! 3. `release(layer, experts, stream)` unpins; on CUDA the slot is not
//!    overwritten before `stream` has passed this point.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use moe_offload_cuda::Context;

use super::core::CacheCore;
use super::policy_by_name;
use crate::copy::{CopyBackend, CudaCopies, WorkerCopier};
use crate::error::{CoreError, Result};
use crate::layout::{ExpertId, ExpertLayout};
use crate::planner::{Planner, PlannerConfig};
use crate::queue::PrefetchQueue;
use crate::stats::Stats;
use crate::tiers::device::{Phase, SlotPool};
use crate::tiers::host::HostTier;
use crate::timing::TimingEstimate;
use crate::trace::live::LiveTracer;
use crate::trace::planning::{ApplyPlan, PlanningThread};
use crate::trace::ActivationCollection;

/// Where the slot pool lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory: copies are memcpy (no GPU needed).
    Host,
    /// Device memory of CUDA device `ordinal`.
    Cuda { ordinal: i32 },
}

/// What an [`ExpertCache`] is built from.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Per MoE layer: (experts, bytes of one expert).
    pub layers: Vec<(u32, usize)>,
    /// Address of `n_slots * slot_bytes` bytes on `device`, owned by the
    /// caller and kept alive for the cache's whole life.
    pub pool_address: u64,
    pub slot_bytes: usize,
    pub n_slots: usize,
    pub device: Device,
    pub copy_workers: usize,
    pub policy: String,
    /// The user's budget, reported in statistics.
    pub budget_bytes: u64,
    pub planner: PlannerConfig,
    /// A saved EAMC to start from.
    pub eamc_path: Option<PathBuf>,
}

struct Shared {
    host: HostTier,
    state: Mutex<CacheCore>,
    copied: Condvar,
    queue: PrefetchQueue,
    backend: CopyBackend,
    /// Measured copy and layer times, for the planner's cost model.
    timing: Mutex<TimingEstimate>,
}

/// The device expert cache, its copy workers and its planner thread.
pub struct ExpertCache {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Request tracing and prefetch planning; `None` when layers differ in
    /// expert count (the EAMC needs one L×E shape).
    planning: Option<PlanningThread>,
}

impl ExpertCache {
    pub fn new(config: CacheConfig) -> Result<Self> {
        let layout = ExpertLayout::new(&config.layers)?;
        if config.slot_bytes < layout.max_expert_bytes() {
            return Err(CoreError::InvalidConfig(format!(
                "slots of {} bytes cannot hold the largest expert ({} bytes)",
                config.slot_bytes,
                layout.max_expert_bytes()
            )));
        }
        if config.copy_workers == 0 {
            return Err(CoreError::InvalidConfig(
                "at least one copy worker is needed".into(),
            ));
        }
        let context = match config.device {
            Device::Host => None,
            Device::Cuda { ordinal } => Some(Context::primary(ordinal)?),
        };
        let host = HostTier::new(layout, context.as_ref())?;
        let backend = match context {
            None => CopyBackend::Host,
            Some(ctx) => CopyBackend::Cuda(CudaCopies::new(ctx, config.n_slots)?),
        };
        let pool = SlotPool::new(
            config.pool_address,
            config.slot_bytes,
            config.n_slots,
            host.layout().num_experts(),
        )?;
        let policy = policy_by_name(&config.policy, config.n_slots, host.layout().num_experts())?;
        let core = CacheCore::new(host.layout().clone(), pool, policy);
        let tracer = tracer_for(host.layout(), &config)?;
        let shared = Arc::new(Shared {
            timing: Mutex::new(TimingEstimate::default()),
            host,
            state: Mutex::new(core),
            copied: Condvar::new(),
            queue: PrefetchQueue::new(),
            backend,
        });
        let workers = (0..config.copy_workers)
            .map(|i| spawn_worker(Arc::clone(&shared), i))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| CoreError::InvalidConfig(format!("cannot start copy worker: {e}")))?;
        let planning = match tracer {
            Some(tracer) => Some(PlanningThread::spawn(
                tracer,
                apply_plans(Arc::clone(&shared), config.planner.prefetch_depth),
            )?),
            None => None,
        };
        Ok(Self {
            shared,
            workers,
            planning,
        })
    }

    pub fn layout(&self) -> &ExpertLayout {
        self.shared.host.layout()
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.shared.backend, CopyBackend::Cuda(_))
    }

    pub fn host_is_pinned(&self) -> bool {
        self.shared.host.is_pinned()
    }

    pub fn n_slots(&self) -> usize {
        self.shared.lock().pool().len()
    }

    /// Copies `src` into expert (layer, expert)'s host blob at `offset`.
    /// Refused while the expert is in a slot, since a copy worker may be
    /// reading those bytes.
    pub fn write_expert(&self, layer: u32, expert: u32, offset: usize, src: &[u8]) -> Result<()> {
        let id = self.layout().id(layer, expert)?;
        self.shared.host.check_range(id, offset, src.len())?;
        // Holding the lock keeps any fetch of this expert out until done.
        let state = self.shared.lock();
        if state.pool().lookup(id).is_some() {
            return Err(CoreError::Protocol(format!(
                "expert {expert} of layer {layer} is cached on the device; its host bytes cannot change now"
            )));
        }
        // SAFETY: the range is inside the blob (checked above) and no copy
        // worker reads this blob: it is in no slot, and the lock we hold
        // keeps it out of any.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.shared.host.expert_ptr(id).add(offset),
                src.len(),
            )
        };
        Ok(())
    }

    /// Copies expert (layer, expert)'s host bytes at `offset` into `dst`.
    pub fn read_expert(
        &self,
        layer: u32,
        expert: u32,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<()> {
        let id = self.layout().id(layer, expert)?;
        self.shared.host.check_range(id, offset, dst.len())?;
        // Writers hold the lock; readers may share the bytes with copy workers.
        let _state = self.shared.lock();
        // SAFETY: the range is inside the blob, and nobody writes it while
        // we hold the lock (writes happen only under it).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.shared.host.expert_ptr(id).add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Pins a slot for each expert of `layer`, queueing on-demand copies for
    /// those not cached. All or nothing: when prefetches in flight hold the
    /// slots it needs, it waits for them; it fails without side effects
    /// when the pool cannot hold the experts at once.
    pub fn fetch(&self, layer: u32, experts: &[u32]) -> Result<Vec<u32>> {
        let ids = self.ids(layer, experts)?;
        let mut state = self.shared.lock();
        loop {
            match state.fetch(&self.shared.queue, &ids) {
                Err(CoreError::BudgetTooSmall { .. }) if state.copies_in_flight() > 0 => {
                    state = self
                        .shared
                        .copied
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
                outcome => return outcome,
            }
        }
    }

    /// Starts `n` new requests (one per sequence of a batch); the current
    /// ones end and join the EAMC.
    pub fn begin_requests(&self, n: usize) -> Result<()> {
        match &self.planning {
            Some(planning) => planning.begin_requests(n),
            None => Ok(()),
        }
    }

    pub fn end_requests(&self) -> Result<()> {
        match &self.planning {
            Some(planning) => planning.end_requests(),
            None => Ok(()),
        }
    }

    /// A MoE layer's routing (`top_k` ids per token row, batch-major). The
    /// planner thread traces it into each live request's activation matrix
    /// and re-plans the prefetches for the layers ahead while the caller
    /// goes on to fetch this layer's experts.
    pub fn observe(&self, layer: u32, ids: &[u32], top_k: usize) -> Result<()> {
        let Some(planning) = &self.planning else {
            return Ok(());
        };
        if layer as usize >= self.layout().num_layers() {
            return Err(self.layout().id(layer, 0).unwrap_err());
        }
        if let Some(&bad) = ids
            .iter()
            .find(|&&e| e >= self.layout().experts_in_layer(layer))
        {
            return Err(self.layout().id(layer, bad).unwrap_err());
        }
        if top_k == 0 || ids.len() % top_k != 0 {
            return Err(CoreError::Protocol(format!(
                "{} routing ids of layer {layer} do not split into rows of top_k = {top_k}",
                ids.len()
            )));
        }
        let stall_total = self.shared.lock().stats().stall_seconds;
        let timing = {
            let mut estimate = lock(&self.shared.timing);
            estimate.record_layer(layer as usize, Instant::now(), stall_total);
            estimate.timing(self.layout().max_expert_bytes())
        };
        planning.observe(layer as usize, ids.to_vec(), top_k, timing)
    }

    /// Writes the EAMC (finished requests only) to `path` atomically.
    pub fn save_eamc(&self, path: &Path) -> Result<()> {
        match &self.planning {
            Some(planning) => planning.settled()?.planner().collection().save(path),
            None => Err(CoreError::InvalidConfig(
                "this model's MoE layers differ in expert count; it has no EAMC".into(),
            )),
        }
    }

    /// Entries in the EAMC, once every routing handed over is traced.
    pub fn eamc_len(&self) -> Result<usize> {
        match &self.planning {
            Some(planning) => Ok(planning.settled()?.planner().collection().len()),
            None => Ok(0),
        }
    }

    /// Returns once the fetched expert's slot may be read on `stream`.
    pub fn wait(&self, layer: u32, expert: u32, stream: u64) -> Result<()> {
        let id = self.layout().id(layer, expert)?;
        let mut state = self.shared.lock();
        let slot = state.pinned_slot(id)?;
        let started = Instant::now();
        let mut stalled = false;
        loop {
            match state.phase(slot) {
                Phase::Ready => break,
                Phase::Failed(reason) => {
                    return Err(CoreError::CopyFailed {
                        layer,
                        expert,
                        reason: reason.clone(),
                    })
                }
                _ => {
                    stalled = true;
                    state = self
                        .shared
                        .copied
                        .wait(state)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        if stalled {
            state.stats_mut().stall_seconds += started.elapsed().as_secs_f64();
        }
        drop(state);
        if let CopyBackend::Cuda(cuda) = &self.shared.backend {
            cuda.reader_waits(slot, stream)?;
        }
        Ok(())
    }

    /// Unpins the experts' slots; on CUDA they are not overwritten before
    /// `stream` passes this point.
    pub fn release(&self, layer: u32, experts: &[u32], stream: u64) -> Result<()> {
        let ids = self.ids(layer, experts)?;
        let mut state = self.shared.lock();
        for &id in &ids {
            let slot = state.pinned_slot(id)?;
            if let CopyBackend::Cuda(cuda) = &self.shared.backend {
                cuda.reader_done(slot, stream)?;
            }
            state.release(id, self.is_cuda())?;
        }
        Ok(())
    }

    /// The slot currently holding (layer, expert), if any.
    pub fn slot_of(&self, layer: u32, expert: u32) -> Result<Option<u32>> {
        let id = self.layout().id(layer, expert)?;
        Ok(self.shared.lock().pool().lookup(id))
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats().clone()
    }

    pub fn reset_stats(&self) {
        self.shared.lock().reset_stats();
    }

    fn ids(&self, layer: u32, experts: &[u32]) -> Result<Vec<ExpertId>> {
        let ids = experts
            .iter()
            .map(|&e| self.layout().id(layer, e))
            .collect::<Result<Vec<_>>>()?;
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(CoreError::Protocol(format!(
                "experts {experts:?} of layer {layer} name one expert twice"
            )));
        }
        Ok(ids)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CacheCore> {
        // State transitions complete before any call that could panic, so a
        // poisoned lock still guards consistent bookkeeping.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One copy worker: take the most urgent request, copy, mark ready.
    fn serve(&self, copier: &WorkerCopier) {
        while let Some(request) = self.queue.pop() {
            let Some(job) = self.lock().accept(request) else {
                continue; // stale: the expert arrived meanwhile, or not worth a slot
            };
            let dst = self.lock().pool().address(job.slot);
            // SAFETY: the host blob is `job.bytes` long and not written while
            // its expert holds a slot; the slot is at least that long and only
            // this worker writes it while it is in phase Copying.
            let outcome = unsafe {
                copier.copy(
                    &self.backend,
                    job.slot,
                    self.host.expert_ptr(job.expert),
                    dst,
                    job.bytes,
                    job.wait_for_reader,
                    self.queue.is_empty(),
                )
            };
            if let Ok(Some(took)) = outcome {
                lock(&self.timing).record_copy(job.bytes, took.as_secs_f64());
            }
            self.lock()
                .finish_copy(&job, outcome.map(drop).map_err(|e| e.to_string()));
            self.copied.notify_all();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Plans from the planner thread reach the cache: the policy learns the
/// retention scores, and the queue's stale prefetches make way for new ones.
fn apply_plans(shared: Arc<Shared>, depth: usize) -> ApplyPlan {
    Box::new(move |scores, prefetch| {
        shared.lock().plan(&shared.queue, scores, prefetch, depth);
    })
}

/// The tracer for a layout whose layers share one expert count, starting
/// from the saved EAMC at `config.eamc_path` when given.
fn tracer_for(layout: &ExpertLayout, config: &CacheConfig) -> Result<Option<LiveTracer>> {
    let experts = layout.experts_in_layer(0) as usize;
    let uniform =
        (0..layout.num_layers() as u32).all(|l| layout.experts_in_layer(l) as usize == experts);
    if !uniform {
        return Ok(None);
    }
    let layers = layout.num_layers();
    let planner = match &config.eamc_path {
        Some(path) if path.exists() => {
            let eamc = ActivationCollection::load(path)?;
            if (eamc.layers(), eamc.experts()) != (layers, experts) {
                return Err(CoreError::EamcFile {
                    path: path.display().to_string(),
                    reason: format!(
                        "it holds {}x{} activation matrices but this model has {layers} MoE layers of {experts} experts; \
                         use another eamc_path for this model",
                        eamc.layers(),
                        eamc.experts()
                    ),
                });
            }
            Planner::with_collection(eamc, config.planner.clone())?
        }
        _ => Planner::new(layers, experts, config.planner.clone())?,
    };
    Ok(Some(LiveTracer::new(planner)))
}

fn spawn_worker(shared: Arc<Shared>, index: usize) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("moe-offload-copy-{index}"))
        .spawn(
            move || match WorkerCopier::on_this_thread(&shared.backend) {
                Ok(copier) => shared.serve(&copier),
                Err(e) => fail_all(&shared, &e.to_string()),
            },
        )
}

/// A worker that cannot set itself up fails every request it takes, so
/// waiters get an error instead of hanging.
fn fail_all(shared: &Shared, reason: &str) {
    while let Some(request) = shared.queue.pop() {
        let mut state = shared.lock();
        if let Some(job) = state.accept(request) {
            state.finish_copy(&job, Err(reason.to_string()));
        }
        drop(state);
        shared.copied.notify_all();
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        // The planner thread holds the shared state: stop it first.
        self.planning.take();
        self.shared.queue.close();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
