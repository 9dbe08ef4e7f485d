//! [`CacheCore`]: the cache's bookkeeping without threads or memory — slot
//! pool, policy, statistics and the rules for admitting copies. The threaded
//! [`ExpertCache`](super::ExpertCache) runs it under a mutex with real copy
//! workers; the trace replay runs it on a simulated clock. Same decisions,
//! one implementation.
//!
//! On CUDA a slot's copy is finished, for the bookkeeping, once it is
//! queued on a copy stream; whether it has landed, and whether a slot's last
//! reader is done with it, only the device knows. [`SlotEvents`] is how the
//! core asks, so that the decisions that hang on it (a hit or a late copy;
//! which victim) are the same code whatever answers.

use std::sync::Arc;

use moe_offload_cuda::EventState;

use super::CachePolicy;
use crate::error::{CoreError, Result};
use crate::execution::{split_misses, CostModel, CpuExperts, Miss};
use crate::layout::{ExpertId, ExpertLayout};
use crate::queue::{CopyRequest, PrefetchQueue, Urgency};
use crate::stats::Stats;
use crate::tiers::device::{CopyFailure, Phase, SlotId, SlotPool};

/// A copy a worker must perform now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CopyJob {
    pub expert: ExpertId,
    pub slot: SlotId,
    pub bytes: usize,
    /// The slot was read since its last copy: wait for that reader first.
    pub wait_for_reader: bool,
}

/// What the device says about a slot's events: its last copy's (the
/// *ready* event) and its last reader's (the *free* event). A query that
/// fails counts as pending: the slot is then treated as not there yet (its
/// reader reports the error when it waits) or still read.
pub trait SlotEvents: Send + Sync {
    fn copy_state(&self, slot: SlotId) -> EventState;
    fn reader_state(&self, slot: SlotId) -> EventState;
}

/// Copies and readers that are done once the bookkeeping says so: the host
/// backend's memcpy, and the trace replay.
pub struct Synchronous;

impl SlotEvents for Synchronous {
    fn copy_state(&self, _slot: SlotId) -> EventState {
        EventState::Complete
    }

    fn reader_state(&self, _slot: SlotId) -> EventState {
        EventState::Complete
    }
}

/// Where one expert of a layer runs (see [`CacheCore::place`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// From this device slot, pinned: wait for it, run it, release it.
    Slot(SlotId),
    /// On the CPU, from the expert's bytes in host memory.
    Cpu,
    /// From a device slot, fetched once the layer's pinned slots are
    /// released: the pool cannot hold it beside them.
    Later,
}

/// The measured rates behind a layer's [`CostModel`], in seconds: the
/// caller's estimates (the live cache's running averages, or the lab's
/// settings). The copy backlog and the device's busy time come from the
/// core's state at the moment of the decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExecutionCosts {
    pub cpu_fixed_s: f64,
    pub cpu_per_token_s: f64,
    /// One expert's copy.
    pub copy_s: f64,
    /// One expert's run on the device.
    pub device_s: f64,
    /// Device work after the copied experts (see [`CostModel`]).
    pub device_tail_s: f64,
    /// Copies queued or running ahead of this layer's, in seconds; `None`:
    /// the core counts its slots still waiting for a copy, `copy_s` each.
    pub copy_backlog_s: Option<f64>,
}

/// The prefetch cost gate's rates, in seconds (the lab's settings, or the
/// live cache's measurements).
///
/// A prefetch expected to be used with probability `p` saves `p` whole
/// on-demand copies (it lands before its layer starts: the planner aims
/// only at layers a copy can reach). It costs, right or wrong, the
/// on-demand copy time it delays: the copy engine does not preempt a
/// running copy, so the next layer's on-demand copies wait for what is
/// left of it, up to a whole copy; and it costs the expected hits of the
/// expert it evicts, each of which becomes an on-demand copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefetchGate {
    pub copy_s: f64,
    pub layer_s: f64,
    /// Copies take the processor that computes (memcpy on the host
    /// backend): every copy delays the model by its whole time.
    pub copies_compete: bool,
    /// Copies go in chunks of this many seconds, and an on-demand copy
    /// waits for a running prefetch's chunk only; `None`: whole copies.
    pub chunk_s: Option<f64>,
}

impl PrefetchGate {
    /// The on-demand copy time that the `position`-th prefetch of a plan
    /// (0: the first) can delay. The prefetches of a plan run back to back
    /// from the start of the layer's compute; the next layer's on-demand
    /// copies arrive `layer_s` later and wait for the one running then.
    /// Copies that compete with the compute delay it by their whole time.
    pub fn delay(&self, position: usize) -> f64 {
        if self.copies_compete {
            return self.copy_s;
        }
        let overlap = ((position + 1) as f64 * self.copy_s - self.layer_s).clamp(0.0, self.copy_s);
        self.chunk_s.map_or(overlap, |chunk| overlap.min(chunk))
    }

    /// What a prefetch used with probability `p`, `position`-th in its
    /// plan, is expected to cost before its victim: the delay it causes.
    /// A copy that competes with the compute and turns out right takes the
    /// time its on-demand copy would have taken, so only a wrong one
    /// (probability 1 - p) costs its time.
    pub fn cost(&self, p: f64, position: usize) -> f64 {
        if self.copies_compete {
            (1.0 - p) * self.copy_s
        } else {
            self.delay(position)
        }
    }

    /// Whether a prefetch used with probability `p`, `position`-th in its
    /// plan, evicting an expert with `victim_hits` expected hits, is
    /// expected to save more than it costs.
    pub fn admits(&self, p: f64, position: usize, victim_hits: f64) -> bool {
        p * self.copy_s > self.cost(p, position) + victim_hits * self.copy_s
    }
}

/// A prefetch a gated plan queued: its use probability and its place.
#[derive(Debug, Clone, Copy)]
struct Planned {
    expert: ExpertId,
    probability: f32,
    position: usize,
}

/// A gated plan's inputs (see [`CacheCore::plan_gated`]).
pub struct Gated<'a> {
    pub gate: PrefetchGate,
    /// Per expert id, the probability that its next predicted use happens
    /// (the expected hits an expert kept until then earns).
    pub use_probability: &'a [f32],
}

