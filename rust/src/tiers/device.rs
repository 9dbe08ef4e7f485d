//! The device tier: a fixed pool of equal-sized slots, allocated once by the
//! caller (a torch tensor on the device, or host memory for the host
//! backend), each holding at most one expert. This file owns the slots'
//! bookkeeping; the bytes are written only by copy workers.

use crate::cache::CachePolicy;
use crate::error::{CoreError, Result};
use crate::layout::ExpertId;

pub type SlotId = u32;

/// How many victims still being read [`SlotPool::choose_slot`] passes over
/// before settling for the first: each look asks the device once and runs
/// the policy over the slots once more.
pub const MAX_PASSED_VICTIMS: usize = 3;

/// Where a slot is in its life: an expert is assigned, its copy is queued,
/// runs, and completes; only then may the slot be read.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Empty,
    Queued,
    Copying,
    Ready,
    Failed(CopyFailure),
}

/// Why a slot's copy failed, kept for every reader of the slot.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyFailure {
    pub reason: String,
    /// Reading the expert store failed (readers see a store error).
    pub from_store: bool,
}

impl From<&CoreError> for CopyFailure {
    fn from(error: &CoreError) -> Self {
        Self {
            reason: error.to_string(),
            from_store: matches!(error, CoreError::Store { .. }),
        }
    }
}

#[derive(Debug)]
struct Slot {
    expert: Option<ExpertId>,
    phase: Phase,
    /// How many current users read this slot; a pinned slot is never evicted.
    pins: u32,
}

/// The slots and which expert each holds.
pub struct SlotPool {
    base: u64,
    slot_bytes: usize,
    slots: Vec<Slot>,
    /// `home[expert]` = the slot holding it, if any.
    home: Vec<Option<SlotId>>,
}

/// The outcome of [`SlotPool::assign`].
#[derive(Debug, PartialEq)]
pub struct Assignment {
    pub slot: SlotId,
    pub evicted: Option<ExpertId>,
}

impl SlotPool {
    /// `base` is the address of `n_slots * slot_bytes` bytes that outlive the
    /// pool; `num_experts` bounds the expert ids it will see.
    pub fn new(base: u64, slot_bytes: usize, n_slots: usize, num_experts: usize) -> Result<Self> {
        // No slots at all is a pool too: every expert then runs on the CPU.
        if slot_bytes == 0 {
            return Err(CoreError::InvalidConfig(
                "a slot pool's slots need a positive size (got 0 bytes)".into(),
            ));
        }
        let slots = (0..n_slots)
            .map(|_| Slot {
                expert: None,
                phase: Phase::Empty,
                pins: 0,
            })
            .collect();
        Ok(Self {
            base,
            slot_bytes,
            slots,
            home: vec![None; num_experts],
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Device (or host) address of a slot's first byte.
    pub fn address(&self, slot: SlotId) -> u64 {
        self.base + slot as u64 * self.slot_bytes as u64
    }

    pub fn lookup(&self, expert: ExpertId) -> Option<SlotId> {
        self.home[expert as usize]
    }

    pub fn expert_in(&self, slot: SlotId) -> Option<ExpertId> {
        self.slots[slot as usize].expert
    }

    pub fn phase(&self, slot: SlotId) -> &Phase {
        &self.slots[slot as usize].phase
    }

    pub fn pins(&self, slot: SlotId) -> u32 {
        self.slots[slot as usize].pins
    }

    /// Slots that a new expert could take now: empty ones, or ready ones
    /// that nobody uses.
    pub fn available(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| is_evictable(s) || s.phase == Phase::Empty)
            .count()
    }

    /// Gives `expert` a slot (an empty one, else the policy's victim among
    /// the evictable ones), pinned once, with its copy still to be queued.
    /// `None` when every slot is pinned or mid-copy.
    pub fn assign(&mut self, expert: ExpertId, policy: &mut dyn CachePolicy) -> Option<Assignment> {
        let slot = self.choose_slot(policy, &mut |_| false)?;
        Some(self.install(slot, expert, policy))
    }

    /// The slot a newcomer would take: an empty one, else the policy's
    /// victim among the evictable ones (never pinned, never mid-copy).
    ///
    /// A victim that `still_read` says a device stream may still be
    /// reading (its last reader's work is queued, not done) is passed over
    /// for the policy's next choice, up to [`MAX_PASSED_VICTIMS`] times:
    /// a copy into it would wait for that reader, and a copy worker that
    /// must wait blocks the misses behind it. When every choice is still
    /// read, the policy's first choice stands.
    pub fn choose_slot(
        &self,
        policy: &mut dyn CachePolicy,
        still_read: &mut dyn FnMut(SlotId) -> bool,
    ) -> Option<SlotId> {
        if let Some(empty) = self.slots.iter().position(|s| s.phase == Phase::Empty) {
            return Some(empty as SlotId);
        }
        let first = self.victim(policy, &[])?;
        let mut passed = Vec::new();
        let mut victim = first;
        while still_read(victim) {
            passed.push(victim);
            match self.victim(policy, &passed) {
                Some(next) if passed.len() <= MAX_PASSED_VICTIMS => victim = next,
                _ => return Some(first),
            }
        }
        Some(victim)
    }

    /// The policy's victim among the evictable slots not in `excluded`.
    fn victim(&self, policy: &mut dyn CachePolicy, excluded: &[SlotId]) -> Option<SlotId> {
        let mut candidates = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, s)| is_evictable(s) && !excluded.contains(&(i as SlotId)))
            .map(|(i, s)| (i as SlotId, s.expert.expect("a ready slot holds an expert")));
        policy.choose_victim(&mut candidates)
    }

