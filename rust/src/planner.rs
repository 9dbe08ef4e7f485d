//! The prefetch planner: from what the live requests have routed so far,
//! predict which experts the layers ahead will use and score them.
//!
//! For each live request, the predicted activation share of expert e at an
//! upcoming layer i blends three sources, each a distribution over the
//! layer's experts: the request's own activations at i (requests reuse their
//! experts), its best EAMC matches' activations at i weighted by similarity
//! (what similar past requests did next), and global frequencies (the
//! fallback before anything is known). The score discounts that share by
//! layer distance d = 1..=horizon as (1 - d / (L + 1)), so the next layer
//! comes first; layers past the last wrap to the next token's first ones.

use crate::cache::core::PrefetchGate;
use std::collections::VecDeque;

use crate::error::{CoreError, Result};
use crate::layout::ExpertId;
use crate::trace::eamc::{AffinityTables, MAX_CAPACITY};
use crate::trace::{sizing, ActivationCollection, ActivationMatrix, Replacement, RequestMatcher};

/// Tunables, measured with the trace replay.
#[derive(Debug, Clone)]
pub struct PlannerConfig {
    /// EAMC entries blended per prediction.
    pub matches: usize,
    pub own_weight: f32,
    pub eamc_weight: f32,
    pub global_weight: f32,
    /// Prefetches queued per plan.
    pub prefetch_depth: usize,
    /// Layers ahead that a plan covers (0 = all layers).
    pub horizon: usize,
    pub eamc_capacity: usize,
    pub replacement: Replacement,
    /// Per-token decay of a request's own activation counts (1 = plain
    /// counts): recent routing predicts the next token better than old.
    pub recency: f32,
    /// Weight of cross-layer affinity (which experts a token's current
    /// experts lead to at the layers ahead) in near-layer predictions.
    pub affinity_weight: f32,
    /// Layers ahead that affinity predicts, each from a direct table of
    /// its own (layer l to layer l + d, d = 1..=this).
    pub affinity_horizon: usize,
    /// Weight of the per-token reuse term against layer distance in an
    /// expert's expected distance to its next use (1 = the plain model).
    pub reuse_weight: f32,
    /// Weight of a router lookahead (the layer's own router scored on an
    /// earlier layer's hidden state) in the prediction for its layer, from
    /// 0 (ignored) to 1 (alone). The blended shares also rank what to
    /// keep at that layer, where the lookahead names only the experts of
    /// this step: too high a weight evicts the rest.
    pub lookahead_weight: f32,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            matches: 4,
            own_weight: 0.5,
            eamc_weight: 0.4,
            global_weight: 0.1,
            prefetch_depth: 8,
            horizon: 0,
            eamc_capacity: 1000,
            replacement: Replacement::LeastMatched,
            recency: 0.9,
            affinity_weight: 0.7,
            // Measured with the lab (DeepSeek-V2-Lite, 25% cached): hit rate
            // 0.497 / 0.562 / 0.566 / 0.567 / 0.567 with 1 / 2 / 3 / 4 / 6
            // tables; stall 27.8 / 24.8 / 24.6 / 24.5 / 24.5 ms per token.
            affinity_horizon: 4,
            reuse_weight: 0.2,
            // Measured with the lab's simulated lookahead at 6f65b87
            // (DeepSeek-V2-Lite, 25% cached, 4 layers ahead, 80% of the ids
            // right): stall
            // 0.715 / 0.711 / 0.714 / 0.731 / 0.755 / 0.873x LRU's with
            // 0.1 / 0.2 / 0.3 / 0.5 / 0.8 / 1.0 (0.686 / 0.696 / 0.701x at
            // 0.3 / 0.5 / 0.65 with every id right).
            lookahead_weight: 0.3,
        }
    }
}

impl PlannerConfig {
    /// Checks the settings that size or drive the planner, so that a bad
    /// one is refused before anything is built from it.
    pub fn check(&self) -> Result<()> {
        if self.matches == 0 {
            return Err(CoreError::InvalidConfig(
                "the planner needs at least one match (matches >= 1)".into(),
            ));
        }
        if !(1..=MAX_CAPACITY).contains(&self.eamc_capacity) {
            return Err(CoreError::InvalidConfig(format!(
                "eamc_capacity={} is out of range: use 1 to {MAX_CAPACITY} entries (the default is 1000)",
                self.eamc_capacity
            )));
        }
        if !(0.0..=1.0).contains(&self.lookahead_weight) {
            return Err(CoreError::InvalidConfig(format!(
                "lookahead_weight={} is out of range: it blends a router lookahead into the \
                 prediction and must be from 0 to 1 (the default is 0.3)",
                self.lookahead_weight
            )));
        }
        Ok(())
    }
}

pub type RequestId = usize;

