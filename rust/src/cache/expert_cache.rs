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
//!
//! Fetches whose release never comes (a forward pass cut short by an
//! exception) are undone by `release_all(stream)`, which the caller runs when
//! it knows no fetch of its own is outstanding: at the start of an outermost
//! forward pass, whose turn [`ExpertCache::passes`] hands out one at a time.
//!
//! Behind the slots sits either the host tier holding every expert
//! ([`ExpertCache::new`]) or the expert store on disk read into a bounded
//! host cache ([`ExpertCache::with_store`]); the protocol is the same.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use moe_offload_cuda::Context;

use super::core::{CacheCore, CopyJob, ExecutionCosts, Placement};
use super::pass_gate::PassGate;
use super::policy_by_name;
use crate::copy::{CopyBackend, CopyTime, CudaCopies, WorkerCopier};
use crate::error::{CoreError, Result};
use crate::execution::{CpuCosts, CpuExperts};
use crate::layout::{ExpertId, ExpertLayout};
use crate::planner::{Planner, PlannerConfig};
use crate::queue::{CopyRequest, PrefetchQueue, Urgency};
use crate::stats::Stats;
use crate::tiers::device::{CopyFailure, Phase, SlotPool};
use crate::tiers::host::HostTier;
use crate::tiers::host_cache::{HostCacheStats, HostSlotId};
use crate::tiers::source::{ExpertSource, StoredExperts};
use crate::tiers::store::ExpertStore;
use crate::timing::TimingEstimate;
use crate::trace::live::{LiveTracer, LookaheadCounts};
use crate::trace::planning::{ApplyPlan, PlanningThread};
use crate::trace::ActivationCollection;

/// The most copy workers a cache starts. Copies are bound by the bus and
/// the disk, which a few workers keep busy (an NVMe queue is full with a few
/// dozen reads in flight); past that, each worker only costs a thread, a
/// stack and (on CUDA) a stream, and a typo like `2**40` must be refused
/// before any of them is made.
pub const MAX_COPY_WORKERS: usize = 256;

/// Where the slot pool lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// Host memory: copies are memcpy (no GPU needed).
    Host,
    /// Device memory of CUDA device `ordinal`, allocated in stream order on
    /// `pool_stream` (torch's current stream when it allocated the pool; 0
    /// is the legacy default stream): copies into the pool are ordered
    /// after that stream's work at the time the cache is made.
    Cuda { ordinal: i32, pool_stream: u64 },
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
    /// Where misses may run (see [`ExpertCache::place`]).
    pub cpu_experts: CpuExperts,
}

struct Shared {
    source: ExpertSource,
    state: Mutex<CacheCore>,
    copied: Condvar,
    queue: Arc<PrefetchQueue>,
    backend: CopyBackend,
    /// Measured copy and layer times, for the planner's cost model.
    timing: Mutex<TimingEstimate>,
    /// Measured times of experts run on the CPU, for placing misses.
    cpu_costs: Mutex<CpuCosts>,
    /// Preloads in progress (see [`ExpertCache::preload`]).
    staging: Mutex<Staging>,
    staged: Condvar,
}

/// Stage requests not yet served, and the first failure among them.
#[derive(Default)]
struct Staging {
    pending: usize,
    failure: Option<CoreError>,
}

/// The device expert cache, its copy workers and its planner thread.
pub struct ExpertCache {
    shared: Arc<Shared>,
    /// Request tracing and prefetch planning; `None` when layers differ in
    /// expert count (the EAMC needs one L×E shape). Stopped before the
    /// workers (see `Drop`).
    planning: Option<PlanningThread>,
    workers: CopyWorkers,
    passes: PassGate,
    cpu_experts: CpuExperts,
    /// Experts whose host bytes the CPU is reading (see
    /// [`host_acquire`](ExpertCache::host_acquire)).
    cpu_held: Mutex<Vec<CpuHold>>,
}

/// One expert the CPU reads from host memory: from the host tier, or from
/// a host cache slot pinned for it.
struct CpuHold {
    expert: ExpertId,
    host_slot: Option<HostSlotId>,
}

/// How a copy worker sets itself up, on its own thread (CUDA: binds the
/// context, makes its stream).
type WorkerSetup = fn(&CopyBackend) -> Result<WorkerCopier>;

/// Threads serving a prefetch queue. Dropping them closes the queue and
/// joins them, so a cache that fails halfway through its construction
/// leaves no thread behind.
struct CopyWorkers {
    queue: Arc<PrefetchQueue>,
    handles: Vec<JoinHandle<()>>,
}

impl CopyWorkers {
    /// Starts `n` threads with `spawn(index)`; on the first failure, stops
    /// and joins those already started and returns the error.
    fn start(
        queue: Arc<PrefetchQueue>,
        n: usize,
        mut spawn: impl FnMut(usize) -> std::io::Result<JoinHandle<()>>,
    ) -> Result<Self> {
        let mut workers = Self {
            queue,
            handles: Vec::with_capacity(n),
        };
        for index in 0..n {
            let handle = spawn(index).map_err(|e| {
                CoreError::InvalidConfig(format!(
                    "cannot start copy worker {} of {n}: {e}; use fewer copy workers",
                    index + 1
                ))
            })?;
            workers.handles.push(handle);
        }
        Ok(workers)
    }
}