    /// Puts `expert` into `slot` (from [`choose_slot`](Self::choose_slot)),
    /// evicting its occupant; pinned once, with its copy still to be queued.
    pub fn install(
        &mut self,
        slot: SlotId,
        expert: ExpertId,
        policy: &mut dyn CachePolicy,
    ) -> Assignment {
        debug_assert!(
            self.home[expert as usize].is_none(),
            "expert already has a slot"
        );
        let evicted = self.clear(slot);
        if let Some(old) = evicted {
            policy.on_evict(slot, old);
        }
        let entry = &mut self.slots[slot as usize];
        entry.expert = Some(expert);
        entry.phase = Phase::Queued;
        entry.pins = 1;
        self.home[expert as usize] = Some(slot);
        policy.on_insert(slot, expert);
        Assignment { slot, evicted }
    }

    fn clear(&mut self, slot: SlotId) -> Option<ExpertId> {
        let entry = &mut self.slots[slot as usize];
        assert!(
            entry.pins == 0,
            "slot {slot} is in use and cannot be cleared"
        );
        let old = entry.expert.take();
        entry.phase = Phase::Empty;
        if let Some(old) = old {
            self.home[old as usize] = None;
        }
        old
    }

    pub fn pin(&mut self, slot: SlotId) {
        self.slots[slot as usize].pins += 1;
    }

    /// Drops one pin. Returns the expert the slot forgets: one whose copy
    /// failed, once its last user has seen the failure (the next fetch
    /// tries again).
    pub fn unpin(&mut self, slot: SlotId) -> Result<Option<ExpertId>> {
        let entry = &mut self.slots[slot as usize];
        if entry.pins == 0 {
            return Err(CoreError::Protocol(format!(
                "slot {slot} released more often than it was fetched"
            )));
        }
        entry.pins -= 1;
        Ok(self.forget_if_failed(slot))
    }

    /// Drops every pin of the slot (users that will never release it);
    /// returns how many, and the expert the slot forgets as in
    /// [`unpin`](Self::unpin).
    pub fn unpin_all(&mut self, slot: SlotId) -> (u32, Option<ExpertId>) {
        let pins = std::mem::take(&mut self.slots[slot as usize].pins);
        (pins, self.forget_if_failed(slot))
    }

    /// Slots that no user holds.
    pub fn unpinned(&self) -> usize {
        self.slots.iter().filter(|s| s.pins == 0).count()
    }

    /// A failed copy leaves nothing usable: once nobody holds the slot (no
    /// one waits to be told), it empties, so it is neither lost to the pool
    /// nor read.
    fn forget_if_failed(&mut self, slot: SlotId) -> Option<ExpertId> {
        let entry = &self.slots[slot as usize];
        if entry.pins == 0 && matches!(entry.phase, Phase::Failed(_)) {
            self.clear(slot)
        } else {
            None
        }
    }

