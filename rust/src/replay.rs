//! The policy lab's simulated clock: replay recorded routing through the
//! real cache core, planner and prefetch queue, with copies that take
//! `bytes / bandwidth` on one copy engine and MoE layers that compute for a
//! fixed time. A needed expert that has not arrived stalls the clock.
//!
//! Requests run one after another. Each finished request joins the EAMC,
//! so later requests are matched against earlier ones (and against the
//! warm-up requests), never against themselves.
//!
//! With [`ReplayConfig::cpu_expert_s`] the CPU is a second executor: each
//! layer's experts are placed by [`CacheCore::place`], the decision the live
//! cache makes, and a miss may run on the CPU instead of waiting for its
//! copy. An expert's CPU time is `cpu_expert_s`, the time of one token's
//! run (`cpu_fixed_s`, with no time per token: for a token or a few, the
//! CPU's time is the read of the expert's weights from host memory); the
//! replay steps one token at a time, so no expert has more. One CPU runs
//! the layer's CPU experts one after another, from the moment the routing
//! is known, while the device path waits for its copies and computes the
//! layer; the layer ends when both are done.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::cache::core::{CacheCore, CopyJob, ExecutionCosts, Gated, Placement};
use crate::cache::oracle::Oracle;
use crate::cache::{policy_by_name, CachePolicy};
use crate::error::{CoreError, Result};
use crate::execution::CpuExperts;
use crate::layout::{ExpertId, ExpertLayout};
use crate::planner::{Planner, PlannerConfig, RequestId, Timing};
use crate::queue::{PrefetchQueue, Urgency};
use crate::tiers::device::{Phase, SlotId, SlotPool};

/// One request's routing: `ids[(t * layers + l) * top_k + j]` is the j-th
/// expert of token t at MoE layer l.
pub struct Routing<'a> {
    pub tokens: usize,
    pub ids: &'a [u32],
}

#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Device slots, each holding one expert.
    pub slots: usize,
    pub expert_bytes: u64,
    pub bandwidth_bytes_per_s: f64,
    pub layer_compute_s: f64,
    pub planner: PlannerConfig,
    /// The CPU's time to run one expert for one token; `None`: no CPU, every
    /// miss is copied (and the replay is exactly the copy-only lab).
    pub cpu_expert_s: Option<f64>,
    /// Where misses run when `cpu_expert_s` is set.
    pub cpu_experts: CpuExperts,
    /// Copies go in chunks of this many bytes, and an on-demand copy waits
    /// for a running prefetch's chunk only (a model of a copy engine fed in
    /// chunks; the live cache copies whole experts); `None`: whole copies.
    pub copy_chunk_bytes: Option<u64>,
    /// A simulated router lookahead (the trace has no hidden states): at
    /// each layer the planner is told the token's routing at the next
    /// `depth` layers of the token, each id kept with probability
    /// `accuracy` and otherwise swapped for an expert the token does not
    /// use there. `None`: history alone, as without router lookahead.
    pub lookahead: Option<SimulatedLookahead>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedLookahead {
    pub depth: usize,
    pub accuracy: f64,
}

/// What one policy did over the replay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    pub tokens: u64,
    pub accesses: u64,
    pub hits: u64,
    pub misses: u64,
    pub prefetch_hits: u64,
    pub prefetch_late: u64,
    pub prefetch_wasted: u64,
    pub prefetch_copies: u64,
    pub copies: u64,
    pub bytes_moved: u64,
    /// Time the layers waited beyond their compute: for each layer, its end
    /// minus (its start + `layer_compute_s`). Its end is the later of the
    /// device path (the layer's copies landed, then its compute) and the
    /// CPU's (its experts, one after another from the start).
    pub stall_s: f64,
    pub total_s: f64,
    pub resident_s: f64,
    /// Experts run on the CPU, and the CPU time they took.
    pub cpu_experts: u64,
    pub cpu_s: f64,
    /// How well the planner predicted the layers ahead (a predictive
    /// policy only).
    pub predictor: PredictorScore,
}

/// Look-ahead distances the predictor is scored at.
pub const SCORED_DISTANCES: usize = 4;

/// The planner's predictions against the routing that came: after each
/// plan at layer l of a token, its `top_k` likeliest experts at layer
/// l + d of the same token (d = 1..=[`SCORED_DISTANCES`], within the
/// token) against the `top_k` the token used there. Both sets have
/// `top_k` experts, so precision and recall are the same figure:
/// `used[d - 1] / predicted[d - 1]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PredictorScore {
    pub predicted: [u64; SCORED_DISTANCES],
    pub used: [u64; SCORED_DISTANCES],
}

impl PredictorScore {
    /// Scores the plan made at `layer` of `request`'s `token`, whose use
    /// probabilities (per expert id) are `probability`.
    fn score(
        &mut self,
        probability: &[f32],
        config: &ReplayConfig,
        request: &Routing,
        token: usize,
        layer: usize,
    ) {
        let (experts, k) = (config.experts, config.top_k);
        let mut ranked: Vec<(f32, u32)> = Vec::with_capacity(experts);
        for d in 1..=SCORED_DISTANCES {
            let target = layer + d;
            if target >= config.layers {
                break;
            }
            ranked.clear();
            let row = &probability[target * experts..(target + 1) * experts];
            ranked.extend(row.iter().zip(0u32..).map(|(&p, e)| (p, e)));
            // Likeliest first; equals by expert id, as the planner ranks.
            ranked.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let start = (token * config.layers + target) * k;
            let actual = &request.ids[start..start + k];
            let used = ranked[..k]
                .iter()
                .filter(|(p, e)| *p > 0.0 && actual.contains(e))
                .count();
            self.predicted[d - 1] += k as u64;
            self.used[d - 1] += used as u64;
        }
    }
}

/// One copy engine on a simulated clock. Copies run back to back: the next
/// queued copy starts when the previous one completes (or when it was
/// queued, if the engine was idle), not when the replay next looks, so the
/// engine never idles mid-layer with copies waiting. The queue puts
/// on-demand copies ahead of prefetches. A running copy is not preempted,
/// unless copies go in chunks ([`ReplayConfig::copy_chunk_bytes`]): then a
/// prefetch or background copy pauses at the end of its chunk for the
/// on-demand copies queued meanwhile, and resumes after them.
struct CopyEngine {
    /// When the engine finishes its current copy (or went idle).
    free_at: f64,
    current: Option<CopyJob>,
    seconds_per_byte: f64,
    /// When copies were last queued: none of those queued can start before.
    queued_at: f64,
    /// When the current copy (or its resumed part) started, and whether an
    /// on-demand copy may pause it.
    started_at: f64,
    preemptible: bool,
    /// One chunk's copy time; `None`: whole copies.
    chunk_s: Option<f64>,
    /// A copy paused for on-demand ones, and its seconds left.
    paused: Option<(CopyJob, f64)>,
}