/// How long one expert copy and one MoE layer's compute take: what a
/// prefetch can gain (the copy time it hides, up to the compute before the
/// expert is needed) and what a wrong one costs. A copy engine of its own
/// (a GPU's DMA) runs beside the compute, so a wrong prefetch costs only the
/// copy time that a demand fetch queued behind it waits beyond the layer's
/// compute; copies that compete with the compute for the processor (memcpy
/// on the host backend) cost their whole time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub copy_s: f32,
    pub layer_s: f32,
    pub copies_compete: bool,
    /// One chunk's copy time where copies go in chunks that an on-demand
    /// copy can get between; `None`: whole copies.
    pub chunk_s: Option<f32>,
}

impl Timing {
    /// The nearest layer distance that a prefetch issued now can reach in
    /// time: its copy must land before that layer starts, `d` layers of
    /// compute away. The copies ahead of it in the queue (the one running,
    /// the current layer's on-demand copies) delay the current layer's
    /// compute as much as the prefetch, so they cancel out; the next
    /// layers' on-demand copies go ahead of it but also delay those layers.
    /// `None`: no compute to hide a copy behind, nothing is reachable.
    pub fn first_reachable(&self) -> Option<usize> {
        if !(self.layer_s > 0.0 && self.copy_s.is_finite()) {
            return None;
        }
        let layers = (self.copy_s / self.layer_s).ceil();
        // A copy time measured as zero (or below) is reachable at once.
        Some(if layers >= 1.0 { layers as usize } else { 1 })
    }

    /// The cache core's cost gate with these rates.
    pub fn gate(&self) -> PrefetchGate {
        PrefetchGate {
            copy_s: f64::from(self.copy_s),
            layer_s: f64::from(self.layer_s),
            copies_compete: self.copies_compete,
            chunk_s: self.chunk_s.map(f64::from),
        }
    }

    /// Whether prefetching an expert used with probability `p`, `d` layers
    /// ahead, as the first prefetch of its plan, saves more time (the copy
    /// time it hides, up to the compute before the expert is needed) than
    /// the on-demand copy time it can delay, right or wrong. The core
    /// weighs the place in the plan and the expert evicted on top.
    fn worth_prefetching(&self, p: f32, d: usize) -> bool {
        let gain = f64::from(p * self.copy_s.min(d as f32 * self.layer_s));
        gain > self.gate().cost(f64::from(p), 0)
    }
}

/// A plan: one retention score per expert id, and the prefetch candidates
/// best first.
pub type Plan<'a> = (&'a [f32], Vec<(ExpertId, f32)>);

/// A live request: its matcher and its recency-weighted activations.
#[derive(Clone)]
struct LiveRequest {
    matcher: RequestMatcher,
    recent: Vec<f32>,
    /// The last steps routed, oldest first: each one's layer and token
    /// rows (`top_k` ids each); as many as there are affinity tables.
    steps: VecDeque<(usize, Vec<u32>)>,
    /// Router lookahead: per layer ahead not routed yet, the distribution
    /// its router gave on an earlier layer's hidden state (the nearest).
    lookahead: Vec<(usize, Vec<f32>)>,
}

pub struct Planner {
    config: PlannerConfig,
    eamc: ActivationCollection,
    live: Vec<Option<LiveRequest>>,
    global: ActivationMatrix,
    /// `affinity[((d - 1) * L + l) * E * E + a * E + b]`: tokens routed to
    /// a at layer l and to b at layer l + d, over every request observed.
    /// Direct tables predict l + 2 better than chaining l + 1's twice.
    affinity: Vec<f32>,
    /// How many tables (d = 1..=this).
    affinity_tables: usize,
    /// Experts per token per layer, as observed.
    top_k: usize,
    /// Retention: predicted reuse, mildly discounted by distance.
    scores: Vec<f32>,
    /// Prefetch priority: predicted use, discounted by distance.
    priority: Vec<f32>,
    /// The probability that the expert's next predicted use happens (one
    /// use per token and layer at most; the likeliest live request's).
    use_probability: Vec<f32>,
    /// Unknown until measured: then every predicted expert is a candidate.
    timing: Option<Timing>,
}

impl Planner {
    pub fn new(layers: usize, experts: usize, config: PlannerConfig) -> Result<Self> {
        config.check()?;
        check_affinity_table(layers, experts, affinity_tables(&config, layers))?;
        let eamc =
            ActivationCollection::new(config.eamc_capacity, layers, experts, config.replacement)?;
        Self::with_collection(eamc, config)
    }