    /// A copy worker took the slot's copy request.
    pub fn start_copy(&mut self, slot: SlotId, expert: ExpertId) -> Result<()> {
        let entry = &mut self.slots[slot as usize];
        if entry.expert != Some(expert) || entry.phase != Phase::Queued {
            return Err(CoreError::Protocol(format!(
                "copy of expert id {expert} into slot {slot} started, but the slot holds {:?} in phase {:?}",
                entry.expert, entry.phase
            )));
        }
        entry.phase = Phase::Copying;
        Ok(())
    }

    /// The copy into the slot completed (`Ok`) or failed (`Err(reason)`).
    /// Returns the expert the slot forgets: a failed copy nobody holds (a
    /// prefetch) empties the slot at once; otherwise its users are told
    /// when they wait, and the last release empties it.
    pub fn finish_copy(
        &mut self,
        slot: SlotId,
        outcome: std::result::Result<(), CopyFailure>,
    ) -> Option<ExpertId> {
        let entry = &mut self.slots[slot as usize];
        debug_assert_eq!(entry.phase, Phase::Copying);
        entry.phase = match outcome {
            Ok(()) => Phase::Ready,
            Err(reason) => Phase::Failed(reason),
        };
        self.forget_if_failed(slot)
    }

    /// Number of slots that hold (or are receiving) an expert.
    pub fn occupied(&self) -> usize {
        self.slots.iter().filter(|s| s.expert.is_some()).count()
    }
}

