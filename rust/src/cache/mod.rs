//! The expert cache: which experts occupy the device slots, the eviction
//! policy that decides who leaves, and the fetch / wait / release protocol
//! the model's MoE layers follow.

pub mod activation_aware;
pub mod core;
pub mod lfu;
pub mod lru;
pub mod oracle;
pub mod pass_gate;
pub mod reference;

mod expert_cache;

pub use expert_cache::{CacheConfig, Device, ExpertCache, MAX_COPY_WORKERS};
pub use pass_gate::PassGate;

use crate::error::{CoreError, Result};
use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

/// An eviction policy. The slot pool tells it what happens; it only picks
/// victims among the candidates offered (never a pinned or mid-copy slot).
pub trait CachePolicy: Send {
    fn name(&self) -> &'static str;
    /// `expert`, already in `slot`, is used again.
    fn on_access(&mut self, slot: SlotId, expert: ExpertId);
    /// `expert` was just given `slot`: by default, its first use.
    fn on_insert(&mut self, slot: SlotId, expert: ExpertId) {
        self.on_access(slot, expert);
    }
    /// `expert` left `slot` (a hook for policies that forget on eviction).
    fn on_evict(&mut self, _slot: SlotId, _expert: ExpertId) {}
    /// The slot to free among `candidates` (slot, expert it holds), or
    /// `None` when there are none.
    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId>;
    /// Whether the planner's prefetches should be issued under this policy.
    fn prefetches(&self) -> bool {
        false
    }
    /// The planner's new predicted reuse, one score per expert id.
    fn on_plan(&mut self, _scores: &[f32]) {}
    /// How much keeping `expert` is worth: a prefetch may evict it only for
    /// an expert worth more.
    fn retention(&self, _expert: ExpertId) -> f32 {
        f32::INFINITY
    }
}

/// The policies available by name (the oracle needs the future and is built
/// by the trace replay only).
pub const POLICY_NAMES: [&str; 4] = ["lru", "lfu", "reference", "activation-aware"];

/// The policy called `name`, for a pool of `n_slots` and `num_experts` ids.
pub fn policy_by_name(
    name: &str,
    n_slots: usize,
    num_experts: usize,
) -> Result<Box<dyn CachePolicy>> {
    match name {
        "lru" => Ok(Box::new(lru::Lru::new(n_slots))),
        "lfu" => Ok(Box::new(lfu::Lfu::new(n_slots))),
        "reference" => Ok(Box::new(reference::Reference::new(num_experts))),
        "activation-aware" => Ok(Box::new(activation_aware::ActivationAware::new(
            n_slots,
            num_experts,
        ))),
        other => Err(CoreError::InvalidConfig(format!(
            "unknown cache policy {other:?}; available: {} (and oracle, in trace replay)",
            POLICY_NAMES.join(", ")
        ))),
    }
}