pub struct CacheCore {
    layout: ExpertLayout,
    pool: SlotPool,
    policy: Box<dyn CachePolicy>,
    stats: Stats,
    resident_bytes: u64,
    reader_pending: Vec<bool>,
    /// The slot's expert arrived by prefetch and has not been used yet.
    prefetched: Vec<bool>,
    events: Arc<dyn SlotEvents>,
    /// The slot's current copy has been seen landed (it stays so until the
    /// slot takes another expert): the device is asked once per copy.
    landed: Vec<bool>,
    /// The gate of the last gated plan, the prefetches it queued and every
    /// expert's use probability; `None`: plans weigh prefetches only by
    /// the policy's retention.
    gate: Option<PrefetchGate>,
    planned: Vec<Planned>,
    use_probability: Vec<f32>,
    /// The slot holds a prefetched expert whose predicted use has not come
    /// yet: no eviction takes it (see [`choose_slot`](Self::choose_slot)).
    protected: Vec<bool>,
    /// Per layer, the (slot, expert) pairs protected until that layer is
    /// next fetched.
    protected_in_layer: Vec<Vec<(SlotId, ExpertId)>>,
    /// The layer of the last fetch.
    last_layer: usize,
}

impl CacheCore {
    pub fn new(layout: ExpertLayout, pool: SlotPool, policy: Box<dyn CachePolicy>) -> Self {
        let n = pool.len();
        let stats = Stats::new(layout.num_layers());
        let layers = layout.num_layers();
        Self {
            layout,
            pool,
            policy,
            stats,
            resident_bytes: 0,
            reader_pending: vec![false; n],
            prefetched: vec![false; n],
            events: Arc::new(Synchronous),
            landed: vec![false; n],
            gate: None,
            planned: Vec::new(),
            use_probability: Vec::new(),
            protected: vec![false; n],
            protected_in_layer: vec![Vec::new(); layers],
            last_layer: 0,
        }
    }

    /// The same core, asking `events` whether copies have landed and
    /// readers are done (CUDA).
    pub fn with_events(self, events: Arc<dyn SlotEvents>) -> Self {
        Self { events, ..self }
    }

    pub fn layout(&self) -> &ExpertLayout {
        &self.layout
    }

    pub fn pool(&self) -> &SlotPool {
        &self.pool
    }