    /// A planner that starts from a saved collection, and from the
    /// affinity tables saved with it: those for the distances this
    /// configuration keeps (d = 1..=affinity_horizon), zero for the rest.
    pub fn with_collection(mut eamc: ActivationCollection, config: PlannerConfig) -> Result<Self> {
        config.check()?;
        let (layers, experts) = (eamc.layers(), eamc.experts());
        let tables = affinity_tables(&config, layers);
        check_affinity_table(layers, experts, tables)?;
        let saved = eamc.take_affinity();
        Ok(Self {
            config,
            live: Vec::new(),
            global: ActivationMatrix::new(layers, experts),
            affinity: starting_affinity(saved, tables * layers * experts * experts)?,
            affinity_tables: tables,
            top_k: 1,
            scores: vec![0.0; layers * experts],
            priority: vec![0.0; layers * experts],
            use_probability: vec![0.0; layers * experts],
            timing: None,
            eamc,
        })
    }

    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = Some(timing);
    }

    /// The last plan's retention scores (see [`plan`](Self::plan)).
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// The last plan's use probability per expert id: what the cost gate
    /// weighs a prefetch, and an evicted expert's expected hits, with.
    pub fn use_probability(&self) -> &[f32] {
        &self.use_probability
    }

    pub fn timing(&self) -> Option<Timing> {
        self.timing
    }

    pub fn prefetch_depth(&self) -> usize {
        self.config.prefetch_depth
    }

    pub fn collection(&self) -> &ActivationCollection {
        &self.eamc
    }

    /// The direct co-activation tables learned so far: their count D and
    /// the D·L·E·E token counts (layout of [`AffinityTables`]), what an
    /// EAMC file saves for a restarted planner to start from.
    pub fn affinity(&self) -> (usize, &[f32]) {
        (self.affinity_tables, &self.affinity)
    }

    pub fn begin_request(&mut self) -> RequestId {
        let matcher = LiveRequest {
            matcher: RequestMatcher::new(&self.eamc),
            recent: vec![0.0; self.eamc.layers() * self.eamc.experts()],
            steps: VecDeque::new(),
            lookahead: Vec::new(),
        };
        match self.live.iter().position(Option::is_none) {
            Some(free) => {
                self.live[free] = Some(matcher);
                free
            }
            None => {
                self.live.push(Some(matcher));
                self.live.len() - 1
            }
        }
    }

    /// One token of request `id` was routed to `experts` at `layer`.
    pub fn observe(&mut self, id: RequestId, layer: usize, experts: &[u32]) -> Result<()> {
        self.observe_rows(id, layer, experts, experts.len())
    }

    /// Request `id`'s tokens of this step were routed to `rows` (`top_k`
    /// ids per token) at `layer`.
    pub fn observe_rows(
        &mut self,
        id: RequestId,
        layer: usize,
        rows: &[u32],
        top_k: usize,
    ) -> Result<()> {
        let experts = self.eamc.experts();
        let Some(Some(request)) = self.live.get_mut(id) else {
            return Err(CoreError::Protocol(format!("request {id} is not live")));
        };
        if top_k == 0 || rows.len() % top_k != 0 || rows.iter().any(|&e| e as usize >= experts) {
            return Err(CoreError::Protocol(format!(
                "routing of {} ids at layer {layer} is not rows of {top_k} ids below {experts}",
                rows.len()
            )));
        }
        self.top_k = self.top_k.max(top_k);
        // The layer's real routing supersedes what was looked ahead for it.
        request.lookahead.retain(|(ahead, _)| *ahead != layer);
        for row in rows.chunks(top_k) {
            request.matcher.observe(&self.eamc, layer, row);
            let recent = &mut request.recent[layer * experts..(layer + 1) * experts];
            for v in recent.iter_mut() {
                *v *= self.config.recency;
            }
            for &e in row {
                recent[e as usize] += 1.0;
            }
            self.global.record(layer, row);
        }
        // The same tokens d layers further: learn where their experts led.
        let layers = self.eamc.layers();
        for (before_layer, before) in &request.steps {
            let d = layer.wrapping_sub(*before_layer);
            if !(1..=self.affinity_tables).contains(&d) || before.len() != rows.len() {
                continue;
            }
            let base = ((d - 1) * layers + before_layer) * experts * experts;
            let mut full = false;
            for (before, after) in before.chunks(top_k).zip(rows.chunks(top_k)) {
                for &a in before {
                    let row = base + a as usize * experts;
                    for &b in after {
                        let count = &mut self.affinity[row + b as usize];
                        *count += 1.0;
                        full |= *count >= AFFINITY_COUNT_LIMIT;
                    }
                }
            }
            if full {
                // Halved, the table keeps its proportions and room to count.
                let table = &mut self.affinity[base..base + experts * experts];
                table.iter_mut().for_each(|c| *c *= 0.5);
            }
        }
        let kept = self.affinity_tables.max(1);
        let mut recycled = if request.steps.len() >= kept {
            request
                .steps
                .pop_front()
                .map(|(_, r)| r)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        recycled.clear();
        recycled.extend_from_slice(rows);
        request.steps.push_back((layer, recycled));
        Ok(())
    }

    /// Request `id`'s tokens of this step will be routed to `rows` (`top_k`
    /// ids per token) at `layer`, as that layer's router chose on an
    /// earlier layer's hidden state (router lookahead). Kept, replacing an
    /// older lookahead for `layer`, until the layer's routing is observed.
    pub fn lookahead(
        &mut self,
        id: RequestId,
        layer: usize,
        rows: &[u32],
        top_k: usize,
    ) -> Result<()> {
        let experts = self.eamc.experts();
        if layer >= self.eamc.layers()
            || top_k == 0
            || rows.is_empty()
            || rows.len() % top_k != 0
            || rows.iter().any(|&e| e as usize >= experts)
        {
            return Err(CoreError::Protocol(format!(
                "a lookahead of {} ids for layer {layer} is not rows of {top_k} ids below {experts} \
                 for one of {} layers",
                rows.len(),
                self.eamc.layers()
            )));
        }
        let request = self.live_mut(id)?;
        let mut dist = match request.lookahead.iter().position(|(l, _)| *l == layer) {
            Some(i) => request.lookahead.swap_remove(i).1,
            None => Vec::new(),
        };
        dist.clear();
        dist.resize(experts, 0.0);
        // A share per id, as `step_distribution`: top_k times it is the
        // chance that a token uses the expert.
        let each = 1.0 / rows.len() as f32;
        for &e in rows {
            dist[e as usize] += each;
        }
        request.lookahead.push((layer, dist));
        Ok(())
    }

    /// Drops every live request's router lookahead for the layers past
    /// `last`: a pass that looks at most that far made none of them, so
    /// they are left from a pass that ended (an exception, an interrupt)
    /// before it reached those layers.
    pub fn forget_lookahead_past(&mut self, last: usize) {
        for request in self.live.iter_mut().flatten() {
            request.lookahead.retain(|(layer, _)| *layer <= last);
        }
    }

    /// Blends the request's router lookahead for `layer`, if any, into
    /// its predicted shares there.
    fn blend_lookahead(&self, request: &LiveRequest, layer: usize, share: &mut [f32]) {
        let Some((_, ahead)) = request.lookahead.iter().find(|(l, _)| *l == layer) else {
            return;
        };
        let w = self.config.lookahead_weight;
        for (s, &a) in share.iter_mut().zip(ahead) {
            *s = (1.0 - w) * *s + w * a;
        }
    }

    fn live_mut(&mut self, id: RequestId) -> Result<&mut LiveRequest> {
        match self.live.get_mut(id) {
            Some(Some(m)) => Ok(m),
            _ => Err(CoreError::Protocol(format!("request {id} is not live"))),
        }
    }

    /// The request finished: its activation matrix joins the collection.
    pub fn end_request(&mut self, id: RequestId) -> Result<()> {
        let matcher = self.live_mut(id)?.matcher.clone();
        self.live[id] = None;
        if let Some(&(best, _)) = matcher.best(&self.eamc, 1).first() {
            self.eamc.note_match(best);
        }
        if let Some(index) = self.eamc.insert(matcher.eam())? {
            for other in self.live.iter_mut().flatten() {
                other.matcher.refresh_entry(&self.eamc, index);
            }
        }
        Ok(())
    }

    /// Scores every expert for the layers after `layer` (one retention
    /// score per expert id, layer-major) and returns them with the
    /// prefetch candidates, best first.
    pub fn plan(&mut self, layer: usize) -> Plan<'_> {
        let (layers, experts) = (self.eamc.layers(), self.eamc.experts());
        let horizon = if self.config.horizon == 0 {
            layers
        } else {
            self.config.horizon.min(layers)
        };
        self.scores.fill(0.0);
        self.priority.fill(0.0);
        self.use_probability.fill(0.0);
        // Unmeasured timing: every layer ahead is a candidate.
        let reach = self.timing.map_or(Some(1), |t| t.first_reachable());
        let mut share = vec![0.0f32; experts];
        let mut step = vec![0.0f32; experts];
        let mut led_to = vec![0.0f32; experts];
        for request in self.live.iter().flatten() {
            let matches = request.matcher.best(&self.eamc, self.config.matches);
            let known = self.step_distribution(request, layer, &mut step);
            for d in 1..=horizon {
                let target = (layer + d) % layers;
                let decay = 1.0 - d as f32 / (layers as f32 + 1.0);
                self.predict(request, &matches, target, &mut share);
                let direct = known && d <= self.affinity_tables && target > layer;
                if direct && self.follow_affinity(d, layer, &step, &mut led_to) {
                    let w = self.config.affinity_weight;
                    for (s, &c) in share.iter_mut().zip(&led_to) {
                        *s = (1.0 - w) * *s + w * c;
                    }
                }
                self.blend_lookahead(request, target, &mut share);
                let cells = target * experts..(target + 1) * experts;
                for (((score, priority), probability), &p) in self.scores[cells.clone()]
                    .iter_mut()
                    .zip(&mut self.priority[cells.clone()])
                    .zip(&mut self.use_probability[cells])
                    .zip(&share)
                {
                    *score = score.max(retention(
                        p,
                        d,
                        self.top_k,
                        layers,
                        self.config.reuse_weight,
                    ));
                    let use_probability = (p * self.top_k as f32).min(1.0);
                    *probability = probability.max(use_probability);
                    let reachable = reach.is_some_and(|r| d >= r);
                    if reachable
                        && self
                            .timing
                            .is_none_or(|t| t.worth_prefetching(use_probability, d))
                    {
                        *priority = priority.max(decay * p);
                    }
                }
            }
        }
        let mut best: Vec<(ExpertId, f32)> = self
            .priority
            .iter()
            .enumerate()
            .filter(|&(_, &s)| s > 0.0)
            .map(|(id, &s)| (id as ExpertId, s))
            .collect();
        // Many of the best are resident already; the cache skips those. With
        // half of DeepSeek-V2-Lite's experts cached, 8 per prefetch often
        // held no missing one: 32 do (measured with the lab).
        let depth = self.config.prefetch_depth.saturating_mul(32);
        let by_score =
            |a: &(ExpertId, f32), b: &(ExpertId, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if best.len() > depth {
            best.select_nth_unstable_by(depth, by_score);
            best.truncate(depth);
        }
        best.sort_by(by_score);
        (&self.scores, best)
    }

    /// The request's current step at `layer` as a distribution over experts;
    /// false when the request's last routing was at another layer.
    fn step_distribution(&self, request: &LiveRequest, layer: usize, out: &mut [f32]) -> bool {
        out.fill(0.0);
        let Some((last, rows)) = request.steps.back() else {
            return false;
        };
        if *last != layer || rows.is_empty() {
            return false;
        }
        for &e in rows {
            out[e as usize] += 1.0;
        }
        let total = rows.len() as f32;
        out.iter_mut().for_each(|v| *v /= total);
        true
    }

    /// Where a distribution over layer `from`'s experts leads `d` layers on,
    /// through the direct table for `d`, into `next`; false when nothing is
    /// known about that pair of layers.
    fn follow_affinity(&self, d: usize, from: usize, dist: &[f32], next: &mut [f32]) -> bool {
        let n = dist.len();
        let base = ((d - 1) * self.eamc.layers() + from) * n * n;
        next.fill(0.0);
        for (a, &weight) in dist.iter().enumerate() {
            if weight == 0.0 {
                continue;
            }
            let row = &self.affinity[base + a * n..base + (a + 1) * n];
            let total: f32 = row.iter().sum();
            if total > 0.0 {
                for (v, &c) in next.iter_mut().zip(row) {
                    *v += weight * c / total;
                }
            }
        }
        let mass: f32 = next.iter().sum();
        if mass <= 0.0 {
            return false;
        }
        next.iter_mut().for_each(|v| *v /= mass);
        true
    }

    /// The request's predicted expert shares at `layer` (sums to <= 1).
    fn predict(
        &self,
        request: &LiveRequest,
        matches: &[(usize, f32)],
        layer: usize,
        share: &mut [f32],
    ) {
        share.fill(0.0);
        let mut weight = 0.0;
        let n = share.len();
        let own = &request.recent[layer * n..(layer + 1) * n];
        let own_total: f32 = own.iter().sum();
        if own_total > 0.0 {
            let w = self.config.own_weight / own_total;
            for (s, &c) in share.iter_mut().zip(own) {
                *s += w * c;
            }
            weight += self.config.own_weight;
        }
        let similarity: f32 = matches.iter().map(|m| m.1).sum();
        if similarity > 0.0 {
            let mut used = 0.0;
            for &(entry, sim) in matches {
                let total = self.eamc.row_sum(entry, layer);
                if total > 0.0 {
                    let w = self.config.eamc_weight * sim / similarity / total;
                    for (e, s) in share.iter_mut().enumerate() {
                        *s += w * self.eamc.value(entry, layer, e);
                    }
                    used += sim / similarity;
                }
            }
            weight += self.config.eamc_weight * used;
        }
        let global = self.global.row(layer);
        let global_total: u32 = global.iter().sum();
        if global_total > 0 {
            let w = self.config.global_weight / global_total as f32;
            for (s, &c) in share.iter_mut().zip(global) {
                *s += w * c as f32;
            }
            weight += self.config.global_weight;
        }
        if weight > 0.0 {
            for s in share.iter_mut() {
                *s /= weight;
            }
        }
    }
}