impl CopyEngine {
    fn new(seconds_per_byte: f64) -> Self {
        Self {
            free_at: 0.0,
            current: None,
            seconds_per_byte,
            queued_at: 0.0,
            started_at: 0.0,
            preemptible: false,
            chunk_s: None,
            paused: None,
        }
    }

    /// The replay queued copies at `now`. Every push is followed by this
    /// call at the push's time, so an idle engine with copies queued has
    /// them from `queued_at` on.
    fn queued(&mut self, now: f64) {
        self.queued_at = self.queued_at.max(now);
    }

    /// Runs the engine up to time `now`: completes the copies that end by
    /// then, each next one starting at its predecessor's completion (or
    /// when it was queued, whichever is later).
    fn run_until(&mut self, core: &mut CacheCore, queue: &PrefetchQueue, now: f64) {
        loop {
            self.pause_for_on_demand(queue, now);
            if let Some(job) = self.current {
                if self.free_at > now {
                    return;
                }
                core.finish_copy(&job, Ok(()));
                self.current = None;
            }
            if self.free_at.max(self.queued_at) > now || !self.start_next(core, queue) {
                return;
            }
        }
    }

    /// Pauses a chunked prefetch (or background copy) at the end of the
    /// chunk during which on-demand copies were queued, if that is by `now`
    /// and before it completes.
    fn pause_for_on_demand(&mut self, queue: &PrefetchQueue, now: f64) {
        let (Some(chunk_s), Some(job)) = (self.chunk_s, self.current) else {
            return;
        };
        if !self.preemptible || self.queued_at >= self.free_at || !on_demand_waiting(queue) {
            return;
        }
        let into = (self.queued_at - self.started_at).max(0.0);
        let boundary = self.started_at + (into / chunk_s).ceil() * chunk_s;
        if boundary < self.free_at && boundary <= now {
            self.paused = Some((job, self.free_at - boundary));
            self.current = None;
            self.free_at = boundary;
        }
    }

    /// Starts the next copy at the later of the last completion and the
    /// last push: on-demand copies first, then a paused copy, then the
    /// most urgent queued copy that the core still wants.
    fn start_next(&mut self, core: &mut CacheCore, queue: &PrefetchQueue) -> bool {
        let start = self.free_at.max(self.queued_at);
        if !on_demand_waiting(queue) {
            if let Some((job, left)) = self.paused.take() {
                self.run(job, start, left, true);
                return true;
            }
        }
        while let Some(request) = queue.try_pop() {
            if let Some(job) = core.accept(request) {
                let seconds = job.bytes as f64 * self.seconds_per_byte;
                let preemptible = request.urgency != Urgency::OnDemand;
                self.run(job, start, seconds, preemptible);
                return true;
            }
        }
        false
    }

    fn run(&mut self, job: CopyJob, start: f64, seconds: f64, preemptible: bool) {
        self.current = Some(job);
        self.started_at = start;
        self.free_at = start + seconds;
        self.preemptible = preemptible;
    }

    /// What is left at `now` of the copy the engine is running.
    fn backlog(&self, now: f64) -> f64 {
        match self.current {
            Some(_) => (self.free_at - now).max(0.0),
            None => 0.0,
        }
    }

    /// Advances past `now` until every slot is ready; returns the new time.
    fn wait_for(
        &mut self,
        core: &mut CacheCore,
        queue: &PrefetchQueue,
        slots: &[SlotId],
        mut now: f64,
    ) -> Result<f64> {
        while slots.iter().any(|&s| core.phase(s) != &Phase::Ready) {
            if self.current.is_none() && !self.start_next(core, queue) {
                return Err(CoreError::Protocol(
                    "replay: a fetched expert is not ready and has no copy queued or running"
                        .into(),
                ));
            }
            now = now.max(self.free_at);
            self.run_until(core, queue, now);
        }
        Ok(now)
    }
}

/// Tells the planner, through `look`, the routing of `request`'s `token`
/// at the layers after `layer` (within the token) that a router
/// lookahead of the given depth and accuracy would predict: each true id
/// kept with probability `accuracy`, else replaced by an expert the token
/// does not use there (so a miss is a real miss), while one is left.
fn simulate_lookahead(
    config: &ReplayConfig,
    lookahead: &SimulatedLookahead,
    request: &Routing,
    token: usize,
    layer: usize,
    rng: &mut fastrand::Rng,
    look: &mut impl FnMut(usize, &[u32]) -> Result<()>,
) -> Result<()> {
    let k = config.top_k;
    let mut predicted = Vec::with_capacity(k);
    let mut unused = Vec::with_capacity(config.experts);
    for target in layer + 1..(layer + 1 + lookahead.depth).min(config.layers) {
        let start = (token * config.layers + target) * k;
        let actual = &request.ids[start..start + k];
        unused.clear();
        unused.extend((0..config.experts as u32).filter(|e| !actual.contains(e)));
        predicted.clear();
        for &e in actual {
            if rng.f64() < lookahead.accuracy || unused.is_empty() {
                predicted.push(e);
            } else {
                predicted.push(unused.swap_remove(rng.usize(..unused.len())));
            }
        }
        look(target, &predicted)?;
    }
    Ok(())
}

/// One chunk's copy time, where copies go in chunks smaller than an expert.
fn chunk_s(config: &ReplayConfig) -> Option<f64> {
    let chunk = config.copy_chunk_bytes?.min(config.expert_bytes);
    Some(chunk as f64 / config.bandwidth_bytes_per_s)
}

/// Whether an on-demand copy is queued.
fn on_demand_waiting(queue: &PrefetchQueue) -> bool {
    queue.count_if(|r| r.urgency == Urgency::OnDemand) > 0
}

/// Replays `requests` under `policy` ("oracle" included) after feeding
/// `warmup` requests to the planner's EAMC.
pub fn replay(
    policy: &str,
    config: &ReplayConfig,
    requests: &[Routing],
    warmup: &[Routing],
) -> Result<ReplayReport> {
    replay_with_progress(policy, config, requests, warmup, |_| {
        ControlFlow::Continue(())
    })?
    .ok_or_else(|| CoreError::Protocol("replay stopped without being asked to".into()))
}

