//! moe-offload's policy: keep the experts the live requests are predicted to
//! need soonest. The planner scores every expert from the request's own
//! activations, its best EAMC matches and global frequencies, discounted by
//! layer distance; eviction takes the lowest score (least recently used
//! among equals), and prefetches are issued only when they beat it.

use super::CachePolicy;
use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

pub struct ActivationAware {
    scores: Vec<f32>,
    last_use: Vec<u64>,
    clock: u64,
}

impl ActivationAware {
    pub fn new(n_slots: usize, num_experts: usize) -> Self {
        Self {
            scores: vec![0.0; num_experts],
            last_use: vec![0; n_slots],
            clock: 0,
        }
    }

    fn touch(&mut self, slot: SlotId) {
        self.clock += 1;
        self.last_use[slot as usize] = self.clock;
    }
}

impl CachePolicy for ActivationAware {
    fn name(&self) -> &'static str {
        "activation-aware"
    }

    fn on_access(&mut self, slot: SlotId, _expert: ExpertId) {
        self.touch(slot);
    }

    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId> {
        candidates
            .min_by(|&(a_slot, a), &(b_slot, b)| {
                self.scores[a as usize]
                    .total_cmp(&self.scores[b as usize])
                    .then(self.last_use[a_slot as usize].cmp(&self.last_use[b_slot as usize]))
            })
            .map(|(slot, _)| slot)
    }

    fn prefetches(&self) -> bool {
        true
    }

    fn on_plan(&mut self, scores: &[f32]) {
        self.scores.copy_from_slice(scores);
    }

    fn retention(&self, expert: ExpertId) -> f32 {
        self.scores[expert as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_lowest_predicted_reuse() {
        let mut policy = ActivationAware::new(3, 5);
        for s in 0..3 {
            policy.on_insert(s, s);
        }
        policy.on_plan(&[0.5, 0.1, 0.9, 0.0, 0.0]);
        let all = [(0, 0), (1, 1), (2, 2)];
        assert_eq!(policy.choose_victim(&mut all.into_iter()), Some(1));
        assert_eq!(policy.retention(2), 0.9);
        policy.on_plan(&[0.0; 5]);
        // All equal: least recently used.
        policy.on_access(0, 0);
        assert_eq!(policy.choose_victim(&mut all.into_iter()), Some(1));
    }
}
