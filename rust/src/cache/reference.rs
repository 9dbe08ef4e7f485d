//! The reference implementation's behaviour (MoE-Infinity as published):
//! experts are fetched on demand only, and eviction keeps the experts with
//! the highest activation frequency observed over the whole run (counts
//! survive eviction), least recently used first among equals.

use super::CachePolicy;
use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

pub struct Reference {
    frequency: Vec<u64>,
    last_use: Vec<u64>,
    clock: u64,
}

impl Reference {
    pub fn new(num_experts: usize) -> Self {
        Self {
            frequency: vec![0; num_experts],
            last_use: vec![0; num_experts],
            clock: 0,
        }
    }

    fn touch(&mut self, expert: ExpertId) {
        self.clock += 1;
        self.frequency[expert as usize] += 1;
        self.last_use[expert as usize] = self.clock;
    }
}

impl CachePolicy for Reference {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn on_access(&mut self, _slot: SlotId, expert: ExpertId) {
        self.touch(expert);
    }

    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId> {
        candidates
            .min_by_key(|&(_, e)| (self.frequency[e as usize], self.last_use[e as usize]))
            .map(|(slot, _)| slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_survives_eviction() {
        let mut policy = Reference::new(4);
        for _ in 0..3 {
            policy.on_insert(0, 3);
        }
        policy.on_evict(0, 3);
        policy.on_insert(0, 1);
        policy.on_insert(1, 3);
        // Expert 3 was used 4 times in all, expert 1 once.
        assert_eq!(
            policy.choose_victim(&mut [(0, 1), (1, 3)].into_iter()),
            Some(0)
        );
    }
}