/// As [`replay`], calling `progress` with the number of measured requests
/// done after each one; `Break` stops the replay and returns `Ok(None)`
/// (the caller knows why: e.g. Ctrl-C in the Python callback).
pub fn replay_with_progress(
    policy: &str,
    config: &ReplayConfig,
    requests: &[Routing],
    warmup: &[Routing],
    mut progress: impl FnMut(usize) -> ControlFlow<()>,
) -> Result<Option<ReplayReport>> {
    validate(config, requests.iter().chain(warmup))?;
    let layout = ExpertLayout::new(&vec![
        (config.experts as u32, config.expert_bytes as usize);
        config.layers
    ])?;
    let pool = SlotPool::new(
        0,
        config.expert_bytes as usize,
        config.slots,
        layout.num_experts(),
    )?;
    let (policy, oracle_clock) = build_policy(policy, config, requests, layout.num_experts())?;
    let predictive = policy.prefetches();
    let mut core = CacheCore::new(layout, pool, policy);
    // Only a predictive policy uses the planner (and its EAMC's memory).
    let mut planner = if predictive {
        let mut planner = Planner::new(config.layers, config.experts, config.planner.clone())?;
        planner.set_timing(Timing {
            copy_s: (config.expert_bytes as f64 / config.bandwidth_bytes_per_s) as f32,
            layer_s: config.layer_compute_s as f32,
            copies_compete: false,
            chunk_s: chunk_s(config).map(|s| s as f32),
        });
        Some(planner)
    } else {
        None
    };
    if let Some(planner) = planner.as_mut() {
        for request in warmup {
            let id = planner.begin_request();
            for_each_layer(config, request, |_, layer, experts| {
                planner.observe(id, layer, experts)
            })?;
            planner.end_request(id)?;
        }
    }
    let queue = PrefetchQueue::new();
    let mut engine = CopyEngine::new(1.0 / config.bandwidth_bytes_per_s);
    engine.chunk_s = chunk_s(config);
    let mut now = 0.0f64;
    let mut stall = 0.0f64;
    let mut steps = 0usize;
    let mut predictor = PredictorScore::default();
    let mut ids: Vec<ExpertId> = Vec::with_capacity(config.top_k);
    // Seeded: a replay is repeatable.
    let mut rng = fastrand::Rng::with_seed(0x6d6f_652d_6f66_666c);
    for (done, request) in requests.iter().enumerate() {
        let id: Option<RequestId> = planner.as_mut().map(|p| p.begin_request());
        for_each_layer(config, request, |token, layer, experts| {
            // Copies that completed during the last layer, and those that
            // started after them, with the last layer's plan.
            engine.run_until(&mut core, &queue, now);
            steps += 1;
            if let Some(clock) = &oracle_clock {
                clock.store(steps * config.top_k, Ordering::Relaxed);
            }
            ids.clear();
            ids.extend(
                experts
                    .iter()
                    .map(|&e| (layer * config.experts) as ExpertId + e),
            );
            // The router's choice is known before the experts are fetched:
            // plan first, so evictions see this layer's routing.
            if let (Some(id), Some(planner)) = (id, planner.as_mut()) {
                if let Some(lookahead) = &config.lookahead {
                    let mut look = |target: usize, rows: &[u32]| {
                        planner.lookahead(id, target, rows, config.top_k)
                    };
                    simulate_lookahead(
                        config, lookahead, request, token, layer, &mut rng, &mut look,
                    )?;
                }
                planner.observe(id, layer, experts)?;
                let depth = planner.prefetch_depth();
                let prefetch = planner.plan(layer).1;
                let gated = planner.timing().map(|t| Gated {
                    gate: t.gate(),
                    use_probability: planner.use_probability(),
                });
                core.plan_gated(&queue, planner.scores(), &prefetch, depth, gated);
                engine.queued(now);
                predictor.score(planner.use_probability(), config, request, token, layer);
            }
            let mut sim = Layer {
                core: &mut core,
                queue: &queue,
                engine: &mut engine,
                config,
            };
            let end = match config.cpu_expert_s {
                None => {
                    let (waited_from, ready) = sim.fetch(&ids, now)?;
                    stall += ready - waited_from;
                    ready + config.layer_compute_s
                }
                Some(cpu_expert_s) => {
                    let (ready, end) = sim.place(&ids, now, cpu_expert_s)?;
                    // end - (now + compute), summed as without a CPU (the
                    // wait for the copies) plus what the CPU added after it.
                    stall += ready - now;
                    stall += end - (ready + config.layer_compute_s);
                    end
                }
            };
            now = end;
            Ok(())
        })?;
        if let (Some(id), Some(planner)) = (id, planner.as_mut()) {
            planner.end_request(id)?;
        }
        if progress(done + 1).is_break() {
            return Ok(None);
        }
    }
    let tokens: u64 = requests.iter().map(|r| r.tokens as u64).sum();
    let stats = core.stats();
    Ok(Some(ReplayReport {
        tokens,
        accesses: stats.hits + stats.misses,
        hits: stats.hits,
        misses: stats.misses,
        prefetch_hits: stats.prefetch_hits,
        prefetch_late: stats.prefetch_late,
        prefetch_wasted: stats.prefetch_wasted,
        prefetch_copies: stats.prefetch_copies,
        copies: stats.copies,
        bytes_moved: stats.bytes_to_device,
        stall_s: stall,
        total_s: now,
        resident_s: tokens as f64 * config.layers as f64 * config.layer_compute_s,
        cpu_experts: stats.cpu_experts,
        predictor,
        cpu_s: config
            .cpu_expert_s
            .map_or(0.0, |t| stats.cpu_experts as f64 * t),
    }))
}

/// One MoE layer on the simulated clock: the core, the queue and the copy
/// engine it uses.
struct Layer<'a> {
    core: &'a mut CacheCore,
    queue: &'a PrefetchQueue,
    engine: &'a mut CopyEngine,
    config: &'a ReplayConfig,
}