/// Where a co-activation table is halved: f32 counts stop growing by one
/// at 2^24, and the tables persist in the EAMC file across restarts.
const AFFINITY_COUNT_LIMIT: f32 = (1u32 << 23) as f32;

/// Direct affinity tables kept: one per distance up to the horizon, and
/// none reaching past the last layer (a token's next layers only).
fn affinity_tables(config: &PlannerConfig, layers: usize) -> usize {
    config.affinity_horizon.min(layers.saturating_sub(1))
}

/// The planner's tables (`len` values) at the start: the saved ones where
/// their distances d are kept, zero for the rest. The layout is d-major, so
/// the tables for d = 1..=min(saved, kept) are the first values of both.
fn starting_affinity(saved: Option<AffinityTables>, len: usize) -> Result<Vec<f32>> {
    let what = "the planner's affinity tables";
    let Some(saved) = saved else {
        return sizing::zeroed(len, what);
    };
    let mut values = saved.into_values();
    values.truncate(len);
    values
        .try_reserve_exact(len - values.len())
        .map_err(|e| CoreError::InvalidConfig(format!("cannot allocate {what}: {e}")))?;
    values.resize(len, 0.0);
    values.shrink_to_fit();
    Ok(values)
}

/// The affinity tables grow with E² (D·L·E·E floats): checked against the
/// memory limit before they, or anything else, are allocated.
fn check_affinity_table(layers: usize, experts: usize, tables: usize) -> Result<()> {
    let cells = layers
        .checked_mul(experts)
        .and_then(|n| n.checked_mul(experts))
        .and_then(|n| n.checked_mul(tables));
    let what =
        format!("the planner's {tables} affinity tables for {layers} layers of {experts} experts");
    sizing::check_fits(
        &what,
        cells.and_then(|n| sizing::bytes_of(n, 4)),
        sizing::memory_limit(),
    )
    .map_err(CoreError::InvalidConfig)
}