fn is_evictable(slot: &Slot) -> bool {
    slot.pins == 0 && slot.phase == Phase::Ready
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::lru::Lru;

    fn ready(pool: &mut SlotPool, policy: &mut Lru, expert: ExpertId) -> SlotId {
        let slot = pool.assign(expert, policy).unwrap().slot;
        pool.start_copy(slot, expert).unwrap();
        pool.finish_copy(slot, Ok(()));
        slot
    }

    #[test]
    fn fills_empty_slots_before_evicting() {
        let mut pool = SlotPool::new(0x1000, 64, 3, 10).unwrap();
        let mut lru = Lru::new(3);
        let slots: Vec<_> = (0..3)
            .map(|e| {
                let s = ready(&mut pool, &mut lru, e);
                pool.unpin(s).unwrap();
                s
            })
            .collect();
        assert_eq!(slots, vec![0, 1, 2]);
        assert_eq!(pool.address(2), 0x1000 + 128);
        let next = pool.assign(7, &mut lru).unwrap();
        assert_eq!(next.evicted, Some(0), "least recently used goes first");
        assert_eq!(pool.lookup(0), None);
        assert_eq!(pool.lookup(7), Some(next.slot));
    }

    #[test]
    fn never_evicts_a_slot_in_use() {
        let mut pool = SlotPool::new(0, 64, 2, 10).unwrap();
        let mut lru = Lru::new(2);
        let a = ready(&mut pool, &mut lru, 0);
        let _b = ready(&mut pool, &mut lru, 1);
        // Both pinned: nothing may be evicted.
        assert_eq!(pool.assign(2, &mut lru), None);
        assert_eq!(pool.available(), 0);
        pool.unpin(a).unwrap();
        let got = pool.assign(2, &mut lru).unwrap();
        assert_eq!(
            got,
            Assignment {
                slot: a,
                evicted: Some(0)
            }
        );
        assert_eq!(pool.lookup(1), Some(1), "the pinned expert stays");
    }

    #[test]
    fn never_hands_out_a_slot_before_its_copy_completed() {
        let mut pool = SlotPool::new(0, 64, 1, 10).unwrap();
        let mut lru = Lru::new(1);
        let slot = pool.assign(3, &mut lru).unwrap().slot;
        pool.unpin(slot).unwrap();
        // Queued, unpinned: still not a victim, and not readable.
        assert_eq!(pool.assign(4, &mut lru), None);
        assert_eq!(pool.phase(slot), &Phase::Queued);
        pool.start_copy(slot, 3).unwrap();
        assert_eq!(
            pool.assign(4, &mut lru),
            None,
            "mid-copy slots are not victims"
        );
        assert_eq!(pool.phase(slot), &Phase::Copying);
        pool.finish_copy(slot, Ok(()));
        assert_eq!(pool.phase(slot), &Phase::Ready);
        assert!(pool.assign(4, &mut lru).is_some());
    }

    #[test]
    fn a_failed_copy_is_forgotten_once_released() {
        let mut pool = SlotPool::new(0, 64, 1, 10).unwrap();
        let mut lru = Lru::new(1);
        let slot = pool.assign(3, &mut lru).unwrap().slot;
        pool.start_copy(slot, 3).unwrap();
        pool.finish_copy(
            slot,
            Err(CopyFailure::from(&CoreError::Protocol("boom".into()))),
        );
        assert!(matches!(pool.phase(slot), Phase::Failed(_)));
        pool.unpin(slot).unwrap();
        assert_eq!(pool.lookup(3), None);
        assert_eq!(pool.phase(slot), &Phase::Empty);
        assert!(
            pool.unpin(slot).is_err(),
            "double release is a protocol error"
        );
    }

    #[test]
    fn a_failed_copy_that_nobody_holds_frees_its_slot_at_once() {
        // A prefetch: assigned, unpinned while its copy is queued, then failed.
        let mut pool = SlotPool::new(0, 64, 1, 10).unwrap();
        let mut lru = Lru::new(1);
        let slot = pool.assign(3, &mut lru).unwrap().slot;
        assert_eq!(pool.unpin(slot).unwrap(), None);
        pool.start_copy(slot, 3).unwrap();
        let failure = CopyFailure::from(&CoreError::Protocol("boom".into()));
        assert_eq!(pool.finish_copy(slot, Err(failure)), Some(3));
        assert_eq!(pool.phase(slot), &Phase::Empty);
        assert_eq!(pool.lookup(3), None);
        assert_eq!(pool.available(), 1, "the slot is usable again");
    }

    #[test]
    fn unpin_all_drops_every_pin_and_forgets_failed_copies() {
        let mut pool = SlotPool::new(0, 64, 2, 10).unwrap();
        let mut lru = Lru::new(2);
        let a = ready(&mut pool, &mut lru, 0);
        pool.pin(a);
        let b = pool.assign(1, &mut lru).unwrap().slot;
        pool.start_copy(b, 1).unwrap();
        let failure = CopyFailure::from(&CoreError::Protocol("boom".into()));
        assert_eq!(pool.finish_copy(b, Err(failure)), None, "still held");
        assert_eq!(pool.unpinned(), 0);
        assert_eq!(pool.unpin_all(a), (2, None));
        assert_eq!(pool.unpin_all(b), (1, Some(1)));
        assert_eq!(pool.unpinned(), 2);
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.unpin_all(a), (0, None));
    }

    #[test]
    fn a_victim_still_being_read_is_passed_over_while_others_are_done() {
        let mut pool = SlotPool::new(0, 64, 3, 10).unwrap();
        let mut lru = Lru::new(3);
        for expert in 0..3 {
            let slot = ready(&mut pool, &mut lru, expert);
            pool.unpin(slot).unwrap();
        }
        // LRU order 0, 1, 2. Slot 0's reader is still running on the device.
        let mut asked = Vec::new();
        let reading = |busy: &[SlotId]| {
            let busy = busy.to_vec();
            move |slot: SlotId| busy.contains(&slot)
        };
        let still_read = reading(&[0]);
        let mut probe = |slot| {
            asked.push(slot);
            still_read(slot)
        };
        assert_eq!(pool.choose_slot(&mut lru, &mut probe), Some(1));
        assert_eq!(asked, vec![0, 1]);
        // Every slot still read: the policy's first choice stands.
        assert_eq!(
            pool.choose_slot(&mut lru, &mut reading(&[0, 1, 2])),
            Some(0)
        );
        // Nobody reading: the policy's choice, asked about once.
        assert_eq!(pool.choose_slot(&mut lru, &mut reading(&[])), Some(0));
    }

    #[test]
    fn a_copy_for_a_slot_that_moved_on_is_refused() {
        let mut pool = SlotPool::new(0, 64, 1, 10).unwrap();
        let mut lru = Lru::new(1);
        let slot = pool.assign(3, &mut lru).unwrap().slot;
        assert!(pool.start_copy(slot, 4).is_err());
    }
}