impl Layer<'_> {
    /// Every expert from a device slot (the lab without a CPU), from `now`:
    /// returns when the fetch could be made (prefetches in flight may hold
    /// the slots until they land) and when the layer's copies have landed.
    fn fetch(&mut self, ids: &[ExpertId], mut now: f64) -> Result<(f64, f64)> {
        let slots = self.fetch_waiting_for_room(ids, &mut now)?;
        self.engine.run_until(self.core, self.queue, now);
        let ready = self.engine.wait_for(self.core, self.queue, &slots, now)?;
        for &e in ids {
            self.core.release(e, false)?;
        }
        Ok((now, ready))
    }

    /// Pins slots for `ids`, letting the prefetches in flight that hold the
    /// slots land first (advancing `now`).
    fn fetch_waiting_for_room(&mut self, ids: &[ExpertId], now: &mut f64) -> Result<Vec<SlotId>> {
        loop {
            match self.core.fetch(self.queue, ids) {
                Err(CoreError::BudgetTooSmall { .. }) if self.engine.current.is_some() => {
                    *now = now.max(self.engine.free_at);
                    self.engine.run_until(self.core, self.queue, *now);
                }
                outcome => {
                    self.engine.queued(*now);
                    return outcome;
                }
            }
        }
    }

    /// The layer's experts placed by the core (hits from their slots, each
    /// miss copied or run on the CPU), from `start`; returns when the
    /// layer's copies have landed and the layer's end: the later of the
    /// device path (those copies, then the layer's compute) and the CPU's
    /// (its experts one after another).
    fn place(&mut self, ids: &[ExpertId], start: f64, cpu_expert_s: f64) -> Result<(f64, f64)> {
        let costs = ExecutionCosts {
            cpu_fixed_s: cpu_expert_s,
            cpu_per_token_s: 0.0,
            copy_s: self.config.expert_bytes as f64 / self.config.bandwidth_bytes_per_s,
            // The layer's compute waits for its copies (as without a CPU),
            // and covers the device's own run of the experts.
            device_s: 0.0,
            device_tail_s: self.config.layer_compute_s,
            // The layer's on-demand copies go first, after the one running.
            copy_backlog_s: Some(self.engine.backlog(start)),
        };
        let tokens = vec![1; ids.len()];
        let mode = self.config.cpu_experts;
        let placements = self
            .core
            .place(self.queue, ids, &tokens, mode, Some(&costs))?;
        self.engine.queued(start);
        let (mut pinned, mut later, mut on_cpu) = (Vec::new(), Vec::new(), 0u32);
        for (&id, placement) in ids.iter().zip(&placements) {
            match placement {
                Placement::Slot(slot) => pinned.push((id, *slot)),
                Placement::Later => later.push(id),
                Placement::Cpu => on_cpu += 1,
            }
        }
        let mut ready = self.wait_and_release(&pinned, start)?;
        if !later.is_empty() {
            // The pool could not hold them beside the pinned ones, now released.
            let slots = self.fetch_waiting_for_room(&later, &mut ready)?;
            let fetched: Vec<(ExpertId, SlotId)> = later.into_iter().zip(slots).collect();
            ready = self.wait_and_release(&fetched, ready)?;
        }
        let device_end = ready + self.config.layer_compute_s;
        let cpu_end = start + f64::from(on_cpu) * cpu_expert_s;
        Ok((ready, device_end.max(cpu_end)))
    }

    /// Runs the copy engine from `now` until the pinned `experts` (with
    /// their slots) have landed, then releases them; returns that time.
    fn wait_and_release(&mut self, experts: &[(ExpertId, SlotId)], now: f64) -> Result<f64> {
        self.engine.run_until(self.core, self.queue, now);
        let slots: Vec<SlotId> = experts.iter().map(|&(_, slot)| slot).collect();
        let ready = self.engine.wait_for(self.core, self.queue, &slots, now)?;
        for &(id, _) in experts {
            self.core.release(id, false)?;
        }
        Ok(ready)
    }
}

/// The position just after the current step's accesses, which the replay
/// sets as each step begins and a [`StepOracle`] reads.
type StepClock = Arc<AtomicUsize>;

/// Belady's choice for a replay with placements: evicts the expert whose
/// next use lies farthest after the current step (one token at one layer).
/// The core's [`Oracle`] counts its position in the access sequence from
/// the accesses it is told of, in order; a placement tells it of the hits
/// first, never of an expert run on the CPU, and a background copy arrives
/// as an insertion without an access, so the replay keeps the position
/// instead. With every access told in order the two choose alike.
struct StepOracle {
    /// `uses[starts[e]..starts[e + 1]]`: the positions in the access
    /// sequence at which expert e is used, ascending.
    starts: Vec<usize>,
    uses: Vec<usize>,
    /// Per expert, how many of its uses lie before `after`.
    passed: Vec<usize>,
    after: StepClock,
}

impl StepOracle {
    fn new(accesses: &[ExpertId], num_experts: usize, after: StepClock) -> Self {
        let mut starts = vec![0usize; num_experts + 1];
        for &e in accesses {
            starts[e as usize + 1] += 1;
        }
        for e in 0..num_experts {
            starts[e + 1] += starts[e];
        }
        let mut filled = starts.clone();
        let mut uses = vec![0usize; accesses.len()];
        for (position, &e) in accesses.iter().enumerate() {
            uses[filled[e as usize]] = position;
            filled[e as usize] += 1;
        }
        Self {
            starts,
            uses,
            passed: vec![0; num_experts],
            after,
        }
    }

    /// The position of `expert`'s next use after the current step
    /// (`usize::MAX`: never). The step only moves forward, so each
    /// expert's uses are passed over once.
    fn next_use(&mut self, expert: ExpertId) -> usize {
        let after = self.after.load(Ordering::Relaxed);
        let e = expert as usize;
        let uses = &self.uses[self.starts[e]..self.starts[e + 1]];
        let passed = &mut self.passed[e];
        while uses.get(*passed).is_some_and(|&p| p < after) {
            *passed += 1;
        }
        uses.get(*passed).copied().unwrap_or(usize::MAX)
    }
}

impl CachePolicy for StepOracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn on_access(&mut self, _slot: SlotId, _expert: ExpertId) {}

    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId> {
        // As the core's Oracle: among equals, the last candidate.
        candidates
            .map(|(slot, e)| (slot, self.next_use(e)))
            .max_by_key(|&(_, next)| next)
            .map(|(slot, _)| slot)
    }
}

/// The policy called `name`; the oracle's with the clock the replay sets
/// when it places experts (see [`StepOracle`]).
fn build_policy(
    name: &str,
    config: &ReplayConfig,
    requests: &[Routing],
    num_experts: usize,
) -> Result<(Box<dyn CachePolicy>, Option<StepClock>)> {
    if name != "oracle" {
        return Ok((policy_by_name(name, config.slots, num_experts)?, None));
    }
    let accesses = access_sequence(config, requests);
    if config.cpu_expert_s.is_none() {
        return Ok((Box::new(Oracle::new(&accesses, num_experts)), None));
    }
    let clock = Arc::new(AtomicUsize::new(0));
    let oracle = StepOracle::new(&accesses, num_experts, Arc::clone(&clock));
    Ok((Box::new(oracle), Some(clock)))
}

/// Most experts (over all layers) a replay takes. The largest routed models
/// have about 15,000 (DeepSeek-V3: 58 layers x 256); the replay keeps a few
/// words of bookkeeping per expert, so this bounds it well under a GiB.
pub const MAX_TOTAL_EXPERTS: usize = 1 << 24;