/// Retention of an expert `d` layers ahead whose predicted share of its
/// layer's routing is `share`: the inverse of its expected distance to the
/// next use, in layers. Used with probability p per token, the next use is
/// d layers away with probability p, else a whole token (L layers) later
/// and so on: d + L (1 - p) / p. Evicting the largest expected distance is
/// Belady's rule with predicted distances.
fn retention(share: f32, d: usize, top_k: usize, layers: usize, reuse_weight: f32) -> f32 {
    let p = (share * top_k as f32).min(1.0);
    if p <= 0.0 {
        return 0.0;
    }
    1.0 / (d as f32 + reuse_weight * layers as f32 * (1.0 - p) / p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicts_a_requests_own_experts_next_layer_first() {
        let config = PlannerConfig {
            prefetch_depth: 3,
            ..PlannerConfig::default()
        };
        let mut planner = Planner::new(3, 4, config).unwrap();
        let r = planner.begin_request();
        for _ in 0..3 {
            planner.observe(r, 0, &[0, 1]).unwrap();
            planner.observe(r, 1, &[2, 3]).unwrap();
            planner.observe(r, 2, &[1, 2]).unwrap();
        }
        let (scores, best) = planner.plan(0);
        // Layer 1 (distance 1) outranks layer 2 (distance 2).
        assert!(scores[4 + 2] > scores[8 + 1]);
        assert_eq!(best[0].0, 4 + 2);
        assert!(best.len() >= 3);
        assert_eq!(scores[4], 0.0, "never-used experts score nothing");
    }

    #[test]
    fn prefetches_are_weighed_against_what_a_wrong_one_costs() {
        // A copy as long as two layers' compute.
        let dma = Timing {
            copy_s: 2.0,
            layer_s: 1.0,
            copies_compete: false,
            chunk_s: None,
        };
        // Gain p * min(2, d); the delay it can cause: 2 - 1, right or wrong.
        assert!(dma.worth_prefetching(0.6, 2));
        assert!(!dma.worth_prefetching(0.4, 2));
        assert!(!dma.worth_prefetching(0.9, 1), "hides 0.9 of 1 s' delay");
        // A copy that takes the computing processor costs all of its time
        // when wrong: gain p * min(2, d) against (1 - p) * 2.
        let memcpy = Timing {
            copies_compete: true,
            ..dma
        };
        assert!(!memcpy.worth_prefetching(0.45, 2));
        assert!(memcpy.worth_prefetching(0.55, 2));
        // A copy shorter than a layer's compute: a first prefetch delays
        // nothing.
        let fast = Timing { copy_s: 0.5, ..dma };
        assert!(fast.worth_prefetching(0.01, 1));
    }

    #[test]
    fn the_nearest_reachable_layer_follows_copy_and_layer_times() {
        let timing = |copy_s: f32, layer_s: f32| Timing {
            copy_s,
            layer_s,
            copies_compete: false,
            chunk_s: None,
        };
        // 17.3 MB at 50 GB/s against 300 us of compute: l + 2 at the nearest.
        assert_eq!(timing(346e-6, 300e-6).first_reachable(), Some(2));
        assert_eq!(timing(346e-6, 400e-6).first_reachable(), Some(1));
        assert_eq!(timing(1e-3, 1e-3).first_reachable(), Some(1));
        assert_eq!(timing(7.04e-3, 300e-6).first_reachable(), Some(24));
        assert_eq!(timing(0.0, 300e-6).first_reachable(), Some(1));
        assert_eq!(timing(346e-6, 0.0).first_reachable(), None);
    }

    /// A planner over `layers` layers of 4 experts that has seen one
    /// request route expert `e` at every layer l to expert (e + l) % 4 for
    /// a few tokens, and a live request at layer 0 of a token.
    fn planner_with_routing(layers: usize, timing: Option<Timing>) -> (Planner, RequestId) {
        planner_configured(layers, timing, PlannerConfig::default())
    }

    fn planner_configured(
        layers: usize,
        timing: Option<Timing>,
        config: PlannerConfig,
    ) -> (Planner, RequestId) {
        let mut planner = Planner::new(layers, 4, config).unwrap();
        if let Some(timing) = timing {
            planner.set_timing(timing);
        }
        let past = planner.begin_request();
        for _ in 0..4 {
            for layer in 0..layers {
                planner.observe(past, layer, &[layer as u32 % 4]).unwrap();
            }
        }
        planner.end_request(past).unwrap();
        let now = planner.begin_request();
        planner.observe(now, 0, &[0]).unwrap();
        (planner, now)
    }

    #[test]
    fn a_prefetch_for_a_layer_the_copy_cannot_reach_in_time_is_not_issued() {
        let slow = Timing {
            copy_s: 346e-6,
            layer_s: 300e-6,
            copies_compete: false,
            chunk_s: None,
        };
        let (mut planner, _) = planner_with_routing(4, Some(slow));
        let (scores, best) = planner.plan(0);
        // Layer 1 is predicted (and kept) but cannot be reached: no
        // candidate of layer 1; layer 2 comes first.
        assert!(scores[4 + 1] > 0.0);
        assert!(best.iter().all(|&(id, _)| id / 4 != 1), "{best:?}");
        assert_eq!(best.first().map(|&(id, _)| id), Some(2 * 4 + 2));
        // In the cache core nothing of layer 1 is queued either.
        let layout = crate::layout::ExpertLayout::new(&[(4, 10); 4]).unwrap();
        let pool = crate::tiers::device::SlotPool::new(0, 16, 4, 16).unwrap();
        let policy = crate::cache::activation_aware::ActivationAware::new(4, 16);
        let mut core = crate::cache::core::CacheCore::new(layout, pool, Box::new(policy));
        let queue = crate::queue::PrefetchQueue::new();
        core.plan(&queue, planner.scores(), &best, 8);
        let layer_one = queue.count_if(|r| r.expert / 4 == 1);
        assert_eq!((layer_one, queue.is_empty()), (0, false));
        // With layers longer than a copy, layer 1 is reachable and first.
        let fast = Timing {
            layer_s: 400e-6,
            ..slow
        };
        let (mut planner, _) = planner_with_routing(4, Some(fast));
        assert_eq!(planner.plan(0).1.first().map(|&(id, _)| id), Some(4 + 1));
    }

    #[test]
    fn direct_tables_predict_two_layers_ahead() {
        // Layer 1 routes at random; layer 2 follows layer 0 exactly
        // (expert e at layer 0, expert 3 - e at layer 2). Chaining through
        // layer 1 would blur that; the l -> l + 2 table keeps it.
        let config = PlannerConfig {
            own_weight: 0.0,
            eamc_weight: 0.0,
            affinity_weight: 1.0,
            ..PlannerConfig::default()
        };
        let mut planner = Planner::new(3, 4, config).unwrap();
        let past = planner.begin_request();
        for t in 0..40u32 {
            let e = t % 4;
            planner.observe(past, 0, &[e]).unwrap();
            planner.observe(past, 1, &[(t * 7 + 3) % 4]).unwrap();
            planner.observe(past, 2, &[3 - e]).unwrap();
        }
        planner.end_request(past).unwrap();
        let now = planner.begin_request();
        for e in 0..4 {
            planner.observe(now, 0, &[e]).unwrap();
            let (scores, _) = planner.plan(0);
            let layer_two = &scores[8..12];
            let best = (0..4).max_by(|&a, &b| layer_two[a].total_cmp(&layer_two[b]));
            assert_eq!(best, Some(3 - e as usize), "{layer_two:?}");
            planner.observe(now, 1, &[0]).unwrap();
            planner.observe(now, 2, &[3 - e]).unwrap();
        }
    }

    #[test]
    fn a_router_lookahead_leads_the_prefetches_for_its_layer_until_the_layer_routes() {
        // Layer 2 has always used expert 2; its router, run on layer 0's
        // hidden state, now says 3, weighed above the history.
        let config = PlannerConfig {
            lookahead_weight: 0.8,
            ..PlannerConfig::default()
        };
        let (mut planner, now) = planner_configured(4, None, config);
        let first_of_layer_two = |planner: &mut Planner, layer: usize| {
            let (_, best) = planner.plan(layer);
            best.iter().map(|&(id, _)| id).find(|&id| id / 4 == 2)
        };
        assert_eq!(first_of_layer_two(&mut planner, 0), Some(2 * 4 + 2));
        planner.lookahead(now, 2, &[3], 1).unwrap();
        assert_eq!(first_of_layer_two(&mut planner, 0), Some(2 * 4 + 3));
        planner.observe(now, 1, &[1]).unwrap();
        assert_eq!(first_of_layer_two(&mut planner, 1), Some(2 * 4 + 3));
        // Layer 2's own routing replaces the lookahead: the next token's
        // layer 2 (a whole token ahead) is predicted from history again.
        planner.observe(now, 2, &[2]).unwrap();
        assert_eq!(first_of_layer_two(&mut planner, 2), Some(2 * 4 + 2));
        // A lookahead a pass left behind (it ended before layer 3) is
        // dropped when the next pass looks no further than layer 2.
        let first_of_layer_three = |planner: &mut Planner| {
            let (_, best) = planner.plan(0);
            best.iter().map(|&(id, _)| id).find(|&id| id / 4 == 3)
        };
        let before = first_of_layer_three(&mut planner);
        planner.lookahead(now, 3, &[1], 1).unwrap();
        assert_eq!(first_of_layer_three(&mut planner), Some(3 * 4 + 1));
        planner.forget_lookahead_past(2);
        assert_eq!(first_of_layer_three(&mut planner), before);
        for (layer, rows, top_k) in [(4, &[0u32][..], 1), (1, &[4], 1), (1, &[0, 1, 2], 2)] {
            let error = planner.lookahead(now, layer, rows, top_k).unwrap_err();
            assert!(error.to_string().contains("lookahead of"), "{error}");
        }
        let error = planner.lookahead(99, 1, &[0], 1).unwrap_err();
        assert!(
            error.to_string().contains("request 99 is not live"),
            "{error}"
        );
        let config = PlannerConfig {
            lookahead_weight: 1.5,
            ..PlannerConfig::default()
        };
        let error = Planner::new(2, 4, config).err().unwrap().to_string();
        assert!(error.contains("lookahead_weight=1.5"), "{error}");
    }

    #[test]
    fn a_co_activation_table_near_the_f32_limit_is_halved_keeping_its_proportions() {
        let mut planner = Planner::new(2, 4, PlannerConfig::default()).unwrap();
        // Layer 0 -> 1: expert 0 led to 1 three times as often as to 2.
        planner.affinity[1] = AFFINITY_COUNT_LIMIT - 1.0;
        planner.affinity[2] = (AFFINITY_COUNT_LIMIT - 1.0) / 3.0;
        let r = planner.begin_request();
        planner.observe(r, 0, &[0]).unwrap();
        planner.observe(r, 1, &[1]).unwrap();
        let (ones, twos) = (planner.affinity[1], planner.affinity[2]);
        assert_eq!(ones, AFFINITY_COUNT_LIMIT / 2.0);
        assert!((ones / twos - 3.0).abs() < 1e-3, "{ones} {twos}");
    }

    #[test]
    fn finished_requests_inform_new_ones() {
        let mut planner = Planner::new(2, 4, PlannerConfig::default()).unwrap();
        let past = planner.begin_request();
        for _ in 0..4 {
            planner.observe(past, 0, &[0]).unwrap();
            planner.observe(past, 1, &[3]).unwrap();
        }
        planner.end_request(past).unwrap();
        assert_eq!(planner.collection().len(), 1);
        let now = planner.begin_request();
        planner.observe(now, 0, &[0]).unwrap();
        let (scores, _) = planner.plan(0);
        // Layer 1 unseen by this request: the match and global counts say 3.
        assert!(scores[4 + 3] > 0.0);
        assert!(scores[4 + 3] > scores[4]);
        assert!(planner.end_request(99).is_err());
    }

    #[test]
    fn sizes_from_settings_and_shapes_are_checked_before_allocating() {
        for eamc_capacity in [0, 10_000_000_000, usize::MAX] {
            let config = PlannerConfig {
                eamc_capacity,
                ..PlannerConfig::default()
            };
            let err = Planner::new(2, 4, config).err().unwrap();
            assert!(matches!(err, CoreError::InvalidConfig(_)), "{err}");
            assert!(err.to_string().contains("eamc_capacity"), "{err}");
        }
        // A routing shape (from a trace) whose E² table cannot exist.
        let config = PlannerConfig {
            eamc_capacity: 1,
            ..PlannerConfig::default()
        };
        let err = Planner::new(2, 1 << 24, config).err().unwrap().to_string();
        assert!(err.contains("affinity table"), "{err}");
        // The largest prefetch depth plans (its candidate count saturates).
        let config = PlannerConfig {
            prefetch_depth: usize::MAX,
            ..PlannerConfig::default()
        };
        let mut planner = Planner::new(2, 4, config).unwrap();
        let r = planner.begin_request();
        planner.observe(r, 0, &[1]).unwrap();
        planner.observe(r, 1, &[2]).unwrap();
        assert!(!planner.plan(0).1.is_empty());
    }
}
