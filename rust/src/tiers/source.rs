//! Where copy workers find an expert's bytes before copying them into a
//! device slot: the host tier holding every expert, or the expert store on
//! disk behind a bounded host cache (the disk → host hop, then the
//! host → device hop, done by the same worker in that order).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use moe_offload_cuda::Context;

use super::align_up;
use super::host::HostTier;
use super::host_cache::{Acquired, HostCache, HostCacheStats, HostSlotId, LoadFailure};
use super::store::ExpertStore;
use crate::error::{CoreError, Result};
use crate::layout::{ExpertId, ExpertLayout};

/// The tier behind the device slots.
pub enum ExpertSource {
    /// Every expert in host memory (`patch()`: the model's weights are moved in).
    Resident(HostTier),
    /// The expert store, read into a host cache on demand.
    Stored(StoredExperts),
}

impl ExpertSource {
    pub fn layout(&self) -> &ExpertLayout {
        match self {
            Self::Resident(host) => host.layout(),
            Self::Stored(stored) => stored.store.layout(),
        }
    }

    /// Whether host memory is page-locked (CUDA).
    pub fn is_pinned(&self) -> bool {
        match self {
            Self::Resident(host) => host.is_pinned(),
            Self::Stored(stored) => stored.cache.is_pinned(),
        }
    }
}

/// The expert store and the host cache it is read into.
pub struct StoredExperts {
    store: Arc<ExpertStore>,
    cache: HostCache,
}

impl StoredExperts {
    /// A host cache of `host_slots` slots, each large enough for any blob of
    /// `store`, pinned in `cuda`'s context when given.
    pub fn new(
        store: Arc<ExpertStore>,
        host_slots: usize,
        cuda: Option<&Arc<Context>>,
    ) -> Result<Self> {
        let slot_bytes = align_up(store.max_span());
        let cache = HostCache::new(host_slots, slot_bytes, store.layout().num_experts(), cuda)?;
        Ok(Self { store, cache })
    }

    pub fn store(&self) -> &ExpertStore {
        &self.store
    }

    pub fn host_cache(&self) -> &HostCache {
        &self.cache
    }

    pub fn stats(&self) -> HostCacheStats {
        self.cache.stats()
    }

    /// Runs `use_bytes` on the start of the expert's blob in host memory,
    /// reading it from the store first when the host cache lacks it. The
    /// host slot stays pinned (never evicted) until `use_bytes` returns, so
    /// `use_bytes` must be done with the bytes by then (a CUDA copy must
    /// have completed).
    pub fn with_expert<T>(
        &self,
        id: ExpertId,
        use_bytes: impl FnOnce(*const u8) -> Result<T>,
    ) -> Result<T> {
        let held = match self.cache.acquire(id)? {
            Acquired::Ready(slot) => Held::new(&self.cache, slot),
            Acquired::Load(slot) => {
                let held = Held::new(&self.cache, slot);
                self.load(id, slot)?;
                held
            }
        };
        use_bytes(self.cache.ptr(held.slot))
    }

    /// Pins the expert's blob in the host cache, reading it from the store
    /// first when absent, and returns its host slot: the bytes stay there,
    /// unwritten, until [`unpin`](Self::unpin) (for a reader, such as the
    /// CPU running the expert, that cannot work inside a closure).
    pub fn pin(&self, id: ExpertId) -> Result<HostSlotId> {
        match self.cache.acquire(id)? {
            Acquired::Ready(slot) => Ok(slot),
            Acquired::Load(slot) => {
                if let Err(e) = self.load(id, slot) {
                    self.cache.release(slot);
                    return Err(e);
                }
                Ok(slot)
            }
        }
    }

    /// Gives back a slot from [`pin`](Self::pin).
    pub fn unpin(&self, slot: HostSlotId) {
        self.cache.release(slot);
    }

    /// Reads the expert into the host cache ahead of need, unless it is
    /// there already or every host slot is in use.
    pub fn stage(&self, id: ExpertId) -> Result<()> {
        let Some(slot) = self.cache.try_reserve(id) else {
            return Ok(());
        };
        let _held = Held::new(&self.cache, slot);
        self.load(id, slot)
    }

    /// Fills a reserved slot from the store and publishes the outcome.
    fn load(&self, id: ExpertId, slot: HostSlotId) -> Result<()> {
        let started = Instant::now();
        // SAFETY: `slot` is reserved for this load (state Loading, pinned by
        // us): nobody reads or writes its bytes until `finish_load`, and the
        // slot spans `slot_bytes` bytes of the cache's allocation.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(self.cache.ptr(slot), self.cache.slot_bytes())
        };
        // A panicking read still publishes a failure: others may be waiting
        // for this load.
        let outcome =
            catch_unwind(AssertUnwindSafe(|| self.store.read(id, dst))).unwrap_or_else(|_| {
                Err(CoreError::Protocol(format!(
                    "reading expert id {id} from the store panicked"
                )))
            });
        let published = match &outcome {
            Ok(()) => Ok(()),
            Err(CoreError::Store { path, reason }) => Err(LoadFailure {
                path: path.clone(),
                reason: reason.clone(),
            }),
            Err(other) => Err(LoadFailure {
                path: self.store.root().display().to_string(),
                reason: other.to_string(),
            }),
        };
        let bytes = self.store.span(id) as u64;
        self.cache
            .finish_load(slot, published, bytes, started.elapsed().as_secs_f64());
        outcome
    }
}

/// A host slot pinned for this thread, released when dropped: on every path
/// out, a panic included, so the slot is never held for good.
struct Held<'a> {
    cache: &'a HostCache,
    slot: HostSlotId,
}

impl<'a> Held<'a> {
    fn new(cache: &'a HostCache, slot: HostSlotId) -> Self {
        Self { cache, slot }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.cache.release(self.slot);
    }
}

impl From<StoredExperts> for ExpertSource {
    fn from(stored: StoredExperts) -> Self {
        Self::Stored(stored)
    }
}
