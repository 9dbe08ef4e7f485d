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

use crate::error::{CoreError, Result};
use crate::layout::ExpertId;
use crate::trace::eamc::MAX_CAPACITY;
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
    /// experts lead to at the next layer) in near-layer predictions.
    pub affinity_weight: f32,
    /// Layers ahead that affinity predictions are chained through.
    pub affinity_horizon: usize,
    /// Weight of the per-token reuse term against layer distance in an
    /// expert's expected distance to its next use (1 = the plain model).
    pub reuse_weight: f32,
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
            affinity_horizon: 2,
            reuse_weight: 0.2,
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
}

impl Timing {
    /// Whether prefetching an expert used with probability `p`, `d` layers
    /// ahead, gains more time than it is expected to cost.
    fn worth_prefetching(&self, p: f32, d: usize) -> bool {
        let gain = p * self.copy_s.min(d as f32 * self.layer_s);
        let wasted = if self.copies_compete {
            self.copy_s
        } else {
            (self.copy_s - self.layer_s).max(0.0)
        };
        gain > (1.0 - p) * wasted
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
    /// The layer last routed and its token rows (`top_k` ids each).
    step_layer: usize,
    step_rows: Vec<u32>,
}

pub struct Planner {
    config: PlannerConfig,
    eamc: ActivationCollection,
    live: Vec<Option<LiveRequest>>,
    global: ActivationMatrix,
    /// `affinity[(l * E + a) * E + b]`: tokens routed to a at layer l and
    /// to b at layer l + 1, over every request observed.
    affinity: Vec<f32>,
    /// Experts per token per layer, as observed.
    top_k: usize,
    /// Retention: predicted reuse, mildly discounted by distance.
    scores: Vec<f32>,
    /// Prefetch priority: predicted use, discounted by distance.
    priority: Vec<f32>,
    /// Unknown until measured: then every predicted expert is a candidate.
    timing: Option<Timing>,
}

impl Planner {
    pub fn new(layers: usize, experts: usize, config: PlannerConfig) -> Result<Self> {
        config.check()?;
        check_affinity_table(layers, experts)?;
        let eamc =
            ActivationCollection::new(config.eamc_capacity, layers, experts, config.replacement)?;
        Self::with_collection(eamc, config)
    }

    /// A planner that starts from a saved collection.
    pub fn with_collection(eamc: ActivationCollection, config: PlannerConfig) -> Result<Self> {
        config.check()?;
        let (layers, experts) = (eamc.layers(), eamc.experts());
        check_affinity_table(layers, experts)?;
        Ok(Self {
            config,
            live: Vec::new(),
            global: ActivationMatrix::new(layers, experts),
            affinity: sizing::zeroed(layers * experts * experts, "the planner's affinity table")?,
            top_k: 1,
            scores: vec![0.0; layers * experts],
            priority: vec![0.0; layers * experts],
            timing: None,
            eamc,
        })
    }

    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = Some(timing);
    }

    pub fn prefetch_depth(&self) -> usize {
        self.config.prefetch_depth
    }

    pub fn collection(&self) -> &ActivationCollection {
        &self.eamc
    }

    pub fn begin_request(&mut self) -> RequestId {
        let matcher = LiveRequest {
            matcher: RequestMatcher::new(&self.eamc),
            recent: vec![0.0; self.eamc.layers() * self.eamc.experts()],
            step_layer: usize::MAX,
            step_rows: Vec::new(),
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
        // The same tokens one layer further: learn where their experts led.
        if layer > 0 && request.step_layer == layer - 1 && request.step_rows.len() == rows.len() {
            let base = (layer - 1) * experts * experts;
            for (before, after) in request.step_rows.chunks(top_k).zip(rows.chunks(top_k)) {
                for &a in before {
                    for &b in after {
                        self.affinity[base + a as usize * experts + b as usize] += 1.0;
                    }
                }
            }
        }
        request.step_layer = layer;
        request.step_rows.clear();
        request.step_rows.extend_from_slice(rows);
        Ok(())
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
        let mut share = vec![0.0f32; experts];
        let mut chained = vec![0.0f32; experts];
        for request in self.live.iter().flatten() {
            let matches = request.matcher.best(&self.eamc, self.config.matches);
            let mut chain = self.step_distribution(request, layer, &mut chained);
            for d in 1..=horizon {
                let target = (layer + d) % layers;
                let decay = 1.0 - d as f32 / (layers as f32 + 1.0);
                self.predict(request, &matches, target, &mut share);
                chain = chain && d <= self.config.affinity_horizon && target > layer;
                if chain && self.follow_affinity(target - 1, &mut chained) {
                    let w = self.config.affinity_weight;
                    for (s, &c) in share.iter_mut().zip(&chained) {
                        *s = (1.0 - w) * *s + w * c;
                    }
                }
                let cells = target * experts..(target + 1) * experts;
                for ((score, priority), &p) in self.scores[cells.clone()]
                    .iter_mut()
                    .zip(&mut self.priority[cells])
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
                    if self
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
        // Many of the best are resident already; the cache skips those.
        let depth = self.config.prefetch_depth.saturating_mul(8);
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
        if request.step_layer != layer || request.step_rows.is_empty() {
            return false;
        }
        for &e in &request.step_rows {
            out[e as usize] += 1.0;
        }
        let total = request.step_rows.len() as f32;
        out.iter_mut().for_each(|v| *v /= total);
        true
    }

    /// Moves a distribution over layer `from`'s experts one layer on through
    /// the affinity counts; false when nothing is known about that layer.
    fn follow_affinity(&self, from: usize, dist: &mut [f32]) -> bool {
        let n = dist.len();
        let mut next = vec![0.0f32; n];
        for (a, &weight) in dist.iter().enumerate() {
            if weight == 0.0 {
                continue;
            }
            let row = &self.affinity[(from * n + a) * n..(from * n + a + 1) * n];
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
        for (d, v) in dist.iter_mut().zip(next) {
            *d = v / mass;
        }
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

/// The affinity table grows with E² (L·E·E floats): checked against the
/// memory limit before it, or anything else, is allocated.
fn check_affinity_table(layers: usize, experts: usize) -> Result<()> {
    let cells = layers
        .checked_mul(experts)
        .and_then(|n| n.checked_mul(experts));
    let what = format!("the planner's affinity table for {layers} layers of {experts} experts");
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
        };
        // Gain p * min(2, d); loss (1 - p) * (2 - 1).
        assert!(dma.worth_prefetching(0.6, 1));
        assert!(!dma.worth_prefetching(0.4, 1));
        assert!(dma.worth_prefetching(0.4, 2));
        // A copy that takes the computing processor costs all of its time.
        let memcpy = Timing {
            copies_compete: true,
            ..dma
        };
        assert!(!memcpy.worth_prefetching(0.5, 2));
        assert!(memcpy.worth_prefetching(0.6, 2));
        // A copy shorter than a layer's compute: a wrong one costs nothing.
        let fast = Timing { copy_s: 0.5, ..dma };
        assert!(fast.worth_prefetching(0.01, 1));
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
        let err = Planner::new(1, 1 << 24, config).err().unwrap().to_string();
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
