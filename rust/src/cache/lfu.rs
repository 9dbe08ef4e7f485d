//! Least-frequently-used eviction: the fewest uses since the expert entered
//! the cache goes first (least recently used among equals).

use super::CachePolicy;
use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

pub struct Lfu {
    uses: Vec<u64>,
    last_use: Vec<u64>,
    clock: u64,
}

impl Lfu {
    pub fn new(n_slots: usize) -> Self {
        Self {
            uses: vec![0; n_slots],
            last_use: vec![0; n_slots],
            clock: 0,
        }
    }

    fn touch(&mut self, slot: SlotId) {
        self.clock += 1;
        self.uses[slot as usize] += 1;
        self.last_use[slot as usize] = self.clock;
    }
}

impl CachePolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }

    fn on_insert(&mut self, slot: SlotId, _expert: ExpertId) {
        self.uses[slot as usize] = 0;
        self.touch(slot);
    }

    fn on_access(&mut self, slot: SlotId, _expert: ExpertId) {
        self.touch(slot);
    }

    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId> {
        candidates
            .min_by_key(|&(slot, _)| (self.uses[slot as usize], self.last_use[slot as usize]))
            .map(|(slot, _)| slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_used_then_the_oldest() {
        let mut lfu = Lfu::new(3);
        for s in 0..3 {
            lfu.on_insert(s, s);
        }
        lfu.on_access(0, 0);
        lfu.on_access(0, 0);
        lfu.on_access(2, 2);
        let all = [(0, 0), (1, 1), (2, 2)];
        assert_eq!(lfu.choose_victim(&mut all.into_iter()), Some(1));
        lfu.on_insert(1, 7); // a newcomer starts from one use
        lfu.on_access(1, 7);
        assert_eq!(lfu.choose_victim(&mut all.into_iter()), Some(2));
    }
}
