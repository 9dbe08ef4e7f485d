//! The expert cache: which experts occupy the device slots, the eviction
//! policy that decides who leaves, and the fetch / wait / release protocol
//! the model's MoE layers follow.

pub mod lru;

mod expert_cache;

pub use expert_cache::{CacheConfig, Device, ExpertCache};

use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

/// An eviction policy. The slot pool tells it what happens; it only picks
/// victims among the candidates offered (never a pinned or mid-copy slot).
pub trait CachePolicy: Send {
    fn name(&self) -> &'static str;
    /// `expert` was just given `slot`.
    fn on_insert(&mut self, slot: SlotId, expert: ExpertId);
    /// `expert`, already in `slot`, is used again.
    fn on_access(&mut self, slot: SlotId, expert: ExpertId);
    /// `expert` left `slot`.
    fn on_evict(&mut self, slot: SlotId, expert: ExpertId);
    /// The slot to free among `candidates` (slot, expert it holds), or
    /// `None` when there are none.
    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId>;
}

/// The policy called `name`, for a pool of `n_slots`.
pub fn policy_by_name(name: &str, n_slots: usize) -> crate::error::Result<Box<dyn CachePolicy>> {
    match name {
        "lru" => Ok(Box::new(lru::Lru::new(n_slots))),
        other => Err(crate::error::CoreError::InvalidConfig(format!(
            "unknown cache policy {other:?}; available: lru"
        ))),
    }
}
