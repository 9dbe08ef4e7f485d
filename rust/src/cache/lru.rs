//! Least-recently-used eviction: the baseline every smarter policy must beat.

use super::CachePolicy;
use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

/// Evicts the slot whose expert was used longest ago.
pub struct Lru {
    last_use: Vec<u64>,
    clock: u64,
}

impl Lru {
    pub fn new(n_slots: usize) -> Self {
        Self {
            last_use: vec![0; n_slots],
            clock: 0,
        }
    }

    fn touch(&mut self, slot: SlotId) {
        self.clock += 1;
        self.last_use[slot as usize] = self.clock;
    }
}

impl CachePolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn on_access(&mut self, slot: SlotId, _expert: ExpertId) {
        self.touch(slot);
    }

    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId> {
        candidates
            .min_by_key(|&(slot, _)| self.last_use[slot as usize])
            .map(|(slot, _)| slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn victim(lru: &mut Lru, slots: &[SlotId]) -> Option<SlotId> {
        lru.choose_victim(&mut slots.iter().map(|&s| (s, s * 10)))
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let mut lru = Lru::new(4);
        for s in 0..4 {
            lru.on_insert(s, s * 10);
        }
        assert_eq!(victim(&mut lru, &[0, 1, 2, 3]), Some(0));
        lru.on_access(0, 0);
        assert_eq!(victim(&mut lru, &[0, 1, 2, 3]), Some(1));
        lru.on_access(1, 10);
        lru.on_access(2, 20);
        assert_eq!(victim(&mut lru, &[0, 1, 2, 3]), Some(3));
    }

    #[test]
    fn only_chooses_among_candidates() {
        let mut lru = Lru::new(3);
        for s in 0..3 {
            lru.on_insert(s, s);
        }
        // Slot 0 is the oldest but in use (not offered).
        assert_eq!(victim(&mut lru, &[1, 2]), Some(1));
        assert_eq!(victim(&mut lru, &[]), None);
    }

    #[test]
    fn matches_a_reference_lru_on_a_random_sequence() {
        // A simple simulation: one slot per expert of 6, accesses via a
        // xorshift sequence; compare against a Vec kept in recency order.
        let mut lru = Lru::new(6);
        let mut order: Vec<SlotId> = (0..6).collect();
        for s in 0..6 {
            lru.on_insert(s, s);
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let s = (x % 6) as SlotId;
            lru.on_access(s, s);
            order.retain(|&o| o != s);
            order.push(s);
            assert_eq!(victim(&mut lru, &[0, 1, 2, 3, 4, 5]), Some(order[0]));
        }
    }
}
