//! The host cache: a fixed number of host slots, allocated once (pinned when
//! copies go to a CUDA device), holding the experts most recently read from
//! the expert store. It replaces the all-experts host tier when the experts
//! do not fit in host memory.
//!
//! A host slot is pinned while someone uses it (a load into it, a copy out
//! of it) and is never evicted while pinned; among the others the least
//! recently used goes first. Bytes are written only by the one loader that
//! reserved the slot, and read only after its load finished.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use moe_offload_cuda::Context;

use super::host::HostMemory;
use crate::error::{CoreError, Result};
use crate::layout::ExpertId;

pub type HostSlotId = u32;

/// Why a load failed: the file at fault and what went wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadFailure {
    pub path: String,
    pub reason: String,
}

impl From<LoadFailure> for CoreError {
    fn from(f: LoadFailure) -> Self {
        CoreError::Store {
            path: f.path,
            reason: f.reason,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum HostState {
    Empty,
    Loading,
    Ready,
    /// Kept until the last user has seen it, then the slot empties.
    Failed(LoadFailure),
}

#[derive(Debug)]
struct HostSlot {
    expert: Option<ExpertId>,
    state: HostState,
    pins: u32,
    last_used: u64,
}

/// What [`HostCache::acquire`] found; either way the slot is pinned for the
/// caller, who calls [`HostCache::release`] when done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The expert's bytes are in the slot.
    Ready(HostSlotId),
    /// The slot is reserved for the expert: the caller loads the bytes, then
    /// calls [`HostCache::finish_load`].
    Load(HostSlotId),
}

/// What the host cache did since construction or the last reset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostCacheStats {
    /// Experts found in the host cache (loaded, or being loaded).
    pub hits: u64,
    /// Experts that had to be read from the store.
    pub misses: u64,
    /// Experts loaded ahead of need (preloading).
    pub staged: u64,
    pub evictions: u64,
    pub bytes_read: u64,
    /// Time spent reading from the store, summed over readers.
    pub read_seconds: f64,
}

struct Slots {
    slots: Vec<HostSlot>,
    home: Vec<Option<HostSlotId>>,
    clock: u64,
    stats: HostCacheStats,
}

/// See the module doc.
pub struct HostCache {
    memory: HostMemory,
    slot_bytes: usize,
    state: Mutex<Slots>,
    changed: Condvar,
}

// SAFETY: the cache owns its allocation; who may touch which slot's bytes is
// decided under the mutex (a slot is written only by the loader that
// reserved it, read only while pinned in state Ready), and the pointer
// itself is never reassigned.
unsafe impl Send for HostCache {}
// SAFETY: as for `Send`.
unsafe impl Sync for HostCache {}

impl HostCache {
    /// `n_slots` slots of `slot_bytes` (a multiple of 4 KiB) for expert ids
    /// below `num_experts`; pinned in `cuda`'s context when given.
    pub fn new(
        n_slots: usize,
        slot_bytes: usize,
        num_experts: usize,
        cuda: Option<&Arc<Context>>,
    ) -> Result<Self> {
        if n_slots == 0 || slot_bytes == 0 {
            return Err(CoreError::InvalidConfig(format!(
                "a host cache needs at least one slot of positive size (got {n_slots} of {slot_bytes} bytes)"
            )));
        }
        let bytes = n_slots.checked_mul(slot_bytes).ok_or_else(|| {
            CoreError::InvalidConfig(format!(
                "{n_slots} host slots of {slot_bytes} bytes overflow"
            ))
        })?;
        let slots = (0..n_slots)
            .map(|_| HostSlot {
                expert: None,
                state: HostState::Empty,
                pins: 0,
                last_used: 0,
            })
            .collect();
        Ok(Self {
            memory: HostMemory::new(bytes, cuda)?,
            slot_bytes,
            state: Mutex::new(Slots {
                slots,
                home: vec![None; num_experts],
                clock: 0,
                stats: HostCacheStats::default(),
            }),
            changed: Condvar::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    pub fn is_pinned(&self) -> bool {
        matches!(self.memory, HostMemory::Pinned(_))
    }

    /// The allocation every slot lies in: its first byte and length.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.memory.base(), self.memory.len())
    }

    /// First byte of a slot.
    pub fn ptr(&self, slot: HostSlotId) -> *mut u8 {
        // SAFETY: slot < n_slots (ids come from this cache), so the offset
        // lies inside the allocation of n_slots * slot_bytes bytes.
        unsafe { self.memory.base().add(slot as usize * self.slot_bytes) }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Every state change completes before anything that could panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Slots>) -> MutexGuard<'a, Slots> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Pins the slot holding `id`, waiting for a load in progress; when `id`
    /// is absent, reserves a slot for the caller to load (waiting while
    /// every slot is pinned). A failed load is reported to everyone who
    /// waited for it.
    pub fn acquire(&self, id: ExpertId) -> std::result::Result<Acquired, LoadFailure> {
        let mut s = self.lock();
        let mut counted = false;
        loop {
            if let Some(slot) = s.home[id as usize] {
                let now = s.tick();
                let entry = &mut s.slots[slot as usize];
                match entry.state.clone() {
                    HostState::Ready => {
                        entry.pins += 1;
                        entry.last_used = now;
                        s.stats.hits += u64::from(!counted);
                        return Ok(Acquired::Ready(slot));
                    }
                    HostState::Failed(failure) => return Err(failure),
                    HostState::Loading => {
                        // Pinned by its loader; wait for the outcome.
                        s.stats.hits += u64::from(!counted);
                        counted = true;
                        s = self.wait(s);
                        continue;
                    }
                    HostState::Empty => unreachable!("an empty slot is nobody's home"),
                }
            }
            if let Some(slot) = s.victim() {
                s.reserve(slot, id);
                // A load it waited for was evicted before it woke: the hit
                // counted then is a miss after all.
                s.stats.hits -= u64::from(counted);
                s.stats.misses += 1;
                return Ok(Acquired::Load(slot));
            }
            s = self.wait(s);
        }
    }

    /// Reserves a slot for loading `id` ahead of need, without waiting:
    /// `None` when `id` is present or loading, or every slot is in use.
    pub fn try_reserve(&self, id: ExpertId) -> Option<HostSlotId> {
        let mut s = self.lock();
        if s.home[id as usize].is_some() {
            return None;
        }
        let slot = s.victim()?;
        s.reserve(slot, id);
        s.stats.staged += 1;
        Some(slot)
    }

    /// The load into a reserved slot is over (`bytes` read in `seconds`);
    /// the loader still holds its pin.
    pub fn finish_load(
        &self,
        slot: HostSlotId,
        outcome: std::result::Result<(), LoadFailure>,
        bytes: u64,
        seconds: f64,
    ) {
        let mut s = self.lock();
        let now = s.tick();
        let entry = &mut s.slots[slot as usize];
        debug_assert_eq!(entry.state, HostState::Loading);
        entry.last_used = now;
        entry.state = match outcome {
            Ok(()) => HostState::Ready,
            Err(failure) => HostState::Failed(failure),
        };
        if entry.state == HostState::Ready {
            s.stats.bytes_read += bytes;
        }
        s.stats.read_seconds += seconds;
        drop(s);
        self.changed.notify_all();
    }

    /// Unpins a slot taken by [`acquire`](Self::acquire) or
    /// [`try_reserve`](Self::try_reserve).
    pub fn release(&self, slot: HostSlotId) {
        let mut s = self.lock();
        let entry = &mut s.slots[slot as usize];
        assert!(
            entry.pins > 0,
            "host slot {slot} released more often than taken"
        );
        entry.pins -= 1;
        if entry.pins == 0 && matches!(entry.state, HostState::Failed(_)) {
            // Everyone saw the failure: forget it, so the next use retries.
            let expert = entry.expert.take().expect("a failed slot names its expert");
            entry.state = HostState::Empty;
            s.home[expert as usize] = None;
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Whether `id` is loaded.
    pub fn contains(&self, id: ExpertId) -> bool {
        let s = self.lock();
        s.home[id as usize].is_some_and(|slot| s.slots[slot as usize].state == HostState::Ready)
    }

    pub fn stats(&self) -> HostCacheStats {
        self.lock().stats.clone()
    }

    pub fn reset_stats(&self) {
        self.lock().stats = HostCacheStats::default();
    }
}

impl Slots {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// An empty slot, else the least recently used unpinned ready one.
    fn victim(&self) -> Option<HostSlotId> {
        if let Some(empty) = self.slots.iter().position(|s| s.state == HostState::Empty) {
            return Some(empty as HostSlotId);
        }
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.pins == 0 && s.state == HostState::Ready)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(i, _)| i as HostSlotId)
    }

    fn reserve(&mut self, slot: HostSlotId, id: ExpertId) {
        let now = self.tick();
        let entry = &mut self.slots[slot as usize];
        if let Some(old) = entry.expert.replace(id) {
            self.home[old as usize] = None;
            self.stats.evictions += 1;
        }
        let entry = &mut self.slots[slot as usize];
        entry.state = HostState::Loading;
        entry.pins = 1;
        entry.last_used = now;
        self.home[id as usize] = Some(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    fn loaded(cache: &HostCache, id: ExpertId) -> HostSlotId {
        match cache.acquire(id).unwrap() {
            Acquired::Load(slot) => {
                cache.finish_load(slot, Ok(()), 0, 0.0);
                slot
            }
            Acquired::Ready(slot) => slot,
        }
    }

    #[test]
    fn misses_load_hits_reuse_and_the_least_recently_used_goes() {
        let cache = HostCache::new(2, 4096, 8, None).unwrap();
        let a = loaded(&cache, 0);
        cache.release(a);
        let b = loaded(&cache, 1);
        cache.release(b);
        assert_eq!(cache.acquire(0).unwrap(), Acquired::Ready(a));
        cache.release(a);
        // Expert 1 is now the least recently used.
        assert_eq!(cache.acquire(2).unwrap(), Acquired::Load(b));
        cache.finish_load(b, Ok(()), 0, 0.0);
        cache.release(b);
        assert!(cache.contains(0) && cache.contains(2) && !cache.contains(1));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.evictions), (1, 3, 1));
    }

    #[test]
    fn a_pinned_slot_is_never_evicted() {
        let cache = HostCache::new(1, 4096, 8, None).unwrap();
        let slot = loaded(&cache, 0);
        assert_eq!(cache.try_reserve(1), None, "the only slot is in use");
        cache.release(slot);
        assert_eq!(cache.try_reserve(1), Some(slot));
    }

    #[test]
    fn acquire_waits_for_a_free_slot() {
        let cache = Arc::new(HostCache::new(1, 4096, 8, None).unwrap());
        let slot = loaded(&cache, 0);
        let waiter = {
            let cache = Arc::clone(&cache);
            thread::spawn(move || cache.acquire(1).unwrap())
        };
        thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished(), "no slot may be taken while pinned");
        cache.release(slot);
        assert_eq!(waiter.join().unwrap(), Acquired::Load(slot));
    }

    #[test]
    fn waiters_for_a_load_share_its_outcome_and_a_failure_is_retried_later() {
        let cache = Arc::new(HostCache::new(2, 4096, 8, None).unwrap());
        let Acquired::Load(slot) = cache.acquire(3).unwrap() else {
            panic!("first access loads");
        };
        let waiter = {
            let cache = Arc::clone(&cache);
            thread::spawn(move || cache.acquire(3))
        };
        thread::sleep(Duration::from_millis(30));
        let failure = LoadFailure {
            path: "layer-000.bin".into(),
            reason: "checksum mismatch".into(),
        };
        cache.finish_load(slot, Err(failure.clone()), 0, 0.0);
        assert_eq!(waiter.join().unwrap(), Err(failure));
        cache.release(slot);
        assert!(!cache.contains(3));
        assert!(
            matches!(cache.acquire(3).unwrap(), Acquired::Load(_)),
            "retried"
        );
    }

    #[test]
    fn concurrent_users_never_see_a_slot_reassigned_under_them() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 500;
        let cache = Arc::new(HostCache::new(3, 4096, 16, None).unwrap());
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let cache = Arc::clone(&cache);
                thread::spawn(move || {
                    for round in 0..ROUNDS {
                        let id = ((t * 7 + round * 5) % 16) as ExpertId;
                        let slot = match cache.acquire(id).unwrap() {
                            Acquired::Load(slot) => {
                                // SAFETY: the slot is reserved for us until finish_load.
                                unsafe { cache.ptr(slot).cast::<u32>().write(id) };
                                cache.finish_load(slot, Ok(()), 0, 0.0);
                                slot
                            }
                            Acquired::Ready(slot) => slot,
                        };
                        // SAFETY: the slot is pinned and Ready; loaders wrote it before.
                        let seen = unsafe { cache.ptr(slot).cast::<u32>().read() };
                        assert_eq!(seen, id, "slot {slot} changed while pinned");
                        cache.release(slot);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    }
}