/// Refuses a configuration or routing that the replay cannot run exactly,
/// before anything is sized from it.
fn validate<'a>(
    config: &ReplayConfig,
    requests: impl Iterator<Item = &'a Routing<'a>>,
) -> Result<()> {
    let invalid = |message: String| Err(CoreError::InvalidConfig(message));
    let (layers, experts, top_k) = (config.layers, config.experts, config.top_k);
    let total = layers
        .checked_mul(experts)
        .filter(|&n| n > 0 && n <= MAX_TOTAL_EXPERTS);
    let Some(total) = total else {
        return invalid(format!(
            "{layers} layers x {experts} experts: both must be positive, with at most {MAX_TOTAL_EXPERTS} experts in all"
        ));
    };
    if top_k == 0 || top_k > experts {
        return invalid(format!("top_k {top_k} must be in 1..={experts}"));
    }
    if config.slots > total {
        return invalid(format!(
            "{} slots for {total} experts: a slot per expert is the most that can be used",
            config.slots
        ));
    }
    let min_bytes = usize::try_from(config.expert_bytes)
        .ok()
        .filter(|&b| b > 0)
        .and_then(|b| b.checked_mul(top_k));
    let Some(min_bytes) = min_bytes else {
        return invalid(format!(
            "expert_bytes {} must be positive, and top_k {top_k} experts must fit in the address space",
            config.expert_bytes
        ));
    };
    if config.slots < top_k {
        return Err(CoreError::BudgetTooSmall {
            needed: top_k,
            available: config.slots,
            min_bytes,
        });
    }
    let bandwidth = config.bandwidth_bytes_per_s;
    let copy_s = config.expert_bytes as f64 / bandwidth;
    if !(bandwidth.is_finite() && bandwidth > 0.0 && copy_s.is_finite()) {
        return invalid(format!(
            "bandwidth {bandwidth} bytes/s must be a positive finite number (a copy would take {copy_s} s)"
        ));
    }
    if !(config.layer_compute_s.is_finite() && config.layer_compute_s >= 0.0) {
        return invalid(format!(
            "layer compute time {} s must be a finite number >= 0",
            config.layer_compute_s
        ));
    }
    if let Some(l) = config.lookahead {
        if l.depth == 0 || l.depth >= layers || !(0.0..=1.0).contains(&l.accuracy) {
            return invalid(format!(
                "a simulated lookahead of {} layers at accuracy {} needs 1 to {} layers and an \
                 accuracy in [0, 1]",
                l.depth,
                l.accuracy,
                layers.saturating_sub(1)
            ));
        }
    }
    if config.copy_chunk_bytes == Some(0) {
        return invalid(
            "copy_chunk_bytes 0: a chunk must hold at least one byte (or none: whole copies)"
                .into(),
        );
    }
    if let Some(cpu_s) = config.cpu_expert_s {
        if !(cpu_s.is_finite() && cpu_s >= 0.0) {
            return invalid(format!(
                "CPU time per expert {cpu_s} s must be a finite number >= 0 (or none: no CPU)"
            ));
        }
    }
    let per_token = layers * top_k;
    // Which token last named each expert: a token's top-k are distinct.
    let mut named_by = vec![usize::MAX; experts];
    for (r, request) in requests.enumerate() {
        if request.tokens.checked_mul(per_token) != Some(request.ids.len()) {
            return invalid(format!(
                "request {r}: {} tokens need {per_token} expert ids each, but it has {}",
                request.tokens,
                request.ids.len()
            ));
        }
        for (step, ids) in request.ids.chunks_exact(top_k).enumerate() {
            for &e in ids {
                let e = e as usize;
                if e >= experts {
                    return invalid(format!(
                        "request {r}, token {}: expert id {e} is not below {experts}",
                        step / layers
                    ));
                }
                if named_by[e] == step {
                    return invalid(format!(
                        "request {r}, token {}: expert {e} is named twice at layer {}; top-k experts are distinct",
                        step / layers,
                        step % layers
                    ));
                }
                named_by[e] = step;
            }
        }
        named_by.fill(usize::MAX);
    }
    Ok(())
}

fn for_each_layer(
    config: &ReplayConfig,
    request: &Routing,
    mut step: impl FnMut(usize, usize, &[u32]) -> Result<()>,
) -> Result<()> {
    for token in 0..request.tokens {
        for layer in 0..config.layers {
            let start = (token * config.layers + layer) * config.top_k;
            step(token, layer, &request.ids[start..start + config.top_k])?;
        }
    }
    Ok(())
}