impl Drop for CopyWorkers {
    fn drop(&mut self) {
        // Nobody will read what is merely predicted: let the workers finish
        // what was asked for and stop.
        self.queue
            .remove_if(|r| matches!(r.urgency, Urgency::Prefetch(_)));
        self.queue.close();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

impl ExpertCache {
    /// A cache whose host tier holds every expert (filled by `write_expert`).
    pub fn new(config: CacheConfig) -> Result<Self> {
        Self::build(config, resident, WorkerCopier::on_this_thread)
    }

    /// A cache reading experts from `store` into a host cache of
    /// `host_slots` slots; the store's layout must be `config.layers`.
    pub fn with_store(
        config: CacheConfig,
        store: Arc<ExpertStore>,
        host_slots: usize,
    ) -> Result<Self> {
        let source = |layout: &ExpertLayout, cuda: Option<&Arc<Context>>| {
            let same = store.layout().num_layers() == layout.num_layers()
                && (0..layout.num_layers() as u32).all(|l| {
                    store.layout().experts_in_layer(l) == layout.experts_in_layer(l)
                        && store
                            .layout()
                            .bytes(store.layout().id(l, 0).expect("l < layers"))
                            == layout.bytes(layout.id(l, 0).expect("l < layers"))
                });
            if !same {
                return Err(CoreError::Store {
                    path: store.root().display().to_string(),
                    reason: "holds experts of another shape than the model's".into(),
                });
            }
            Ok(StoredExperts::new(store, host_slots, cuda)?.into())
        };
        Self::build(config, source, WorkerCopier::on_this_thread)
    }

    /// Builds the cache; returns only once every copy worker has set itself
    /// up, and fails if any could not (the others are stopped and joined):
    /// a worker that cannot copy would fail requests that the others serve.
    fn build(
        config: CacheConfig,
        source: impl FnOnce(&ExpertLayout, Option<&Arc<Context>>) -> Result<ExpertSource>,
        setup: WorkerSetup,
    ) -> Result<Self> {
        let layout = ExpertLayout::new(&config.layers)?;
        if config.slot_bytes < layout.max_expert_bytes() {
            return Err(CoreError::InvalidConfig(format!(
                "slots of {} bytes cannot hold the largest expert ({} bytes)",
                config.slot_bytes,
                layout.max_expert_bytes()
            )));
        }
        if !(1..=MAX_COPY_WORKERS).contains(&config.copy_workers) {
            return Err(CoreError::InvalidConfig(format!(
                "copy_workers = {} is out of range: use 1 to {MAX_COPY_WORKERS} copy workers",
                config.copy_workers
            )));
        }
        let context = match config.device {
            Device::Host => None,
            Device::Cuda {
                ordinal,
                pool_stream,
            } => Some((Context::primary(ordinal)?, pool_stream)),
        };
        let source = source(&layout, context.as_ref().map(|(ctx, _)| ctx))?;
        let backend = match context {
            None => CopyBackend::Host,
            Some((ctx, pool_stream)) => {
                CopyBackend::Cuda(Arc::new(CudaCopies::new(ctx, config.n_slots, pool_stream)?))
            }
        };
        let pool = SlotPool::new(
            config.pool_address,
            config.slot_bytes,
            config.n_slots,
            layout.num_experts(),
        )?;
        let policy = policy_by_name(&config.policy, config.n_slots, layout.num_experts())?;
        let tracer = tracer_for(&layout, &config)?;
        let mut core = CacheCore::new(layout, pool, policy);
        if let CopyBackend::Cuda(cuda) = &backend {
            core = core.with_events(Arc::clone(cuda) as _);
        }
        let shared = Arc::new(Shared {
            timing: Mutex::new(TimingEstimate::new(matches!(backend, CopyBackend::Host))),
            cpu_costs: Mutex::new(CpuCosts::default()),
            source,
            state: Mutex::new(core),
            copied: Condvar::new(),
            queue: Arc::new(PrefetchQueue::new()),
            backend,
            staging: Mutex::new(Staging::default()),
            staged: Condvar::new(),
        });
        // Threads start last, after everything that can fail but their own
        // start; any failure from here on stops and joins what was started.
        let (report, set_up) = channel();
        let workers =
            CopyWorkers::start(Arc::clone(&shared.queue), config.copy_workers, |index| {
                spawn_worker(Arc::clone(&shared), index, setup, report.clone())
            })?;
        drop(report);
        for _ in 0..config.copy_workers {
            // A worker reports once, set up or not (a panic included).
            set_up.recv().map_err(|_| {
                CoreError::Protocol("a copy worker ended before reporting its set-up".into())
            })??;
        }
        // With a slot for every expert, or none, there is nothing to evict
        // or prefetch: requests are traced (the EAMC learns) but not planned.
        let every_expert_fits = config.n_slots >= shared.lock().layout().num_experts();
        let nothing_to_plan = every_expert_fits || config.n_slots == 0;
        let planning = match tracer {
            Some(tracer) => Some(PlanningThread::spawn(
                tracer,
                (!nothing_to_plan)
                    .then(|| apply_plans(Arc::clone(&shared), config.planner.prefetch_depth)),
            )?),
            None => None,
        };
        Ok(Self {
            shared,
            planning,
            workers,
            passes: PassGate::new(),
            cpu_experts: config.cpu_experts,
            cpu_held: Mutex::new(Vec::new()),
        })
    }

    pub fn layout(&self) -> &ExpertLayout {
        self.shared.source.layout()
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.shared.backend, CopyBackend::Cuda(_))
    }

    pub fn host_is_pinned(&self) -> bool {
        self.shared.source.is_pinned()
    }

    /// The store behind the host cache, when there is one.
    pub fn store(&self) -> Option<&ExpertStore> {
        match &self.shared.source {
            ExpertSource::Stored(stored) => Some(stored.store()),
            ExpertSource::Resident(_) => None,
        }
    }

    /// Slots of the host cache (0 when every expert is in the host tier).
    pub fn host_slots(&self) -> usize {
        match &self.shared.source {
            ExpertSource::Stored(stored) => stored.host_cache().len(),
            ExpertSource::Resident(_) => 0,
        }
    }

    /// The host cache's statistics, when a store backs the cache.
    pub fn host_stats(&self) -> Option<HostCacheStats> {
        match &self.shared.source {
            ExpertSource::Stored(stored) => Some(stored.stats()),
            ExpertSource::Resident(_) => None,
        }
    }

    /// Reads `experts` (layer, expert) from the store into the host cache
    /// on the copy workers, in the order given, and returns once all are
    /// in (or the cache is full); the first read error, if any. Nothing to
    /// do when every expert is in the host tier.
    pub fn preload(&self, experts: &[(u32, u32)]) -> Result<()> {
        let ids = experts
            .iter()
            .map(|&(layer, expert)| self.layout().id(layer, expert))
            .collect::<Result<Vec<_>>>()?;
        if matches!(self.shared.source, ExpertSource::Resident(_)) || ids.is_empty() {
            return Ok(());
        }
        lock(&self.shared.staging).pending += ids.len();
        for expert in ids {
            self.shared.queue.push(CopyRequest {
                expert,
                slot: None,
                urgency: Urgency::Stage,
            });
        }
        let mut staging = lock(&self.shared.staging);
        while staging.pending > 0 {
            staging = self
                .shared
                .staged
                .wait(staging)
                .unwrap_or_else(|e| e.into_inner());
        }
        staging.failure.take().map_or(Ok(()), Err)
    }

    pub fn n_slots(&self) -> usize {
        self.shared.lock().pool().len()
    }

    /// Copies `src` into expert (layer, expert)'s host blob at `offset`.
    /// Refused while the expert is in a slot, since a copy worker may be
    /// reading those bytes.
    pub fn write_expert(&self, layer: u32, expert: u32, offset: usize, src: &[u8]) -> Result<()> {
        let id = self.layout().id(layer, expert)?;
        let ExpertSource::Resident(host) = &self.shared.source else {
            return Err(CoreError::Protocol(
                "this cache reads its experts from an expert store; they cannot be written".into(),
            ));
        };
        self.layout().check_range(id, offset, src.len())?;
        // Holding the lock keeps any fetch of this expert out until done.
        let state = self.shared.lock();
        if state.pool().lookup(id).is_some() || lock(&self.cpu_held).iter().any(|h| h.expert == id)
        {
            return Err(CoreError::Protocol(format!(
                "expert {expert} of layer {layer} is in use (cached on the device, or being run on the \
                 CPU); its host bytes cannot change now"
            )));
        }
        // SAFETY: the range is inside the blob (checked above) and no copy
        // worker reads this blob: it is in no slot, and the lock we hold
        // keeps it out of any.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), host.expert_ptr(id).add(offset), src.len())
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
        self.layout().check_range(id, offset, dst.len())?;
        match &self.shared.source {
            ExpertSource::Resident(host) => {
                // Writers hold the lock; readers may share the bytes with copy workers.
                let _state = self.shared.lock();
                // SAFETY: the range is inside the blob, and nobody writes it while
                // we hold the lock (writes happen only under it).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        host.expert_ptr(id).add(offset),
                        dst.as_mut_ptr(),
                        dst.len(),
                    )
                };
                Ok(())
            }
            ExpertSource::Stored(stored) => stored.with_expert(id, |src| {
                // SAFETY: `src` starts the expert's loaded blob in a host slot
                // pinned for this call; the range is inside the blob.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.add(offset), dst.as_mut_ptr(), dst.len())
                };
                Ok(())
            }),
        }
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

    /// Where misses run: the mode the cache was built with.
    pub fn cpu_experts(&self) -> CpuExperts {
        self.cpu_experts
    }

    /// Decides where each of one layer's experts runs (see
    /// [`CacheCore::place`]; `tokens[i]` tokens are routed to `experts[i]`)
    /// and pins the slots of those that run from one now: `wait` for them
    /// and `release` them as after `fetch`. A `Cpu` expert's bytes come from
    /// [`host_acquire`](Self::host_acquire); a `Later` one is fetched once
    /// this call's slots are released.
    pub fn place(&self, layer: u32, experts: &[u32], tokens: &[u32]) -> Result<Vec<Placement>> {
        let ids = self.ids(layer, experts)?;
        let mode = match (self.cpu_experts, &self.shared.backend) {
            // The "device" is this processor: a copy only adds to running
            // the expert where it lies.
            (CpuExperts::Auto, CopyBackend::Host) => CpuExperts::Always,
            (mode, _) => mode,
        };
        let costs = self.execution_costs(layer)?;
        self.shared
            .lock()
            .place(&self.shared.queue, &ids, tokens, mode, costs.as_ref())
    }

    /// The measured costs of running one of `layer`'s experts on the CPU
    /// and of copying it; `None` until both were measured. The device's own
    /// run of a copied expert is taken as free: for a few tokens it is tens
    /// of microseconds on a GPU, against hundreds for the copy.
    fn execution_costs(&self, layer: u32) -> Result<Option<ExecutionCosts>> {
        let bytes = self.layout().bytes(self.layout().id(layer, 0)?);
        let Some((cpu_fixed_s, cpu_per_token_s)) = self.cpu_costs() else {
            return Ok(None);
        };
        let Some(copy_s) = lock(&self.shared.timing).copy_seconds(bytes) else {
            return Ok(None);
        };
        Ok(Some(ExecutionCosts {
            cpu_fixed_s,
            cpu_per_token_s,
            copy_s,
            device_s: 0.0,
            device_tail_s: 0.0,
            copy_backlog_s: None,
        }))
    }

    /// The CPU's measured costs per expert: `(cpu_fixed_s, cpu_per_token_s)`.
    pub fn cpu_costs(&self) -> Option<(f64, f64)> {
        lock(&self.shared.cpu_costs).estimate()
    }

    /// The CPU ran an expert for `tokens` tokens in `seconds`: a
    /// measurement for placing misses, and (with `count`) for `stats`.
    /// `tokens` 0: a time that is not one expert's (a whole layer run at
    /// once), counted in `stats` only.
    pub fn record_cpu(&self, tokens: u32, seconds: f64, count: bool) {
        lock(&self.shared.cpu_costs).record(tokens, seconds);
        if count && seconds.is_finite() && seconds > 0.0 {
            self.shared.lock().stats_mut().cpu_seconds += seconds;
        }
    }

    /// The host address of the expert's blob, held for the CPU to read
    /// until [`host_release`](Self::host_release) (or `release_all`): in
    /// the host tier, or in a host cache slot, read from the store first
    /// when absent, that is not reused while held.
    pub fn host_acquire(&self, layer: u32, expert: u32) -> Result<u64> {
        let id = self.layout().id(layer, expert)?;
        let (address, host_slot) = match &self.shared.source {
            ExpertSource::Resident(host) => (host.expert_ptr(id) as u64, None),
            ExpertSource::Stored(stored) => {
                let slot = stored.pin(id)?;
                (stored.host_cache().ptr(slot) as u64, Some(slot))
            }
        };
        // Under the state lock, which `write_expert` holds while it checks.
        let _state = self.shared.lock();
        lock(&self.cpu_held).push(CpuHold {
            expert: id,
            host_slot,
        });
        Ok(address)
    }

    /// Experts whose host bytes are held for the CPU now.
    pub fn host_held(&self) -> usize {
        lock(&self.cpu_held).len()
    }

    /// Lets go of an expert's host bytes taken by `host_acquire`.
    pub fn host_release(&self, layer: u32, expert: u32) -> Result<()> {
        let id = self.layout().id(layer, expert)?;
        let mut held = lock(&self.cpu_held);
        let Some(index) = held.iter().position(|h| h.expert == id) else {
            return Err(CoreError::Protocol(format!(
                "expert {expert} of layer {layer} is not held for the CPU (or already let go)"
            )));
        };
        let hold = held.swap_remove(index);
        drop(held);
        self.unpin_host(&hold);
        Ok(())
    }

    fn unpin_host(&self, hold: &CpuHold) {
        if let (ExpertSource::Stored(stored), Some(slot)) = (&self.shared.source, hold.host_slot) {
            stored.unpin(slot);
        }
    }

    /// The host memory every address from `host_acquire` lies in: its first
    /// byte and length (the host tier, or the host cache).
    pub fn host_region(&self) -> (u64, usize) {
        let (base, len) = match &self.shared.source {
            ExpertSource::Resident(host) => host.region(),
            ExpertSource::Stored(stored) => stored.host_cache().region(),
        };
        (base as u64, len)
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

    /// The next passes' token rows belong, in order, to the requests `keys`
    /// (`rows[i]` rows each), until the next layout or plain batch: a key not
    /// live yet begins a request, which stays live across passes until
    /// [`end_request`](Self::end_request). For continuous batching, where a
    /// pass packs several requests' tokens and requests come and go.
    pub fn set_layout(&self, keys: &[u64], rows: &[usize]) -> Result<()> {
        match &self.planning {
            Some(planning) => planning.set_layout(keys, rows),
            None => crate::trace::live::check_layout(keys, rows),
        }
    }

    /// Back to splitting rows equally among the plain batch's requests.
    pub fn clear_layout(&self) -> Result<()> {
        match &self.planning {
            Some(planning) => planning.clear_layout(),
            None => Ok(()),
        }
    }

    /// The keyed request `key` finished: its activation matrix joins the EAMC.
    pub fn end_request(&self, key: u64) -> Result<()> {
        match &self.planning {
            Some(planning) => planning.end_request(key),
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
        // The routing reached the host after the device ran the layers
        // before this one, so their streams' waits can be read now: booked
        // as stalls, not as compute.
        self.book_device_stalls();
        let stall_total = self.shared.lock().stats().stall_seconds;
        let timing = {
            let mut estimate = lock(&self.shared.timing);
            estimate.record_layer(layer as usize, Instant::now(), stall_total);
            estimate.timing(self.layout().max_expert_bytes())
        };
        planning.observe(layer as usize, ids.to_vec(), top_k, timing)
    }

    /// A router lookahead at `layer`: `ids` holds `depth` blocks of token
    /// rows (`top_k` ids each, batch-major, as `observe`), the experts that
    /// the routers of layers `layer + 1 ..= layer + depth` chose on this
    /// layer's hidden state. The planner weighs them into its predictions
    /// for those layers, and scores them against their routing (see
    /// [`lookahead_counts`](Self::lookahead_counts)). Hand it over before
    /// the layer's own routing, so that the plan after that uses it.
    pub fn lookahead(&self, layer: u32, ids: &[u32], top_k: usize, depth: usize) -> Result<()> {
        let Some(planning) = &self.planning else {
            return Ok(());
        };
        let layers = self.layout().num_layers();
        if depth == 0 || (layer as usize).saturating_add(depth) >= layers {
            return Err(CoreError::Protocol(format!(
                "a lookahead of depth {depth} at layer {layer} reaches past the last of {layers} \
                 MoE layers; look at most {} layers ahead from there",
                layers.saturating_sub(layer as usize + 1)
            )));
        }
        let rows_of_all = top_k.checked_mul(depth).filter(|&n| n > 0);
        if rows_of_all.is_none_or(|n| ids.is_empty() || ids.len() % n != 0) {
            return Err(CoreError::Protocol(format!(
                "{} lookahead ids of layer {layer} do not split into {depth} layers of rows of \
                 top_k = {top_k}",
                ids.len()
            )));
        }
        for (target, block) in (layer + 1..).zip(ids.chunks(ids.len() / depth)) {
            let experts = self.layout().experts_in_layer(target);
            if let Some(&bad) = block.iter().find(|&&e| e >= experts) {
                return Err(self.layout().id(target, bad).unwrap_err());
            }
        }
        planning.lookahead(layer as usize, ids.to_vec(), top_k, depth)
    }

    /// The router lookahead's agreement with the routing since the last
    /// reset, per (distance, target layer); empty without request tracing.
    pub fn lookahead_counts(&self) -> Result<Vec<((usize, usize), LookaheadCounts)>> {
        match &self.planning {
            Some(planning) => Ok(planning.settled()?.lookahead_counts()),
            None => Ok(Vec::new()),
        }
    }

    /// Clears [`lookahead_counts`](Self::lookahead_counts), once every
    /// routing handed over is scored.
    pub fn reset_lookahead_counts(&self) -> Result<()> {
        if let Some(planning) = &self.planning {
            planning.settled()?.reset_lookahead_counts();
        }
        Ok(())
    }

    /// Writes the EAMC (finished requests only) and the planner's affinity
    /// tables (every routing traced) to `path` atomically.
    pub fn save_eamc(&self, path: &Path) -> Result<()> {
        match &self.planning {
            Some(planning) => {
                let tracer = planning.settled()?;
                let (tables, values) = tracer.planner().affinity();
                tracer
                    .planner()
                    .collection()
                    .save_with_affinity(path, tables, values)
            }
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
                Phase::Failed(failure) => {
                    return Err(CoreError::CopyFailed {
                        layer,
                        expert,
                        reason: failure.reason.clone(),
                        from_store: failure.from_store,
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
            self.book_device_stalls();
        }
        Ok(())
    }

    /// Adds the waits of readers' streams for copies in flight that the
    /// device has got past to `stall_seconds` (nothing on the host backend,
    /// whose stalls are all on the caller's thread).
    fn book_device_stalls(&self) {
        if let CopyBackend::Cuda(cuda) = &self.shared.backend {
            let stalled = cuda.stalled_seconds();
            if stalled > 0.0 {
                self.shared.lock().stats_mut().stall_seconds += stalled;
            }
        }
    }

    /// Unpins the experts' slots; on CUDA they are not overwritten before
    /// `stream` passes this point.
    pub fn release(&self, layer: u32, experts: &[u32], stream: u64) -> Result<()> {
        let ids = self.ids(layer, experts)?;
        let mut state = self.shared.lock();
        let mut first_error = None;
        for &id in &ids {
            let slot = state.pinned_slot(id)?;
            if let Err(e) = self.reader_done(slot, stream) {
                // The slot stays pinned only if its reader cannot be waited
                // for at all; otherwise every expert is released and the
                // first error reported.
                first_error.get_or_insert(e);
                if self.reader_finished(stream).is_err() {
                    continue;
                }
            }
            state.release(id, self.is_cuda())?;
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Unpins every slot still held. For fetches whose release will never
    /// come: a forward pass cut short by an exception (a Ctrl-C can land
    /// between any two bytecodes, so the caller's `finally` is not enough).
    /// Only for a caller that knows no fetch still in use is outstanding (an
    /// outermost pass of [`passes`](Self::passes)). On CUDA, `stream` is the
    /// one the slots were read on, and the slots are reused only after its
    /// work so far. Returns how many pins were dropped.
    pub fn release_all(&self, stream: u64) -> Result<u32> {
        let held = std::mem::take(&mut *lock(&self.cpu_held));
        for hold in &held {
            self.unpin_host(hold);
        }
        let held = held.len() as u32;
        if self.free_slots() == self.n_slots() {
            return Ok(held);
        }
        // Readers that never recorded where they were done: the slots may
        // be overwritten once everything queued on their stream has run.
        self.reader_finished(stream)?;
        Ok(held + self.shared.lock().release_all(self.is_cuda()))
    }

    /// The model's forward passes, one at a time: the caller takes a turn
    /// for each pass and, in an outermost one, first calls
    /// [`release_all`](Self::release_all) (see [`PassGate`]).
    pub fn passes(&self) -> &PassGate {
        &self.passes
    }

    /// Copy worker threads running.
    pub fn copy_workers(&self) -> usize {
        self.workers.handles.len()
    }

    /// Slots that no fetch holds (all of them between forward passes).
    pub fn free_slots(&self) -> usize {
        self.shared.lock().free_slots()
    }

    fn reader_done(&self, slot: u32, stream: u64) -> Result<()> {
        match &self.shared.backend {
            CopyBackend::Cuda(cuda) => cuda.reader_done(slot, stream),
            CopyBackend::Host => Ok(()),
        }
    }

    fn reader_finished(&self, stream: u64) -> Result<()> {
        match &self.shared.backend {
            CopyBackend::Cuda(cuda) => cuda.reader_finished(stream),
            CopyBackend::Host => Ok(()),
        }
    }

    /// The slot currently holding (layer, expert), if any.
    pub fn slot_of(&self, layer: u32, expert: u32) -> Result<Option<u32>> {
        let id = self.layout().id(layer, expert)?;
        Ok(self.shared.lock().pool().lookup(id))
    }

    pub fn stats(&self) -> Stats {
        self.book_device_stalls();
        self.shared.lock().stats().clone()
    }

    /// Clears the statistics: the device cache's, and with `host` the host
    /// cache's too.
    pub fn reset_stats(&self, host: bool) {
        // Stalls from before the reset are not counted after it.
        self.book_device_stalls();
        self.shared.lock().reset_stats();
        if let ExpertSource::Stored(stored) = &self.shared.source {
            if host {
                stored.host_cache().reset_stats();
            }
        }
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
            if request.urgency == Urgency::Stage {
                self.preloaded(unless_panicked(|| self.preload_one(request.expert)));
                continue;
            }
            // None: stale (the expert arrived meanwhile) or not worth a slot.
            // Such a prefetch is not read into the host cache either: doing
            // so cost more disk reads than it saved (benches/store.py).
            let job = self.lock().accept(request);
            if let Some(job) = job {
                self.transfer(copier, &job);
            }
        }
    }

    /// Copies the job's expert into its slot (reading it from the store
    /// first when the host cache lacks it) and publishes the outcome.
    fn transfer(&self, copier: &WorkerCopier, job: &CopyJob) {
        // A panic fails this copy like any error: its waiters are told, the
        // slot is given back, and the worker goes on serving.
        let outcome = unless_panicked(|| self.copy(copier, job));
        if let Ok(measured) = &outcome {
            let mut timing = lock(&self.timing);
            for &(bytes, seconds) in measured {
                timing.record_copy(bytes, seconds);
            }
        }
        self.lock()
            .finish_copy(job, outcome.map(drop).map_err(|e| CopyFailure::from(&e)));
        self.copied.notify_all();
    }

    /// Copies the job's expert into its slot; returns the copy times that
    /// became known (see [`WorkerCopier::copy`]).
    fn copy(&self, copier: &WorkerCopier, job: &CopyJob) -> Result<Vec<CopyTime>> {
        let dst = self.lock().pool().address(job.slot);
        match &self.source {
            // SAFETY: the slot is at least `job.bytes` long and only this
            // worker writes it while it is in phase Copying; the host tier's
            // blob holds `job.bytes` bytes and is not written while its
            // expert holds a slot, so the copy need not land before the
            // worker goes on.
            ExpertSource::Resident(host) => unsafe {
                copier.copy(
                    &self.backend,
                    job.slot,
                    host.expert_ptr(job.expert),
                    dst,
                    job.bytes,
                    false,
                )
            },
            ExpertSource::Stored(stored) => {
                // The host slot must stay pinned until the copy lands, which
                // is after the device slot's last reader: wait for the
                // reader first, holding nothing the other workers need.
                if let (CopyBackend::Cuda(cuda), true) = (&self.backend, job.wait_for_reader) {
                    cuda.wait_for_reader(job.slot)?;
                }
                self.copy_stored(stored, copier, job, dst)
            }
        }
    }

    /// Copies the job's expert from the host cache (read from the store
    /// first when it is not there) into its slot at `dst`.
    fn copy_stored(
        &self,
        stored: &StoredExperts,
        copier: &WorkerCopier,
        job: &CopyJob,
        dst: u64,
    ) -> Result<Vec<CopyTime>> {
        stored.with_expert(job.expert, |src| {
            // SAFETY: the slot is at least `job.bytes` long and only this
            // worker writes it while it is in phase Copying; `src` starts the
            // expert's loaded blob (at least `job.bytes` long) in a host slot
            // that stays pinned, so unwritten, until this closure returns,
            // and it returns only once the copy has landed.
            unsafe { copier.copy(&self.backend, job.slot, src, dst, job.bytes, true) }
        })
    }

    /// Reads one expert of a [`preload`](ExpertCache::preload) into the
    /// host cache.
    fn preload_one(&self, expert: ExpertId) -> Result<()> {
        match &self.source {
            ExpertSource::Stored(stored) => stored.stage(expert),
            ExpertSource::Resident(_) => Ok(()),
        }
    }

    /// One stage request of a [`preload`](ExpertCache::preload) was served.
    fn preloaded(&self, outcome: Result<()>) {
        let mut staging = lock(&self.staging);
        staging.pending -= 1;
        if let Err(e) = outcome {
            staging.failure.get_or_insert(e);
        }
        drop(staging);
        self.staged.notify_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `work`'s outcome, with a panic turned into an error, so that whoever
/// waits for that outcome is told instead of waiting forever.
fn unless_panicked<T>(work: impl FnOnce() -> Result<T>) -> Result<T> {
    // Unwind safety: the state a copy touches is behind mutexes whose
    // transitions complete before anything that could panic, and poisoned
    // locks are taken over (see `Shared::lock`).
    catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(CoreError::Protocol(format!(
            "a copy worker panicked: {message}"
        )))
    })
}

/// Plans from the planner thread reach the cache: the policy learns the
/// retention scores, and the queue's stale prefetches make way for new ones.
fn apply_plans(shared: Arc<Shared>, depth: usize) -> ApplyPlan {
    Box::new(move |scores, prefetch, gated| {
        shared
            .lock()
            .plan_gated(&shared.queue, scores, prefetch, depth, gated);
    })
}

/// The tracer for a layout whose layers share one expert count, starting
/// from the saved EAMC (and the planner's tables saved with it) at
/// `config.eamc_path` when given.
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

/// The host tier for [`ExpertCache::new`].
fn resident(layout: &ExpertLayout, cuda: Option<&Arc<Context>>) -> Result<ExpertSource> {
    Ok(ExpertSource::Resident(HostTier::new(layout.clone(), cuda)?))
}

/// Starts copy worker `index`: it sets itself up with `setup`, sends the
/// outcome to `report`, and serves the queue if that went well (a worker
/// that failed ends: the cache is not built).
fn spawn_worker(
    shared: Arc<Shared>,
    index: usize,
    setup: WorkerSetup,
    report: Sender<Result<()>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("moe-offload-copy-{index}"))
        .spawn(move || {
            let copier = match unless_panicked(|| setup(&shared.backend)) {
                Ok(copier) => copier,
                Err(e) => {
                    let _ = report.send(Err(e));
                    return;
                }
            };
            let _ = report.send(Ok(()));
            drop(report);
            shared.serve(&copier);
        })
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        // The planner thread queues prefetches: stop it first; the workers
        // are stopped and joined when the `workers` field drops, after this.
        self.planning.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_config(copy_workers: usize, pool: &[u8]) -> CacheConfig {
        CacheConfig {
            layers: vec![(2, 100)],
            pool_address: pool.as_ptr() as u64,
            slot_bytes: 4096,
            n_slots: 1,
            device: Device::Host,
            copy_workers,
            policy: "lru".into(),
            budget_bytes: 4096,
            planner: PlannerConfig::default(),
            eamc_path: None,
            cpu_experts: CpuExperts::Never,
        }
    }

    #[test]
    fn copy_workers_out_of_range_are_refused_before_any_thread_starts() {
        let pool = vec![0u8; 4096];
        for workers in [0, MAX_COPY_WORKERS + 1, 1 << 40] {
            let error = ExpertCache::new(host_config(workers, &pool))
                .err()
                .expect("refused")
                .to_string();
            assert!(
                error.contains(&format!("copy_workers = {workers}")) && error.contains("1 to 256"),
                "{error}"
            );
        }
        let cache = ExpertCache::new(host_config(MAX_COPY_WORKERS, &pool)).unwrap();
        assert_eq!(cache.copy_workers(), MAX_COPY_WORKERS);
    }

    #[test]
    fn a_failed_start_stops_and_joins_the_workers_already_started() {
        let queue = Arc::new(PrefetchQueue::new());
        let alive = Arc::new(());
        let started = CopyWorkers::start(Arc::clone(&queue), 5, |index| {
            if index == 3 {
                return Err(std::io::Error::other("no more threads"));
            }
            let (queue, alive) = (Arc::clone(&queue), Arc::clone(&alive));
            std::thread::Builder::new().spawn(move || {
                let _alive = alive;
                while queue.pop().is_some() {}
            })
        });
        let error = started.err().expect("the fourth start fails").to_string();
        assert!(
            error.contains("copy worker 4 of 5") && error.contains("no more threads"),
            "{error}"
        );
        assert_eq!(
            Arc::strong_count(&alive),
            1,
            "every started worker is joined"
        );
    }

    #[test]
    fn a_copy_worker_that_cannot_set_up_fails_the_cache() {
        // The second of three workers cannot set itself up (on CUDA: no
        // stream, no event); the other two could serve, but the cache is
        // refused rather than left to fail that worker's requests.
        static SET_UPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn second_fails(backend: &CopyBackend) -> Result<WorkerCopier> {
            match SET_UPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                1 => Err(CoreError::InvalidConfig("no stream for this worker".into())),
                _ => WorkerCopier::on_this_thread(backend),
            }
        }
        let pool = vec![0u8; 4096];
        let error = ExpertCache::build(host_config(3, &pool), resident, second_fails)
            .err()
            .expect("a worker's failed set-up fails the cache")
            .to_string();
        assert!(error.contains("no stream for this worker"), "{error}");
        assert_eq!(SET_UPS.load(std::sync::atomic::Ordering::SeqCst), 3);
        // A set-up that panics is a failure too, not a hang.
        let error = ExpertCache::build(host_config(2, &pool), resident, |_| {
            panic!("driver exploded")
        })
        .err()
        .expect("a panicking set-up fails the cache")
        .to_string();
        assert!(error.contains("driver exploded"), "{error}");
    }

    #[test]
    fn a_panicking_copy_wakes_its_waiters_and_the_worker_goes_on() {
        let pool = vec![0u8; 4096];
        let cache = Arc::new(
            ExpertCache::build(host_config(1, &pool), resident, |_| {
                Ok(WorkerCopier::Panics)
            })
            .unwrap(),
        );
        for expert in [0, 1] {
            cache.fetch(0, &[expert]).unwrap();
            // Two threads wait for the same copy; the copy panics.
            let (done, outcomes) = std::sync::mpsc::channel();
            for _ in 0..2 {
                let (cache, done) = (Arc::clone(&cache), done.clone());
                std::thread::spawn(move || {
                    done.send(cache.wait(0, expert, 0).map_err(|e| e.to_string()))
                });
            }
            for _ in 0..2 {
                // A generous bound that only a hang reaches: a waiter left
                // blocked fails the test instead of hanging the suite.
                let outcome = outcomes
                    .recv_timeout(std::time::Duration::from_secs(120))
                    .expect("a waiter of a panicked copy was never woken");
                let error = outcome.unwrap_err();
                assert!(
                    error.contains("panicked") && error.contains("blew up"),
                    "{error}"
                );
            }
            // The failed slot is given back on release, and the same worker
            // serves (and fails) the next expert's copy.
            cache.release(0, &[expert], 0).unwrap();
        }
        assert_eq!(cache.free_slots(), 1);
    }

    #[test]
    fn a_panic_becomes_an_error_for_whoever_waits() {
        let outcome: Result<()> = unless_panicked(|| panic!("slot {} exploded", 3));
        let error = outcome.unwrap_err().to_string();
        assert!(error.contains("panicked: slot 3 exploded"), "{error}");
    }
}
