//! The policy lab's simulated clock: replay recorded routing through the
//! real cache core, planner and prefetch queue, with copies that take
//! `bytes / bandwidth` on one copy engine and MoE layers that compute for a
//! fixed time. A needed expert that has not arrived stalls the clock.
//!
//! Requests run one after another. Each finished request joins the EAMC,
//! so later requests are matched against earlier ones (and against the
//! warm-up requests), never against themselves.

use std::ops::ControlFlow;

use crate::cache::core::{CacheCore, CopyJob};
use crate::cache::oracle::Oracle;
use crate::cache::policy_by_name;
use crate::error::{CoreError, Result};
use crate::layout::{ExpertId, ExpertLayout};
use crate::planner::{Planner, PlannerConfig, RequestId, Timing};
use crate::queue::PrefetchQueue;
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
    pub stall_s: f64,
    pub total_s: f64,
    pub resident_s: f64,
}

/// One copy engine on a simulated clock.
struct CopyEngine {
    /// When the engine finishes its current copy (or went idle).
    free_at: f64,
    current: Option<CopyJob>,
    seconds_per_byte: f64,
}

impl CopyEngine {
    /// Runs the engine up to time `now`: completes copies that end by then
    /// and starts queued ones back to back (none starts before `enqueued`).
    fn run_until(&mut self, core: &mut CacheCore, queue: &PrefetchQueue, now: f64, enqueued: f64) {
        loop {
            if let Some(job) = self.current {
                if self.free_at > now {
                    return;
                }
                core.finish_copy(&job, Ok(()));
                self.current = None;
            }
            if !self.start_next(core, queue, enqueued) {
                return;
            }
        }
    }

    fn start_next(&mut self, core: &mut CacheCore, queue: &PrefetchQueue, enqueued: f64) -> bool {
        while let Some(request) = queue.try_pop() {
            if let Some(job) = core.accept(request) {
                self.free_at =
                    self.free_at.max(enqueued) + job.bytes as f64 * self.seconds_per_byte;
                self.current = Some(job);
                return true;
            }
        }
        false
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
            if self.current.is_none() && !self.start_next(core, queue, now) {
                return Err(CoreError::Protocol(
                    "replay: a fetched expert is not ready and has no copy queued or running"
                        .into(),
                ));
            }
            now = now.max(self.free_at);
            self.run_until(core, queue, now, now);
        }
        Ok(now)
    }
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
    let policy = if policy == "oracle" {
        Box::new(Oracle::new(
            &access_sequence(config, requests),
            layout.num_experts(),
        ))
    } else {
        policy_by_name(policy, config.slots, layout.num_experts())?
    };
    let predictive = policy.prefetches();
    let mut core = CacheCore::new(layout, pool, policy);
    // Only a predictive policy uses the planner (and its EAMC's memory).
    let mut planner = if predictive {
        let mut planner = Planner::new(config.layers, config.experts, config.planner.clone())?;
        planner.set_timing(Timing {
            copy_s: (config.expert_bytes as f64 / config.bandwidth_bytes_per_s) as f32,
            layer_s: config.layer_compute_s as f32,
            copies_compete: false,
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
    let mut engine = CopyEngine {
        free_at: 0.0,
        current: None,
        seconds_per_byte: 1.0 / config.bandwidth_bytes_per_s,
    };
    let mut now = 0.0f64;
    let mut stall = 0.0f64;
    let mut ids: Vec<ExpertId> = Vec::with_capacity(config.top_k);
    for (done, request) in requests.iter().enumerate() {
        let id: Option<RequestId> = planner.as_mut().map(|p| p.begin_request());
        for_each_layer(config, request, |_, layer, experts| {
            engine.run_until(&mut core, &queue, now, now);
            ids.clear();
            ids.extend(
                experts
                    .iter()
                    .map(|&e| (layer * config.experts) as ExpertId + e),
            );
            // The router's choice is known before the experts are fetched:
            // plan first, so evictions see this layer's routing.
            if let (Some(id), Some(planner)) = (id, planner.as_mut()) {
                planner.observe(id, layer, experts)?;
                let depth = planner.prefetch_depth();
                let (scores, prefetch) = planner.plan(layer);
                core.plan(&queue, scores, &prefetch, depth);
            }
            let slots = loop {
                match core.fetch(&queue, &ids) {
                    // Prefetches in flight hold the slots: let them land.
                    Err(CoreError::BudgetTooSmall { .. }) if engine.current.is_some() => {
                        now = now.max(engine.free_at);
                        engine.run_until(&mut core, &queue, now, now);
                    }
                    outcome => break outcome?,
                }
            };
            engine.run_until(&mut core, &queue, now, now);
            let ready = engine.wait_for(&mut core, &queue, &slots, now)?;
            stall += ready - now;
            now = ready;
            for &e in &ids {
                core.release(e, false)?;
            }
            now += config.layer_compute_s;
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
    }))
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
}