/// Every expert access of the replay in order, for the oracle.
fn access_sequence(config: &ReplayConfig, requests: &[Routing]) -> Vec<ExpertId> {
    let mut sequence = Vec::new();
    for request in requests {
        for token in 0..request.tokens {
            for layer in 0..config.layers {
                let start = (token * config.layers + layer) * config.top_k;
                for &e in &request.ids[start..start + config.top_k] {
                    sequence.push((layer * config.experts) as ExpertId + e);
                }
            }
        }
    }
    sequence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(slots: usize) -> ReplayConfig {
        ReplayConfig {
            layers: 2,
            experts: 4,
            top_k: 1,
            slots,
            expert_bytes: 1000,
            bandwidth_bytes_per_s: 1e6, // one copy = 1 ms
            layer_compute_s: 1e-3,
            planner: PlannerConfig::default(),
            cpu_expert_s: None,
            cpu_experts: CpuExperts::Auto,
            copy_chunk_bytes: None,
            lookahead: None,
        }
    }

    #[test]
    fn the_clock_charges_misses_and_compute() {
        // Two tokens, both layers use expert 0: two cold misses, then hits.
        let ids = [0, 0, 0, 0];
        let report = replay(
            "lru",
            &config(4),
            &[Routing {
                tokens: 2,
                ids: &ids,
            }],
            &[],
        )
        .unwrap();
        assert_eq!((report.hits, report.misses, report.copies), (2, 2, 2));
        assert!((report.stall_s - 2e-3).abs() < 1e-12);
        assert!((report.total_s - 6e-3).abs() < 1e-12);
        assert!((report.resident_s - 4e-3).abs() < 1e-12);
    }

    #[test]
    fn the_oracle_never_does_worse_than_lru() {
        let mut x = 7u64;
        let ids: Vec<u32> = (0..400)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % 4) as u32
            })
            .collect();
        let routing = [Routing {
            tokens: 200,
            ids: &ids,
        }];
        let lru = replay("lru", &config(3), &routing, &[]).unwrap();
        let oracle = replay("oracle", &config(3), &routing, &[]).unwrap();
        assert_eq!(lru.accesses, oracle.accesses);
        assert!(oracle.hits >= lru.hits);
    }

    #[test]
    fn prefetching_hides_the_copies_lru_stalls_on() {
        // Three layers, each always using one expert, and two slots: LRU
        // thrashes; prediction copies the next layer's expert while the
        // current one computes (a copy takes as long as a layer).
        let ids: Vec<u32> = (0..50).flat_map(|_| [0, 1, 2]).collect();
        let routing = [Routing {
            tokens: 50,
            ids: &ids,
        }];
        let config = ReplayConfig {
            layers: 3,
            ..config(2)
        };
        let lru = replay("lru", &config, &routing, &[]).unwrap();
        let aware = replay("activation-aware", &config, &routing, &[]).unwrap();
        assert_eq!(lru.hits, 0);
        assert!(aware.prefetch_hits > 100, "{aware:?}");
        assert!(aware.stall_s < lru.stall_s / 10.0, "{aware:?} vs {lru:?}");
    }

    #[test]
    fn malformed_routing_is_refused() {
        let ids = [0, 9];
        assert!(replay(
            "lru",
            &config(4),
            &[Routing {
                tokens: 1,
                ids: &ids
            }],
            &[]
        )
        .is_err());
        assert!(replay("lru", &config(0), &[], &[]).is_err());
        assert!(replay("fifo", &config(2), &[], &[]).is_err());
    }

    #[test]
    fn configurations_that_cannot_be_replayed_are_errors_not_panics() {
        let ids = [0, 1];
        let one = |ids: &'static [u32]| [Routing { tokens: 1, ids }];
        let refused = |config: ReplayConfig, requests: &[Routing]| {
            let outcome = replay("activation-aware", &config, requests, &[]);
            assert!(
                matches!(outcome, Err(CoreError::InvalidConfig(_))),
                "{config:?}: {outcome:?}"
            );
        };
        let base = config(4);
        for layer_compute_s in [f64::NAN, f64::INFINITY, -1.0] {
            refused(
                ReplayConfig {
                    layer_compute_s,
                    ..base.clone()
                },
                &[],
            );
        }
        for bandwidth_bytes_per_s in [f64::NAN, 0.0, 1e-320] {
            refused(
                ReplayConfig {
                    bandwidth_bytes_per_s,
                    ..base.clone()
                },
                &[],
            );
        }
        for cpu_expert_s in [f64::NAN, f64::INFINITY, -1e-6] {
            refused(with_cpu(&base, cpu_expert_s), &[]);
        }
        refused(
            ReplayConfig {
                experts: usize::MAX,
                ..base.clone()
            },
            &[],
        );
        refused(
            ReplayConfig {
                layers: 1 << 20,
                experts: 1 << 20,
                ..base.clone()
            },
            &[],
        );
        refused(
            ReplayConfig {
                top_k: 0,
                ..base.clone()
            },
            &[],
        );
        refused(
            ReplayConfig {
                top_k: 5,
                slots: 8,
                ..base.clone()
            },
            &[],
        );
        refused(
            ReplayConfig {
                slots: 1 << 40,
                ..base.clone()
            },
            &[],
        );
        refused(
            ReplayConfig {
                expert_bytes: 0,
                ..base.clone()
            },
            &[],
        );
        refused(
            ReplayConfig {
                top_k: 2,
                expert_bytes: u64::MAX,
                ..base.clone()
            },
            &[],
        );
        // A token count whose id count overflows, and one expert named twice.
        refused(
            base.clone(),
            &[Routing {
                tokens: usize::MAX,
                ids: &ids,
            }],
        );
        let twice = ReplayConfig {
            layers: 1,
            top_k: 2,
            ..base.clone()
        };
        refused(twice, &one(&[3, 3]));
    }

    #[test]
    fn progress_is_reported_per_request_and_can_stop_the_replay() {
        let ids = [0, 1, 2, 3];
        let routing: Vec<Routing> = (0..3)
            .map(|_| Routing {
                tokens: 2,
                ids: &ids,
            })
            .collect();
        let mut seen = Vec::new();
        let report = replay_with_progress("lru", &config(4), &routing, &[], |done| {
            seen.push(done);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(report.map(|r| r.tokens), Some(6));
        let mut calls = 0;
        let stopped = replay_with_progress("activation-aware", &config(4), &routing, &[], |_| {
            calls += 1;
            ControlFlow::Break(())
        })
        .unwrap();
        assert_eq!((stopped, calls), (None, 1));
    }

    /// `n` tokens of routing over `experts` experts, `top_k` distinct ones
    /// per token and layer, from a fixed pseudo-random sequence.
    fn random_routing(n: usize, layers: usize, experts: u32, top_k: usize, seed: u64) -> Vec<u32> {
        let mut x = seed;
        let mut ids = Vec::with_capacity(n * layers * top_k);
        for _ in 0..n * layers {
            let start = ids.len();
            while ids.len() < start + top_k {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let e = ((x >> 33) % u64::from(experts)) as u32;
                if !ids[start..].contains(&e) {
                    ids.push(e);
                }
            }
        }
        ids
    }

    #[test]
    fn a_simulated_lookahead_buys_what_its_accuracy_allows() {
        // Routing drawn at random: history cannot predict it, a lookahead can.
        let config = ReplayConfig {
            layers: 6,
            experts: 16,
            top_k: 2,
            slots: 24,
            ..config(4)
        };
        let ids = random_routing(300, 6, 16, 2, 5);
        let routing = [Routing {
            tokens: 300,
            ids: &ids,
        }];
        let run = |depth: usize, accuracy: f64| {
            let lookahead = (depth > 0).then_some(SimulatedLookahead { depth, accuracy });
            let config = ReplayConfig {
                lookahead,
                ..config.clone()
            };
            replay("activation-aware", &config, &routing, &[])
        };
        let history = run(0, 1.0).unwrap();
        let exact = run(2, 1.0).unwrap();
        let half = run(2, 0.5).unwrap();
        assert!(
            exact.prefetch_hits > 2 * history.prefetch_hits.max(1),
            "{exact:?} {history:?}"
        );
        assert!(
            exact.prefetch_wasted * 5 < exact.prefetch_copies,
            "{exact:?}"
        );
        assert!(exact.stall_s < half.stall_s && half.stall_s < history.stall_s);
        assert!(half.prefetch_wasted > exact.prefetch_wasted);
        // Seeded: the same replay twice gives the same figures.
        assert_eq!(run(2, 0.5).unwrap(), half);
        // Fewer experts than twice the top-k: a wrong id runs out of
        // experts to name, and the true one stands.
        let narrow = ReplayConfig {
            experts: 3,
            slots: 6,
            lookahead: Some(SimulatedLookahead {
                depth: 2,
                accuracy: 0.0,
            }),
            ..config.clone()
        };
        let ids = random_routing(20, 6, 3, 2, 7);
        let narrow_routing = [Routing {
            tokens: 20,
            ids: &ids,
        }];
        replay("activation-aware", &narrow, &narrow_routing, &[]).unwrap();
        for (depth, accuracy) in [(6, 1.0), (2, 1.5), (2, f64::NAN)] {
            let err = run(depth, accuracy).unwrap_err().to_string();
            assert!(err.contains("simulated lookahead"), "{err}");
        }
    }

    fn with_cpu(config: &ReplayConfig, cpu_expert_s: f64) -> ReplayConfig {
        ReplayConfig {
            cpu_expert_s: Some(cpu_expert_s),
            ..config.clone()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn a_cpu_faster_than_a_copy_runs_misses_while_their_copies_go_by() {
        // The first test's routing (two tokens, expert 0 at both layers):
        // each miss runs on the CPU within the layer's compute, its copy
        // goes meanwhile in the background, and the second token hits.
        let ids = [0, 0, 0, 0];
        let routing = [Routing {
            tokens: 2,
            ids: &ids,
        }];
        for mode in [CpuExperts::Auto, CpuExperts::Always] {
            let config = ReplayConfig {
                cpu_experts: mode,
                ..with_cpu(&config(4), 0.5e-3)
            };
            let report = replay("lru", &config, &routing, &[]).unwrap();
            let counts = (report.hits, report.misses, report.cpu_experts);
            assert_eq!((counts, report.copies), ((2, 2, 2), 2), "{mode:?}");
            assert_eq!(report.stall_s, 0.0);
            assert!(close(report.total_s, 4e-3) && close(report.cpu_s, 1e-3));
        }
        // A CPU slower than the layer's compute (1.5 ms against 1 ms, and
        // 2 ms to copy and compute) stalls each miss by the difference.
        let report = replay("lru", &with_cpu(&config(4), 1.5e-3), &routing, &[]).unwrap();
        assert_eq!((report.hits, report.cpu_experts), (2, 2));
        assert!(close(report.stall_s, 1e-3) && close(report.total_s, 5e-3));
    }

    #[test]
    fn a_cpu_faster_than_a_copy_cuts_every_policys_stall() {
        let config = ReplayConfig {
            layers: 4,
            experts: 8,
            top_k: 2,
            slots: 8,
            ..config(4)
        };
        let ids = random_routing(200, 4, 8, 2, 11);
        let routing = [Routing {
            tokens: 200,
            ids: &ids,
        }];
        let mut demand_hits = 0;
        for policy in ["lru", "lfu", "reference", "activation-aware", "oracle"] {
            let copy = replay(policy, &config, &routing, &[]).unwrap();
            let cpu = replay(policy, &with_cpu(&config, 0.3e-3), &routing, &[]).unwrap();
            if policy == "oracle" {
                // Belady keeps its lead with the CPU (an oracle whose clock
                // drifted from the replay's did no better than LRU).
                assert!(cpu.hits > demand_hits, "{cpu:?}: {demand_hits}");
            } else if policy != "activation-aware" {
                demand_hits = demand_hits.max(cpu.hits);
            }
            assert_eq!((copy.cpu_experts, copy.cpu_s), (0, 0.0));
            assert_eq!(cpu.accesses, copy.accesses, "{policy}");
            assert!(cpu.cpu_experts > 0, "{policy}: {cpu:?}");
            assert!(
                cpu.stall_s < copy.stall_s / 2.0,
                "{policy}: {cpu:?} vs {copy:?}"
            );
            assert!((cpu.cpu_s - cpu.cpu_experts as f64 * 0.3e-3).abs() < 1e-9);
            // Every layer ends after its compute and its stall, nothing else.
            let accounted = cpu.resident_s + cpu.stall_s;
            assert!((cpu.total_s - accounted).abs() < 1e-9, "{policy}: {cpu:?}");
        }
    }

    #[test]
    fn a_cpu_slower_than_any_copy_changes_nothing() {
        // One expert per layer: the placement's order (hits first) is the
        // routing's, so every figure must be the copy-only replay's.
        let config = ReplayConfig {
            layers: 3,
            ..config(3)
        };
        let ids = random_routing(300, 3, 4, 1, 3);
        let routing = [Routing {
            tokens: 300,
            ids: &ids,
        }];
        for policy in ["lru", "lfu", "reference", "activation-aware", "oracle"] {
            let copy = replay(policy, &config, &routing, &[]).unwrap();
            assert!(copy.misses > 100, "{policy}: the test needs misses");
            for mode in [CpuExperts::Auto, CpuExperts::Never] {
                let slow = ReplayConfig {
                    cpu_experts: mode,
                    ..with_cpu(&config, 10.0)
                };
                let placed = replay(policy, &slow, &routing, &[]).unwrap();
                assert_eq!(placed, copy, "{policy}, {mode:?}");
            }
        }
    }

    #[test]
    fn the_step_oracle_evicts_the_expert_needed_last_after_the_step() {
        // Accesses 0 1 2 | 0 2, one per step; expert 3 is never used.
        let after = Arc::new(AtomicUsize::new(3));
        let mut oracle = StepOracle::new(&[0, 1, 2, 0, 2], 4, Arc::clone(&after));
        let mut victim = |candidates: &[(SlotId, ExpertId)]| {
            oracle.choose_victim(&mut candidates.iter().copied())
        };
        assert_eq!(victim(&[(0, 0), (1, 1), (2, 2)]), Some(1));
        assert_eq!(victim(&[(0, 0), (2, 2)]), Some(2));
        // After step 4 (expert 0's last use) it is needed no more; equals
        // go as in the core's Oracle, the last one.
        after.store(4, Ordering::Relaxed);
        assert_eq!(victim(&[(0, 0), (2, 2)]), Some(0));
        assert_eq!(victim(&[(0, 0), (2, 2), (3, 3)]), Some(3));
        assert_eq!(victim(&[]), None);
    }

    /// A core of one layer of `experts` experts of 1000 bytes, `slots`
    /// slots, under activation-aware, and an engine copying one in 1 ms.
    fn engine_and_core(experts: u32, slots: usize) -> (CacheCore, CopyEngine) {
        let layout = ExpertLayout::new(&[(experts, 1000)]).unwrap();
        let pool = SlotPool::new(0, 1000, slots, experts as usize).unwrap();
        let policy = crate::cache::activation_aware::ActivationAware::new(slots, experts as usize);
        let core = CacheCore::new(layout, pool, Box::new(policy));
        (core, CopyEngine::new(1e-6))
    }

    #[test]
    fn the_clock_starts_the_next_copy_at_the_completion_time() {
        let (mut core, mut engine) = engine_and_core(4, 4);
        let queue = PrefetchQueue::new();
        let scores = [0.0, 0.0, 0.9, 0.8];
        core.plan(&queue, &scores, &[(2, 0.9), (3, 0.8)], 2);
        engine.queued(0.0);
        engine.run_until(&mut core, &queue, 0.0);
        assert!(close(engine.free_at, 1e-3), "{}", engine.free_at);
        // Looked at again only at 5 ms: the second copy ran from 1 to 2 ms,
        // not from 5 ms (the time the replay next looked).
        engine.run_until(&mut core, &queue, 5e-3);
        assert!(close(engine.free_at, 2e-3), "{}", engine.free_at);
        assert!(engine.current.is_none());
        for e in [2, 3] {
            let slot = core.pool().lookup(e).unwrap();
            assert_eq!(core.phase(slot), &Phase::Ready);
        }
        // Idle since 2 ms, a copy queued at 7 ms starts at 7 ms.
        core.plan(&queue, &[0.9, 0.0, 0.0, 0.0], &[(0, 0.9)], 1);
        engine.queued(7e-3);
        engine.run_until(&mut core, &queue, 7e-3);
        assert!(close(engine.free_at, 8e-3), "{}", engine.free_at);
    }

    #[test]
    fn an_on_demand_copy_goes_ahead_of_queued_prefetches() {
        let (mut core, mut engine) = engine_and_core(4, 4);
        let queue = PrefetchQueue::new();
        let scores = [0.0, 0.9, 0.8, 0.7];
        core.plan(&queue, &scores, &[(1, 0.9), (2, 0.8), (3, 0.7)], 3);
        engine.queued(0.0);
        engine.run_until(&mut core, &queue, 0.5e-3);
        let config = ReplayConfig {
            layers: 1,
            ..config(4)
        };
        let mut sim = Layer {
            core: &mut core,
            queue: &queue,
            engine: &mut engine,
            config: &config,
        };
        // Expert 0 is needed at 0.5 ms: it waits for the prefetch running
        // (until 1 ms), not for the two queued (which would end at 3 ms).
        let (from, ready) = sim.fetch(&[0], 0.5e-3).unwrap();
        assert!(close(from, 0.5e-3) && close(ready, 2e-3), "{from} {ready}");
        // The next prefetch follows the on-demand copy, from 2 ms.
        assert_eq!(queue.len(), 1);
        assert!(close(engine.free_at, 3e-3), "{}", engine.free_at);
    }

    #[test]
    fn a_chunked_prefetch_pauses_for_an_on_demand_copy_and_resumes_after_it() {
        let (mut core, mut engine) = engine_and_core(4, 4);
        engine.chunk_s = Some(0.25e-3);
        let queue = PrefetchQueue::new();
        core.plan(&queue, &[0.0, 0.9, 0.0, 0.0], &[(1, 0.9)], 1);
        engine.queued(0.0);
        engine.run_until(&mut core, &queue, 0.3e-3);
        let config = ReplayConfig {
            layers: 1,
            ..config(4)
        };
        let mut sim = Layer {
            core: &mut core,
            queue: &queue,
            engine: &mut engine,
            config: &config,
        };
        // Queued at 0.3 ms, expert 0 waits for the prefetch's chunk to end
        // (0.5 ms), not for the whole copy (1 ms); the prefetch resumes
        // after it and lands at 2 ms.
        let (_, ready) = sim.fetch(&[0], 0.3e-3).unwrap();
        assert!(close(ready, 1.5e-3), "{ready}");
        engine.run_until(&mut core, &queue, 5e-3);
        assert!(close(engine.free_at, 2e-3), "{}", engine.free_at);
        let slot = core.pool().lookup(1).unwrap();
        assert_eq!(core.phase(slot), &Phase::Ready);
        assert_eq!(core.stats().copies, 2);
    }

    #[test]
    fn the_predictor_is_scored_per_look_ahead_distance() {
        // Four layers, each token routes expert t % 4 at every layer: after
        // warm-up the planner knows where each expert leads.
        let config = ReplayConfig {
            layers: 4,
            ..config(4)
        };
        let ids: Vec<u32> = (0..60u32).flat_map(|t| [t % 4; 4]).collect();
        let routing = [Routing {
            tokens: 60,
            ids: &ids,
        }];
        let aware = replay("activation-aware", &config, &routing, &routing).unwrap();
        let score = &aware.predictor;
        // Plans at layers 0..=2 score d = 1, at 0..=1 d = 2, at 0 d = 3.
        assert_eq!(score.predicted, [180, 120, 60, 0]);
        for d in 0..3 {
            let precision = score.used[d] as f64 / score.predicted[d] as f64;
            assert!(precision > 0.9, "d = {}: {score:?}", d + 1);
        }
        let lru = replay("lru", &config, &routing, &routing).unwrap();
        assert_eq!(lru.predictor, PredictorScore::default());
    }

    #[test]
    fn experts_the_pool_cannot_hold_beside_the_hits_are_fetched_after_them() {
        // Two slots, one taken by a prefetch copying until 1 ms: the layer's
        // two misses copy one after the other behind it, the second once
        // the first is released (the placement's `Later`).
        let config = ReplayConfig {
            layers: 1,
            top_k: 2,
            slots: 2,
            cpu_experts: CpuExperts::Never,
            ..with_cpu(&config(2), 1e-4)
        };
        let layout = ExpertLayout::new(&[(4, 1000)]).unwrap();
        let pool = SlotPool::new(0, 1000, 2, 4).unwrap();
        let policy = crate::cache::activation_aware::ActivationAware::new(2, 4);
        let mut core = CacheCore::new(layout, pool, Box::new(policy));
        let queue = PrefetchQueue::new();
        let mut engine = CopyEngine::new(1e-6);
        core.plan(&queue, &[0.0, 0.0, 0.0, 0.9], &[(3, 0.9)], 1);
        engine.run_until(&mut core, &queue, 0.0);
        assert!(engine.current.is_some() && close(engine.backlog(0.0), 1e-3));
        let mut sim = Layer {
            core: &mut core,
            queue: &queue,
            engine: &mut engine,
            config: &config,
        };
        let (ready, end) = sim.place(&[0, 1], 0.0, 1e-4).unwrap();
        assert!(close(ready, 3e-3) && close(end, 4e-3), "{ready} {end}");
        assert_eq!(core.free_slots(), 2, "every slot is released");
        assert_eq!((core.stats().misses, core.stats().copies), (2, 3));
    }
}