    pub fn policy(&self) -> &dyn CachePolicy {
        self.policy.as_ref()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn reset_stats(&mut self) {
        self.stats.reset(self.resident_bytes);
    }

    pub fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// Pins a slot for each expert, queueing on-demand copies for those not
    /// cached. All or nothing: fails without side effects when the pool
    /// cannot hold them at once.
    pub fn fetch(&mut self, queue: &PrefetchQueue, ids: &[ExpertId]) -> Result<Vec<SlotId>> {
        let missing = ids
            .iter()
            .filter(|&&id| self.pool.lookup(id).is_none())
            .count();
        // A hit on an idle slot pins it, so that slot cannot take a miss.
        let reused = ids
            .iter()
            .filter_map(|&id| self.pool.lookup(id))
            .filter(|&slot| self.pool.pins(slot) == 0 && self.pool.phase(slot) == &Phase::Ready)
            .count();
        let available = self.pool.available() - reused;
        if missing > available {
            return Err(CoreError::BudgetTooSmall {
                needed: missing,
                available,
                min_bytes: (self.pool.len() - available + missing) * self.pool.slot_bytes(),
            });
        }
        self.end_protection(ids);
        // Hits are pinned first, so that no miss of the same call takes the
        // slot of an expert named after it; the policy still hears of every
        // expert in the order given (the oracle counts its place that way).
        let hits: Vec<Option<SlotId>> = ids.iter().map(|&id| self.pool.lookup(id)).collect();
        for &slot in hits.iter().flatten() {
            self.pool.pin(slot);
        }
        let mut slots = Vec::with_capacity(ids.len());
        for (&id, hit) in ids.iter().zip(hits) {
            slots.push(match hit {
                Some(slot) => self.reuse(queue, slot, id),
                None => self.admit_on_demand(queue, id),
            });
        }
        Ok(slots)
    }

    /// Decides where each of one layer's experts runs and pins the slots of
    /// those that run from one now. `tokens[i]` is the number of tokens
    /// routed to `ids[i]`.
    ///
    /// An expert in a slot (landed, or with its copy on the way) is a hit
    /// and runs from it. The misses go by `mode`: `Never` copies them all;
    /// `Always` runs them all on the CPU; `Auto` splits them with
    /// [`split_misses`] from `costs` (copying them all while `costs` is
    /// unknown). A cache without slots runs every expert on the CPU. Copies
    /// the pool cannot hold beside the pinned slots are placed `Later`.
    ///
    /// A miss run on the CPU counts as a miss and in `cpu_experts`; it is
    /// also queued as a background copy, after every prefetch, which the
    /// policy turns down when the slot's expert is worth more (see
    /// [`accept`](Self::accept)). Such copies never take a pinned slot, so
    /// an expert in use is never evicted by one.
    pub fn place(
        &mut self,
        queue: &PrefetchQueue,
        ids: &[ExpertId],
        tokens: &[u32],
        mode: CpuExperts,
        costs: Option<&ExecutionCosts>,
    ) -> Result<Vec<Placement>> {
        if ids.len() != tokens.len() {
            return Err(CoreError::Protocol(format!(
                "{} experts but {} token counts: one count per expert",
                ids.len(),
                tokens.len()
            )));
        }
        let mut placements = vec![Placement::Later; ids.len()];
        let resident: Vec<bool> = ids
            .iter()
            .map(|&id| self.pool.lookup(id).is_some())
            .collect();
        let misses: Vec<Miss> = (0..ids.len())
            .filter(|&i| !resident[i])
            .map(|i| Miss {
                expert: i as ExpertId,
                tokens: tokens[i],
            })
            .collect();
        let hits = ids.len() - misses.len();
        let to_copy: Vec<usize> = match (mode, costs) {
            _ if self.pool.is_empty() => Vec::new(),
            (CpuExperts::Never, _) | (CpuExperts::Auto, None) => {
                misses.iter().map(|m| m.expert as usize).collect()
            }
            (CpuExperts::Always, _) => Vec::new(),
            (CpuExperts::Auto, Some(costs)) => {
                let model = self.cost_model(costs, hits);
                let split = split_misses(&misses, &model)?;
                split.copy().iter().map(|m| m.expert as usize).collect()
            }
        };
        let mut copied = vec![false; ids.len()];
        for &i in &to_copy {
            copied[i] = true;
        }
        // Hits first, then as many copies as the pool can take beside them.
        let room = self.room_beside(ids, &resident);
        let mut now: Vec<usize> = (0..ids.len()).filter(|&i| resident[i]).collect();
        now.extend(to_copy.iter().copied().take(room));
        let now_ids: Vec<ExpertId> = now.iter().map(|&i| ids[i]).collect();
        for (&i, slot) in now.iter().zip(self.fetch(queue, &now_ids)?) {
            placements[i] = Placement::Slot(slot);
        }
        for (i, &id) in ids.iter().enumerate() {
            if !resident[i] && !copied[i] {
                placements[i] = Placement::Cpu;
                self.run_on_cpu(queue, id);
            }
        }
        Ok(placements)
    }

    /// The layer's cost model: `costs`, with the backlog and the device's
    /// busy time (its `hits` experts) from the state now.
    fn cost_model(&self, costs: &ExecutionCosts, hits: usize) -> CostModel {
        let waiting = self.copies_in_flight() as f64;
        CostModel {
            cpu_fixed_s: costs.cpu_fixed_s,
            cpu_per_token_s: costs.cpu_per_token_s,
            copy_s: costs.copy_s,
            copy_backlog_s: costs.copy_backlog_s.unwrap_or(waiting * costs.copy_s),
            device_s: costs.device_s,
            device_busy_s: hits as f64 * costs.device_s,
            device_tail_s: costs.device_tail_s,
        }
    }

    /// How many misses the pool can take now beside the hits among `ids`
    /// (`resident[i]`: `ids[i]` is in a slot), as [`fetch`](Self::fetch)
    /// counts them.
    fn room_beside(&self, ids: &[ExpertId], resident: &[bool]) -> usize {
        let reused = ids
            .iter()
            .zip(resident)
            .filter(|&(_, &r)| r)
            .filter_map(|(&id, _)| self.pool.lookup(id))
            .filter(|&slot| self.pool.pins(slot) == 0 && self.pool.phase(slot) == &Phase::Ready)
            .count();
        self.pool.available() - reused
    }

    /// Books a miss run on the CPU and queues its background copy (unless
    /// one is queued for it already, or a pool's worth are waiting).
    fn run_on_cpu(&mut self, queue: &PrefetchQueue, id: ExpertId) {
        self.stats.record_miss(self.layout.locate(id).0);
        self.stats.cpu_experts += 1;
        if self.pool.is_empty() {
            return;
        }
        let mut queued_for_it = false;
        let waiting = queue.count_if(|r| {
            let background = r.urgency == Urgency::Background;
            queued_for_it |= background && r.expert == id;
            background
        });
        if !queued_for_it && waiting < self.pool.len() {
            queue.push(CopyRequest {
                expert: id,
                slot: None,
                urgency: Urgency::Background,
            });
        }
    }

    /// A hit on `slot`, which the caller has pinned.
    fn reuse(&mut self, queue: &PrefetchQueue, slot: SlotId, id: ExpertId) -> SlotId {
        self.policy.on_access(slot, id);
        let by_prefetch = std::mem::take(&mut self.prefetched[slot as usize]);
        let layer = self.layout.locate(id).0;
        // A copy still in flight on the device is a miss (the reader's
        // stream will wait for it), and a prefetch that late is late.
        if self.pool.phase(slot) == &Phase::Ready && self.has_landed(slot) {
            self.stats.record_hit(layer);
            self.stats.prefetch_hits += u64::from(by_prefetch);
        } else {
            self.stats.record_miss(layer);
            self.stats.prefetch_late += u64::from(by_prefetch);
            if self.pool.phase(slot) == &Phase::Queued {
                queue.promote(id);
            }
        }
        slot
    }

    /// The layers of `ids` are being fetched: the prefetches predicted for
    /// them are used now or were wrong, and lose their protection.
    fn end_protection(&mut self, ids: &[ExpertId]) {
        for &id in ids {
            let layer = self.layout.locate(id).0;
            self.last_layer = layer as usize;
            for (slot, expert) in std::mem::take(&mut self.protected_in_layer[layer as usize]) {
                if self.pool.expert_in(slot) == Some(expert) {
                    self.protected[slot as usize] = false;
                }
            }
        }
    }

    /// Whether the copy into a ready slot has landed on the device.
    fn has_landed(&mut self, slot: SlotId) -> bool {
        let landed = &mut self.landed[slot as usize];
        if !*landed {
            *landed = !self.events.copy_state(slot).is_pending();
        }
        *landed
    }

    /// The slot a newcomer takes (see [`SlotPool::choose_slot`]): victims
    /// whose last reader the device has not finished, and prefetched
    /// experts before the layer they were fetched for, are passed over (a
    /// few at most: then the policy's first choice goes).
    fn choose_slot(&mut self) -> Option<SlotId> {
        let (events, protected) = (&self.events, &self.protected);
        self.pool.choose_slot(self.policy.as_mut(), &mut |slot| {
            protected[slot as usize] || events.reader_state(slot).is_pending()
        })
    }

    fn admit_on_demand(&mut self, queue: &PrefetchQueue, id: ExpertId) -> SlotId {
        let slot = self
            .choose_slot()
            .expect("fetch checked that enough slots are available");
        self.install(slot, id);
        self.stats.record_miss(self.layout.locate(id).0);
        queue.push(CopyRequest {
            expert: id,
            slot: Some(slot),
            urgency: Urgency::OnDemand,
        });
        slot
    }

    fn install(&mut self, slot: SlotId, id: ExpertId) {
        let assignment = self.pool.install(slot, id, self.policy.as_mut());
        self.landed[slot as usize] = false;
        self.protected[slot as usize] = false;
        if let Some(old) = assignment.evicted {
            self.stats.evictions += 1;
            self.resident_bytes -= self.layout.bytes(old) as u64;
            if std::mem::take(&mut self.prefetched[slot as usize]) {
                self.stats.prefetch_wasted += 1;
            }
        }
        self.resident_bytes += self.layout.bytes(id) as u64;
        self.stats.peak_resident_bytes = self.stats.peak_resident_bytes.max(self.resident_bytes);
    }

    /// A new plan: the policy learns the scores, the queue's stale
    /// prefetches are dropped, and the first `depth` experts of `prefetch`
    /// (best first) that are not cached are queued.
    pub fn plan(
        &mut self,
        queue: &PrefetchQueue,
        scores: &[f32],
        prefetch: &[(ExpertId, f32)],
        depth: usize,
    ) {
        self.plan_gated(queue, scores, prefetch, depth, None);
    }

    /// As [`plan`](Self::plan), with the cost gate: a candidate is queued
    /// only if its expected saving beats the on-demand time it can delay
    /// at its place in the plan, and it takes a slot (when a copy engine
    /// gets to it) only if that also beats the evicted expert's expected
    /// hits (see [`PrefetchGate`]).
    pub fn plan_gated(
        &mut self,
        queue: &PrefetchQueue,
        scores: &[f32],
        prefetch: &[(ExpertId, f32)],
        depth: usize,
        gated: Option<Gated>,
    ) {
        self.policy.on_plan(scores);
        queue.remove_if(|r| matches!(r.urgency, Urgency::Prefetch(_)));
        self.planned.clear();
        self.gate = gated.as_ref().map(|g| g.gate);
        if let Some(g) = &gated {
            self.use_probability.clear();
            self.use_probability.extend_from_slice(g.use_probability);
        }
        if !self.policy.prefetches() {
            return;
        }
        let missing = prefetch
            .iter()
            .filter(|(e, _)| self.pool.lookup(*e).is_none());
        let mut position = 0;
        for &(expert, score) in missing {
            if position == depth {
                break;
            }
            if let Some(gate) = self.gate {
                let probability = self.probability_of(expert);
                // Before any victim is known, the delay alone must be beaten.
                if !gate.admits(f64::from(probability), position, 0.0) {
                    continue;
                }
                self.planned.push(Planned {
                    expert,
                    probability,
                    position,
                });
            }
            queue.push(CopyRequest {
                expert,
                slot: None,
                urgency: Urgency::Prefetch(score),
            });
            position += 1;
        }
    }

    /// Whether `victim`'s layer comes (after the one last fetched) before
    /// `expert`'s: only then does evicting it for `expert` lose its next
    /// hit. Otherwise `expert` is needed first, and once used it competes
    /// for its slot as any cached expert does (Belady's rule).
    fn used_before(&self, victim: ExpertId, expert: ExpertId) -> bool {
        let layers = self.layout.num_layers();
        let ahead = |id: ExpertId| {
            let layer = self.layout.locate(id).0 as usize;
            // The current layer's own experts are next used a token later.
            match (layer + layers - self.last_layer % layers) % layers {
                0 => layers,
                d => d,
            }
        };
        ahead(victim) < ahead(expert)
    }

    /// The last gated plan's use probability of `expert` (0 if unknown).
    fn probability_of(&self, expert: ExpertId) -> f32 {
        self.use_probability
            .get(expert as usize)
            .copied()
            .unwrap_or(0.0)
    }

    /// Whether the gate lets the planned prefetch of `expert` evict
    /// `victim` (`None`: a free slot). Without a gated plan, or for a
    /// prefetch it did not plan, only the policy's retention decides.
    fn gate_admits(&self, expert: ExpertId, victim: Option<ExpertId>) -> bool {
        let (Some(gate), Some(planned)) =
            (self.gate, self.planned.iter().find(|p| p.expert == expert))
        else {
            return true;
        };
        let lost = victim.filter(|&v| self.used_before(v, expert));
        let victim_hits = lost.map_or(0.0, |v| f64::from(self.probability_of(v)));
        gate.admits(
            f64::from(planned.probability),
            planned.position,
            victim_hits,
        )
    }

    /// A worker took `request` from the queue: the copy to perform now, or
    /// `None` when the request went stale (a prefetch of an expert that has
    /// arrived meanwhile, or one not worth the expert it would evict).
    pub fn accept(&mut self, request: CopyRequest) -> Option<CopyJob> {
        let slot = match (request.slot, request.urgency) {
            (Some(slot), _) => slot,
            (None, Urgency::Prefetch(_)) => self.admit_prefetch(request.expert)?,
            (None, Urgency::Background) => self.admit_background(request.expert)?,
            (None, Urgency::OnDemand | Urgency::Stage) => return None,
        };
        self.pool.start_copy(slot, request.expert).ok()?;
        Some(CopyJob {
            expert: request.expert,
            slot,
            bytes: self.layout.bytes(request.expert),
            wait_for_reader: std::mem::take(&mut self.reader_pending[slot as usize]),
        })
    }

    /// A prefetch takes a slot only from an expert the policy values less.
    fn admit_prefetch(&mut self, expert: ExpertId) -> Option<SlotId> {
        if self.pool.lookup(expert).is_some() {
            return None;
        }
        let slot = self.choose_slot()?;
        let victim = self.pool.expert_in(slot);
        if let Some(victim) = victim {
            if self.policy.retention(victim) >= self.policy.retention(expert) {
                return None;
            }
        }
        if !self.gate_admits(expert, victim) {
            return None;
        }
        self.install(slot, expert);
        self.pool.unpin(slot).expect("install pins once");
        self.prefetched[slot as usize] = true;
        self.protect(slot, expert);
        self.stats.prefetch_copies += 1;
        Some(slot)
    }

    /// Keeps a prefetched expert from eviction until its layer is next
    /// fetched: the step it was predicted for.
    fn protect(&mut self, slot: SlotId, expert: ExpertId) {
        let layer = self.layout.locate(expert).0;
        self.protected[slot as usize] = true;
        self.protected_in_layer[layer as usize].push((slot, expert));
    }

    /// A background copy of an expert just run on the CPU takes a slot as a
    /// miss would, from the policy's victim (never a pinned slot), unless
    /// the policy ranks experts by predicted reuse and the victim's is at
    /// least as high.
    fn admit_background(&mut self, expert: ExpertId) -> Option<SlotId> {
        if self.pool.lookup(expert).is_some() {
            return None;
        }
        let slot = self.choose_slot()?;
        if let Some(victim) = self.pool.expert_in(slot) {
            if self.policy.prefetches()
                && self.policy.retention(victim) >= self.policy.retention(expert)
            {
                return None;
            }
        }
        self.install(slot, expert);
        self.pool.unpin(slot).expect("install pins once");
        self.stats.background_copies += 1;
        Some(slot)
    }

    /// The copy of `job` completed (`Ok`) or failed. A failed copy that
    /// nobody holds (a prefetch) gives its slot back at once; one that a
    /// fetch holds is reported by `wait` and gives it back on release.
    pub fn finish_copy(&mut self, job: &CopyJob, outcome: std::result::Result<(), CopyFailure>) {
        if outcome.is_ok() {
            self.stats.copies += 1;
            self.stats.bytes_to_device += job.bytes as u64;
        }
        if let Some(forgotten) = self.pool.finish_copy(job.slot, outcome) {
            self.forget(job.slot, forgotten);
        }
    }

    /// `slot` emptied because the copy of `expert` into it failed.
    fn forget(&mut self, slot: SlotId, expert: ExpertId) {
        self.policy.on_evict(slot, expert);
        self.resident_bytes -= self.layout.bytes(expert) as u64;
        self.prefetched[slot as usize] = false;
        self.protected[slot as usize] = false;
    }

    /// The slot of a fetched (pinned) expert, or a protocol error.
    pub fn pinned_slot(&self, id: ExpertId) -> Result<SlotId> {
        match self.pool.lookup(id) {
            Some(slot) if self.pool.pins(slot) > 0 => Ok(slot),
            _ => {
                let (layer, expert) = self.layout.locate(id);
                Err(CoreError::Protocol(format!(
                    "expert {expert} of layer {layer} was not fetched (or already released)"
                )))
            }
        }
    }

    /// Unpins a fetched expert; `read` says whether a device stream read it
    /// (the next copy into the slot must then wait for that reader).
    pub fn release(&mut self, id: ExpertId, read: bool) -> Result<SlotId> {
        let slot = self.pinned_slot(id)?;
        self.reader_pending[slot as usize] |= read;
        if let Some(forgotten) = self.pool.unpin(slot)? {
            self.forget(slot, forgotten);
        }
        Ok(slot)
    }

    /// Unpins every slot, for users that will never release theirs (a
    /// forward pass cut short by an exception); `read` as for
    /// [`release`](Self::release). Returns how many pins were dropped.
    pub fn release_all(&mut self, read: bool) -> u32 {
        let mut released = 0;
        for slot in 0..self.pool.len() as SlotId {
            let (pins, forgotten) = self.pool.unpin_all(slot);
            if pins > 0 {
                self.reader_pending[slot as usize] |= read;
            }
            if let Some(expert) = forgotten {
                self.forget(slot, expert);
            }
            released += pins;
        }
        released
    }

    /// Slots that no fetch holds.
    pub fn free_slots(&self) -> usize {
        self.pool.unpinned()
    }

    /// Slots whose copy is queued or running.
    pub fn copies_in_flight(&self) -> usize {
        (0..self.pool.len() as SlotId)
            .filter(|&s| matches!(self.pool.phase(s), Phase::Queued | Phase::Copying))
            .count()
    }

    pub fn phase(&self, slot: SlotId) -> &Phase {
        self.pool.phase(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::activation_aware::ActivationAware;
    use crate::cache::lru::Lru;
    use crate::execution::CpuExperts;

    fn core(n_slots: usize, policy: Box<dyn CachePolicy>) -> CacheCore {
        let layout = ExpertLayout::new(&[(4, 10), (4, 10)]).unwrap();
        let pool = SlotPool::new(0, 16, n_slots, 8).unwrap();
        CacheCore::new(layout, pool, policy)
    }

    fn complete_all(core: &mut CacheCore, queue: &PrefetchQueue) {
        while let Some(request) = queue.try_pop() {
            if let Some(job) = core.accept(request) {
                core.finish_copy(&job, Ok(()));
            }
        }
    }

    #[test]
    fn prefetches_count_as_hits_late_or_wasted() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(ActivationAware::new(2, 8)));
        let mut scores = vec![0.0; 8];
        scores[5] = 0.9;
        scores[6] = 0.8;
        core.plan(&queue, &scores, &[(5, 0.9), (6, 0.8)], 8);
        complete_all(&mut core, &queue);
        assert_eq!(core.stats().prefetch_copies, 2);
        core.fetch(&queue, &[5]).unwrap();
        core.release(5, false).unwrap();
        assert_eq!((core.stats().hits, core.stats().prefetch_hits), (1, 1));
        // A new plan that no longer wants 6: an on-demand miss evicts it unused.
        scores[6] = 0.0;
        core.plan(&queue, &scores, &[], 8);
        core.fetch(&queue, &[0]).unwrap();
        assert_eq!(core.stats().prefetch_wasted, 1);
        assert_eq!(core.stats().misses, 1);
    }

    #[test]
    fn a_prefetch_never_evicts_a_more_valuable_expert() {
        let queue = PrefetchQueue::new();
        let mut core = core(1, Box::new(ActivationAware::new(1, 8)));
        core.fetch(&queue, &[1]).unwrap();
        complete_all(&mut core, &queue);
        core.release(1, false).unwrap();
        let mut scores = vec![0.0; 8];
        scores[1] = 0.7;
        core.plan(&queue, &scores, &[(2, 0.5)], 8);
        complete_all(&mut core, &queue);
        assert_eq!(
            core.pool().lookup(1),
            Some(0),
            "expert 1 is worth more than the prefetch"
        );
        assert_eq!(core.stats().prefetch_copies, 0);
    }

    /// A core over three layers of four experts (ids 4l..4l+3), `slots`
    /// slots, under activation-aware.
    fn three_layers(slots: usize) -> CacheCore {
        let layout = ExpertLayout::new(&[(4, 10); 3]).unwrap();
        let pool = SlotPool::new(0, 16, slots, 12).unwrap();
        CacheCore::new(layout, pool, Box::new(ActivationAware::new(slots, 12)))
    }

    /// Fetches, lands and releases `ids` (one layer's experts).
    fn use_layer(core: &mut CacheCore, queue: &PrefetchQueue, ids: &[ExpertId]) {
        core.fetch(queue, ids).unwrap();
        complete_all(core, queue);
        for &id in ids {
            core.release(id, false).unwrap();
        }
    }

    #[test]
    fn the_gate_weighs_the_delay_and_the_victims_hits_against_the_saving() {
        // 346 us copies, 300 us layers: the first prefetch of a plan can
        // delay the next layer's on-demand copies by 46 us, the second by
        // a whole copy (capped at 346 us).
        let gate = PrefetchGate {
            copy_s: 346e-6,
            layer_s: 300e-6,
            copies_compete: false,
            chunk_s: None,
        };
        assert!((gate.delay(0) - 46e-6).abs() < 1e-12);
        assert!((gate.delay(1) - 346e-6).abs() < 1e-12);
        // p = 0.5 saves 173 us; a victim with 0.3 expected hits costs
        // 46 + 103.8 = 149.8 us (admitted), one with 0.4, 184.4 us (not).
        assert!(gate.admits(0.5, 0, 0.3));
        assert!(!gate.admits(0.5, 0, 0.4));
        // Second in its plan: 0.9 x 346 = 311.4 us < 346 us.
        assert!(!gate.admits(0.9, 1, 0.0));
        let compete = PrefetchGate {
            copies_compete: true,
            ..gate
        };
        // Competing copies: a wrong one costs its whole time, a right one
        // takes its on-demand copy's.
        assert!(compete.admits(0.6, 3, 0.0));
        assert!(!compete.admits(0.4, 0, 0.0));
        // In 2 MB chunks (40 us), the second waits for a chunk at most.
        let chunked = PrefetchGate {
            chunk_s: Some(40e-6),
            ..gate
        };
        assert!((chunked.delay(1) - 40e-6).abs() < 1e-12);
        assert!(chunked.admits(0.9, 1, 0.0));

        // In the core: slots hold experts 4 (layer 1) and 0 (layer 0), the
        // last fetch was layer 0's. Expert 9 (layer 2) is prefetched with
        // p = 0.5; the victim is 4, whose layer comes first.
        let queue = PrefetchQueue::new();
        let refused_with = |victim_probability: f32| {
            let mut core = three_layers(2);
            use_layer(&mut core, &queue, &[4]);
            use_layer(&mut core, &queue, &[0]);
            let mut scores = vec![0.0; 12];
            let mut probability = vec![0.0; 12];
            (scores[0], scores[4], scores[9]) = (0.9, 0.1, 0.5);
            (probability[4], probability[9]) = (victim_probability, 0.5);
            let gated = Gated {
                gate,
                use_probability: &probability,
            };
            core.plan_gated(&queue, &scores, &[(9, 0.5)], 8, Some(gated));
            assert_eq!(queue.len(), 1, "46 us of delay alone is beaten");
            complete_all(&mut core, &queue);
            core.pool().lookup(9).is_none()
        };
        assert!(refused_with(0.4), "184.4 us of cost against 173 us saved");
        assert!(!refused_with(0.3), "149.8 us of cost against 173 us saved");
    }

    #[test]
    fn a_prefetched_expert_is_kept_until_the_layer_it_was_fetched_for() {
        let queue = PrefetchQueue::new();
        let mut core = three_layers(2);
        use_layer(&mut core, &queue, &[0]);
        // During layer 0: expert 9 (layer 2) is prefetched into the free slot.
        let mut scores = vec![0.0; 12];
        scores[9] = 0.5;
        core.plan(&queue, &scores, &[(9, 0.5)], 8);
        complete_all(&mut core, &queue);
        let nine = core.pool().lookup(9).unwrap();
        // Layer 1's plan has changed its mind: 9 scores below expert 0, so
        // the policy's victim for layer 1's miss would be 9. Protected, it
        // stays; expert 0 goes.
        scores[9] = 0.0;
        scores[0] = 0.9;
        core.plan(&queue, &scores, &[], 8);
        use_layer(&mut core, &queue, &[5]);
        assert_eq!(core.pool().lookup(9), Some(nine));
        assert_eq!(core.pool().lookup(0), None);
        // Layer 2 uses it: a prefetch hit. Then it is an ordinary expert.
        use_layer(&mut core, &queue, &[9, 8]);
        assert_eq!(core.stats().prefetch_hits, 1);
        scores[9] = 0.0;
        scores[8] = 0.9;
        core.plan(&queue, &scores, &[], 8);
        use_layer(&mut core, &queue, &[1]);
        assert_eq!(core.pool().lookup(9), None, "no longer protected");
    }

    #[test]
    fn a_hit_does_not_count_its_own_slot_as_free_for_a_miss() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(Lru::new(2)));
        core.fetch(&queue, &[0]).unwrap();
        complete_all(&mut core, &queue);
        core.release(0, false).unwrap();
        core.fetch(&queue, &[1]).unwrap(); // stays pinned
        complete_all(&mut core, &queue);
        assert!(matches!(
            core.fetch(&queue, &[0, 2]),
            Err(CoreError::BudgetTooSmall { .. })
        ));
        core.release(1, false).unwrap();
        assert_eq!(core.fetch(&queue, &[0, 2]).unwrap().len(), 2);
    }

    #[test]
    fn a_failed_prefetch_gives_its_slot_back() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(ActivationAware::new(2, 8)));
        let mut scores = vec![0.0; 8];
        scores[5] = 0.9;
        core.plan(&queue, &scores, &[(5, 0.9)], 8);
        let job = core.accept(queue.try_pop().unwrap()).unwrap();
        let failure = CopyFailure::from(&CoreError::Protocol("damaged blob".into()));
        core.finish_copy(&job, Err(failure));
        // Nobody held the failed prefetch: both slots serve the next layer.
        assert_eq!(core.pool().lookup(5), None);
        core.fetch(&queue, &[0, 1]).unwrap();
        complete_all(&mut core, &queue);
        assert_eq!(
            core.stats().peak_resident_bytes,
            20,
            "the failed expert is no longer counted as resident"
        );
    }

    #[test]
    fn release_all_frees_every_held_slot() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(Lru::new(2)));
        core.fetch(&queue, &[0, 1]).unwrap();
        complete_all(&mut core, &queue);
        core.fetch(&queue, &[1]).unwrap();
        assert_eq!(core.free_slots(), 0);
        // Three pins whose releases never come (an interrupted pass).
        assert_eq!(core.release_all(true), 3);
        assert_eq!(core.free_slots(), 2);
        assert!(core.release(0, false).is_err(), "nothing is held any more");
        core.fetch(&queue, &[2, 3]).unwrap();
        complete_all(&mut core, &queue);
        assert_eq!(core.release_all(false), 2);
    }

    #[test]
    fn a_miss_never_evicts_a_hit_named_later_in_the_same_fetch() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(Lru::new(2)));
        core.fetch(&queue, &[1]).unwrap();
        complete_all(&mut core, &queue);
        core.release(1, false).unwrap();
        core.fetch(&queue, &[3]).unwrap();
        complete_all(&mut core, &queue);
        core.release(3, false).unwrap();
        // LRU's victim is expert 1, a hit of this call named after the
        // miss 0: the miss must take expert 3's slot instead.
        core.fetch(&queue, &[0, 1]).unwrap();
        complete_all(&mut core, &queue);
        let stats = core.stats();
        assert_eq!(
            (stats.hits, stats.misses, stats.copies),
            (1, 3, 3),
            "{stats:?}"
        );
        assert_eq!(core.pool().lookup(3), None, "the miss took the other slot");
    }

    fn costs(cpu_us: f64, copy_us: f64) -> ExecutionCosts {
        ExecutionCosts {
            cpu_fixed_s: cpu_us * 1e-6,
            cpu_per_token_s: cpu_us * 1e-6 / 8.0,
            copy_s: copy_us * 1e-6,
            device_s: 0.0,
            device_tail_s: 0.0,
            copy_backlog_s: None,
        }
    }

    #[test]
    fn never_copies_every_miss_and_defers_what_the_pool_cannot_hold() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(Lru::new(2)));
        let placed = core
            .place(&queue, &[0, 1, 2], &[1, 1, 1], CpuExperts::Never, None)
            .unwrap();
        assert!(matches!(
            placed[..],
            [Placement::Slot(_), Placement::Slot(_), Placement::Later]
        ));
        assert_eq!((core.stats().misses, core.stats().cpu_experts), (2, 0));
        complete_all(&mut core, &queue);
        core.release(0, false).unwrap();
        core.release(1, false).unwrap();
    }

    #[test]
    fn always_runs_misses_on_the_cpu_and_hits_from_their_slots() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(Lru::new(2)));
        core.fetch(&queue, &[0]).unwrap();
        complete_all(&mut core, &queue);
        core.release(0, false).unwrap();
        let placed = core
            .place(&queue, &[0, 3], &[1, 1], CpuExperts::Always, None)
            .unwrap();
        assert_eq!(placed, [Placement::Slot(0), Placement::Cpu]);
        let stats = core.stats();
        assert_eq!((stats.hits, stats.misses, stats.cpu_experts), (1, 2, 1));
        // The CPU-run miss is copied in the background into the free slot.
        assert_eq!(queue.len(), 1);
        complete_all(&mut core, &queue);
        assert!(core.pool().lookup(3).is_some());
        assert_eq!(core.stats().background_copies, 1);
        core.release(0, false).unwrap();
        // Placing it again before its copy is taken queues it once only.
        let mut core2 = super::tests::core(2, Box::new(Lru::new(2)));
        core2
            .place(&queue, &[5], &[1], CpuExperts::Always, None)
            .unwrap();
        core2
            .place(&queue, &[5], &[1], CpuExperts::Always, None)
            .unwrap();
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn auto_copies_until_costs_are_measured_then_splits_by_them() {
        let queue = PrefetchQueue::new();
        let mut core = core(4, Box::new(Lru::new(4)));
        let placed = core
            .place(&queue, &[0, 1], &[1, 1], CpuExperts::Auto, None)
            .unwrap();
        assert!(placed.iter().all(|p| matches!(p, Placement::Slot(_))));
        complete_all(&mut core, &queue);
        core.release(0, false).unwrap();
        core.release(1, false).unwrap();
        // Decode: the CPU (173 us) beats a copy (346 us) for both misses.
        let decode = core
            .place(
                &queue,
                &[2, 3],
                &[1, 1],
                CpuExperts::Auto,
                Some(&costs(173.0, 600.0)),
            )
            .unwrap();
        assert_eq!(decode, [Placement::Cpu, Placement::Cpu]);
        queue.remove_if(|_| true);
        // Prefill: 512 tokens cost the CPU 11 ms each; copying wins.
        let prefill = core
            .place(
                &queue,
                &[2, 3],
                &[512, 512],
                CpuExperts::Auto,
                Some(&costs(173.0, 346.0)),
            )
            .unwrap();
        assert!(
            prefill.iter().all(|p| matches!(p, Placement::Slot(_))),
            "{prefill:?}"
        );
    }

    #[test]
    fn a_pool_without_slots_runs_everything_on_the_cpu() {
        let layout = ExpertLayout::new(&[(4, 10)]).unwrap();
        let pool = SlotPool::new(0, 16, 0, 4).unwrap();
        let mut core = CacheCore::new(layout, pool, Box::new(Lru::new(0)));
        let queue = PrefetchQueue::new();
        for mode in [CpuExperts::Never, CpuExperts::Auto, CpuExperts::Always] {
            let placed = core.place(&queue, &[0, 1], &[3, 1], mode, None).unwrap();
            assert_eq!(placed, [Placement::Cpu, Placement::Cpu]);
        }
        assert!(queue.is_empty(), "no slot to copy into");
        assert_eq!(core.stats().cpu_experts, 6);
    }

    #[test]
    fn an_expert_in_use_is_never_evicted_by_a_background_copy() {
        let queue = PrefetchQueue::new();
        let mut core = core(1, Box::new(Lru::new(1)));
        // Expert 0 takes the only slot and stays pinned (in use); expert 1
        // runs on the CPU and queues its background copy.
        let placed = core
            .place(&queue, &[0], &[1], CpuExperts::Never, None)
            .unwrap();
        complete_all(&mut core, &queue);
        let placed_cpu = core
            .place(&queue, &[1], &[1], CpuExperts::Always, None)
            .unwrap();
        assert_eq!(placed_cpu, [Placement::Cpu]);
        complete_all(&mut core, &queue);
        assert_eq!(core.pool().lookup(0), Some(0), "the pinned expert stays");
        assert_eq!(core.pool().lookup(1), None);
        assert_eq!(
            (core.stats().background_copies, core.stats().evictions),
            (0, 0)
        );
        // Once released, the next background copy may take its slot (LRU).
        assert_eq!(placed, [Placement::Slot(0)]);
        core.release(0, false).unwrap();
        core.place(&queue, &[1], &[1], CpuExperts::Always, None)
            .unwrap();
        complete_all(&mut core, &queue);
        assert_eq!(core.pool().lookup(1), Some(0));
    }

    #[test]
    fn a_background_copy_never_evicts_an_expert_predicted_more_useful() {
        let queue = PrefetchQueue::new();
        let mut core = core(1, Box::new(ActivationAware::new(1, 8)));
        core.fetch(&queue, &[0]).unwrap();
        complete_all(&mut core, &queue);
        core.release(0, false).unwrap();
        let mut scores = vec![0.0; 8];
        scores[0] = 0.9;
        scores[1] = 0.2;
        core.plan(&queue, &scores, &[], 8);
        core.place(&queue, &[1], &[1], CpuExperts::Always, None)
            .unwrap();
        complete_all(&mut core, &queue);
        assert_eq!(
            core.pool().lookup(0),
            Some(0),
            "0 is predicted more useful than 1"
        );
        scores[1] = 0.95;
        core.plan(&queue, &scores, &[], 8);
        core.place(&queue, &[1], &[1], CpuExperts::Always, None)
            .unwrap();
        complete_all(&mut core, &queue);
        assert_eq!(core.pool().lookup(1), Some(0), "now 1 is worth the slot");
    }

    /// Device events the test sets by hand, as a GPU would report them.
    struct FakeEvents {
        copies: std::sync::Mutex<Vec<EventState>>,
        readers: std::sync::Mutex<Vec<EventState>>,
    }

    impl FakeEvents {
        fn new(n_slots: usize) -> Arc<Self> {
            Arc::new(Self {
                copies: std::sync::Mutex::new(vec![EventState::NotRecorded; n_slots]),
                readers: std::sync::Mutex::new(vec![EventState::NotRecorded; n_slots]),
            })
        }

        fn set_copy(&self, slot: SlotId, state: EventState) {
            self.copies.lock().unwrap()[slot as usize] = state;
        }

        fn set_reader(&self, slot: SlotId, state: EventState) {
            self.readers.lock().unwrap()[slot as usize] = state;
        }
    }

    impl SlotEvents for FakeEvents {
        fn copy_state(&self, slot: SlotId) -> EventState {
            self.copies.lock().unwrap()[slot as usize]
        }

        fn reader_state(&self, slot: SlotId) -> EventState {
            self.readers.lock().unwrap()[slot as usize]
        }
    }

    #[test]
    fn a_copy_still_in_flight_on_the_device_is_late_not_a_hit() {
        let queue = PrefetchQueue::new();
        let events = FakeEvents::new(2);
        let mut core = core(2, Box::new(ActivationAware::new(2, 8))).with_events(events.clone());
        let mut scores = vec![0.0; 8];
        scores[5] = 0.9;
        scores[6] = 0.8;
        core.plan(&queue, &scores, &[(5, 0.9), (6, 0.8)], 8);
        complete_all(&mut core, &queue);
        let (five, six) = (
            core.pool().lookup(5).unwrap(),
            core.pool().lookup(6).unwrap(),
        );
        // Both copies are queued on a copy stream; only expert 5's has landed.
        events.set_copy(five, EventState::Complete);
        events.set_copy(six, EventState::Pending);
        core.fetch(&queue, &[5, 6]).unwrap();
        let stats = core.stats();
        assert_eq!((stats.hits, stats.prefetch_hits), (1, 1), "5 had landed");
        assert_eq!(
            (stats.misses, stats.prefetch_late),
            (1, 1),
            "6 was in flight"
        );
        core.release(5, true).unwrap();
        core.release(6, true).unwrap();
        // Once landed it is a hit; the device is not asked again for it.
        events.set_copy(six, EventState::Complete);
        core.fetch(&queue, &[6]).unwrap();
        events.set_copy(six, EventState::Pending);
        core.release(6, true).unwrap();
        core.fetch(&queue, &[6]).unwrap();
        assert_eq!(core.stats().hits, 3);
    }

    #[test]
    fn a_victim_whose_reader_is_done_goes_before_one_still_read() {
        let queue = PrefetchQueue::new();
        let events = FakeEvents::new(2);
        let mut core = core(2, Box::new(ActivationAware::new(2, 8))).with_events(events.clone());
        core.fetch(&queue, &[0, 1]).unwrap();
        complete_all(&mut core, &queue);
        core.release(0, true).unwrap();
        core.release(1, true).unwrap();
        // The policy would evict expert 0 (equal scores, older), but its
        // reader's stream has not got past it; expert 1's reader is done.
        let (zero, one) = (
            core.pool().lookup(0).unwrap(),
            core.pool().lookup(1).unwrap(),
        );
        events.set_reader(zero, EventState::Pending);
        events.set_reader(one, EventState::Complete);
        core.fetch(&queue, &[2]).unwrap();
        assert_eq!(
            core.pool().lookup(2),
            Some(one),
            "a miss takes the finished reader's slot"
        );
        assert_eq!(core.pool().lookup(0), Some(zero));
        complete_all(&mut core, &queue);
        core.release(2, true).unwrap();
        // A prefetch chooses the same way; a never-recorded reader is done.
        events.set_reader(one, EventState::NotRecorded);
        let mut scores = vec![0.0; 8];
        scores[3] = 0.9;
        core.plan(&queue, &scores, &[], 8);
        let job = core
            .accept(CopyRequest {
                expert: 3,
                slot: None,
                urgency: Urgency::Prefetch(0.9),
            })
            .expect("a prefetch worth a slot");
        assert_eq!((job.slot, core.pool().lookup(0)), (one, Some(zero)));
    }

    #[test]
    fn demand_only_policies_ignore_prefetch_plans() {
        let queue = PrefetchQueue::new();
        let mut core = core(2, Box::new(Lru::new(2)));
        core.plan(&queue, &[0.0; 8], &[(3, 1.0)], 8);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_replan_drops_queued_prefetches_without_evicting() {
        let queue = PrefetchQueue::new();
        let mut core = core(1, Box::new(ActivationAware::new(1, 8)));
        core.fetch(&queue, &[1]).unwrap();
        complete_all(&mut core, &queue);
        core.release(1, false).unwrap();
        core.plan(&queue, &[0.0; 8], &[(2, 0.5)], 8);
        core.plan(&queue, &[0.0; 8], &[], 8);
        assert!(queue.is_empty());
        assert_eq!(core.pool().lookup(1), Some(0));
    }
}
