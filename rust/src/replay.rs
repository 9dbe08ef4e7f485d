//! The policy lab's simulated clock: replay recorded routing through the
//! real cache core, planner and prefetch queue, with copies that take
//! `bytes / bandwidth` on one copy engine and MoE layers that compute for a
//! fixed time. A needed expert that has not arrived stalls the clock.
//!
//! Requests run one after another. Each finished request joins the EAMC,
//! so later requests are matched against earlier ones (and against the
//! warm-up requests), never against themselves.

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
    ) -> f64 {
        while slots.iter().any(|&s| core.phase(s) != &Phase::Ready) {
            if self.current.is_none() && !self.start_next(core, queue, now) {
                unreachable!("a fetched expert that is not ready has its copy queued or running");
            }
            now = now.max(self.free_at);
            self.run_until(core, queue, now, now);
        }
        now
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
    let mut planner = Planner::new(config.layers, config.experts, config.planner.clone())?;
    planner.set_timing(Timing {
        copy_s: (config.expert_bytes as f64 / config.bandwidth_bytes_per_s) as f32,
        layer_s: config.layer_compute_s as f32,
        copies_compete: false,
    });
    if predictive {
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
    for request in requests {
        let id: Option<RequestId> = predictive.then(|| planner.begin_request());
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
            if let Some(id) = id {
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
            let ready = engine.wait_for(&mut core, &queue, &slots, now);
            stall += ready - now;
            now = ready;
            for &e in &ids {
                core.release(e, false)?;
            }
            now += config.layer_compute_s;
            Ok(())
        })?;
        if let Some(id) = id {
            planner.end_request(id)?;
        }
    }
    let tokens: u64 = requests.iter().map(|r| r.tokens as u64).sum();
    let stats = core.stats();
    Ok(ReplayReport {
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
    })
}

fn validate<'a>(
    config: &ReplayConfig,
    mut requests: impl Iterator<Item = &'a Routing<'a>>,
) -> Result<()> {
    if config.slots < config.top_k {
        return Err(CoreError::BudgetTooSmall {
            needed: config.top_k,
            available: config.slots,
            min_bytes: config.top_k * config.expert_bytes as usize,
        });
    }
    let bandwidth_ok =
        config.bandwidth_bytes_per_s.is_finite() && config.bandwidth_bytes_per_s > 0.0;
    if !bandwidth_ok || config.layer_compute_s < 0.0 {
        return Err(CoreError::InvalidConfig(
            "bandwidth must be positive and compute time non-negative".into(),
        ));
    }
    let per_token = config.layers * config.top_k;
    match requests.find(|r| {
        r.ids.len() != r.tokens * per_token || r.ids.iter().any(|&e| e as usize >= config.experts)
    }) {
        Some(bad) => Err(CoreError::InvalidConfig(format!(
            "a request of {} tokens has {} expert ids (expected {} per token, each below {})",
            bad.tokens,
            bad.ids.len(),
            per_token,
            config.experts
        ))),
        None => Ok(()),
    }
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
}
