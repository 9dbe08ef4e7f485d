//! Belady's offline optimum for demand fetches: evict the expert whose next
//! use lies farthest in the future. It needs the whole access sequence in
//! advance, so only the trace replay builds it; it is the bound a predictive
//! policy is measured against.

use super::CachePolicy;
use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

pub struct Oracle {
    /// `next[i]` = position of the next access to the expert accessed at i.
    next: Vec<usize>,
    position: usize,
    next_use: Vec<usize>,
}

impl Oracle {
    /// `accesses` = every expert access of the replay, in order.
    pub fn new(accesses: &[ExpertId], num_experts: usize) -> Self {
        let mut next = vec![usize::MAX; accesses.len()];
        let mut upcoming = vec![usize::MAX; num_experts];
        for (i, &e) in accesses.iter().enumerate().rev() {
            next[i] = upcoming[e as usize];
            upcoming[e as usize] = i;
        }
        Self {
            next,
            position: 0,
            next_use: vec![usize::MAX; num_experts],
        }
    }

    fn advance(&mut self, expert: ExpertId) {
        if let Some(&n) = self.next.get(self.position) {
            self.next_use[expert as usize] = n;
        }
        self.position += 1;
    }
}

impl CachePolicy for Oracle {
    fn name(&self) -> &'static str {
        "oracle"
    }

    fn on_access(&mut self, _slot: SlotId, expert: ExpertId) {
        self.advance(expert);
    }

    fn choose_victim(
        &mut self,
        candidates: &mut dyn Iterator<Item = (SlotId, ExpertId)>,
    ) -> Option<SlotId> {
        candidates
            .max_by_key(|&(_, e)| self.next_use[e as usize])
            .map(|(slot, _)| slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_expert_needed_last() {
        // Accesses: 0 1 2 | 0 then 2 later, 1 never again.
        let accesses = [0, 1, 2, 0, 2];
        let mut oracle = Oracle::new(&accesses, 3);
        for (slot, &e) in accesses[..3].iter().enumerate() {
            oracle.on_insert(slot as SlotId, e);
        }
        assert_eq!(
            oracle.choose_victim(&mut [(0, 0), (1, 1), (2, 2)].into_iter()),
            Some(1)
        );
        oracle.on_access(0, 0);
        // Now 0 is never used again; 2 is next.
        assert_eq!(
            oracle.choose_victim(&mut [(0, 0), (2, 2)].into_iter()),
            Some(0)
        );
    }
}
