//! The host tier: one allocation holding every expert's blob at a 4 KiB
//! aligned offset. Pinned (page-locked, registered with the CUDA driver) when
//! the device tier is on a GPU, so host-to-device copies are truly async.

use std::sync::Arc;

use moe_offload_cuda::{Context, PinnedHostBuffer};

use super::align_up;
use crate::error::{CoreError, Result};
use crate::layout::{ExpertId, ExpertLayout};

/// Host memory that is either ordinary (an anonymous mapping: page-aligned,
/// zero-filled on first touch, so untouched parts cost no RAM) or CUDA-pinned.
pub(crate) enum HostMemory {
    Plain { ptr: *mut u8, len: usize },
    Pinned(PinnedHostBuffer),
}

impl HostMemory {
    /// `bytes` of host memory, pinned in `cuda`'s context when given.
    pub(crate) fn new(bytes: usize, cuda: Option<&Arc<Context>>) -> Result<Self> {
        match cuda {
            Some(ctx) => Ok(Self::Pinned(PinnedHostBuffer::new(ctx, bytes.max(1))?)),
            None => Self::plain(bytes),
        }
    }

    fn plain(bytes: usize) -> Result<Self> {
        let len = bytes.max(1);
        // SAFETY: an anonymous private mapping touches no existing memory;
        // the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(CoreError::InvalidConfig(format!(
                "could not map {bytes} bytes of host memory: {}",
                std::io::Error::last_os_error()
            )));
        }
        // Pages are faulted in by their first write (a blob read or copied
        // in), spread over the copy workers; populating the mapping up front,
        // or advising huge pages, measured slower (benches/store.py).
        Ok(Self::Plain {
            ptr: ptr.cast(),
            len,
        })
    }

    pub(crate) fn base(&self) -> *mut u8 {
        match self {
            Self::Plain { ptr, .. } => *ptr,
            Self::Pinned(buffer) => buffer.as_mut_ptr(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Plain { len, .. } => *len,
            Self::Pinned(buffer) => buffer.len(),
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        if let Self::Plain { ptr, len } = self {
            // SAFETY: `ptr` and `len` are the mapping made in `plain`,
            // unmapped once, here.
            unsafe { libc::munmap(ptr.cast(), *len) };
        }
    }
}

/// Every expert's bytes, addressed by [`ExpertId`].
///
/// The tier hands out raw pointers; who may touch which bytes when is the
/// expert cache's business: an expert's blob is written only while the
/// expert is in no device slot, and read by copy workers only while it is.
pub struct HostTier {
    memory: HostMemory,
    offsets: Vec<usize>,
    layout: ExpertLayout,
}

// SAFETY: the tier owns its allocation outright; concurrent access to the
// bytes goes through raw pointers whose disjointness the expert cache
// guarantees (see the type's doc), and the metadata is immutable.
unsafe impl Send for HostTier {}
// SAFETY: as for `Send`; `&HostTier` exposes no interior mutability of its own.
unsafe impl Sync for HostTier {}

impl HostTier {
    /// Allocates room for every expert of `layout`; pinned in `cuda`'s
    /// primary context when given.
    pub fn new(layout: ExpertLayout, cuda: Option<&Arc<Context>>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(layout.num_experts());
        let mut total = 0usize;
        for id in 0..layout.num_experts() as ExpertId {
            offsets.push(total);
            total += align_up(layout.bytes(id));
        }
        let memory = HostMemory::new(total, cuda)?;
        Ok(Self {
            memory,
            offsets,
            layout,
        })
    }

    pub fn layout(&self) -> &ExpertLayout {
        &self.layout
    }

    pub fn is_pinned(&self) -> bool {
        matches!(self.memory, HostMemory::Pinned(_))
    }

    /// The allocation every blob lies in: its first byte and length.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.memory.base(), self.memory.len())
    }

    /// Start of an expert's blob.
    pub fn expert_ptr(&self, id: ExpertId) -> *mut u8 {
        // SAFETY: offsets[id] lies inside the allocation by construction.
        unsafe { self.memory.base().add(self.offsets[id as usize]) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiers::BLOB_ALIGN;

    #[test]
    fn blobs_are_aligned_and_disjoint() {
        let layout = ExpertLayout::new(&[(3, 5000), (2, 10)]).unwrap();
        let tier = HostTier::new(layout, None).unwrap();
        assert!(!tier.is_pinned());
        let mut previous_end = 0usize;
        for id in 0..5 {
            let start = tier.expert_ptr(id) as usize - tier.expert_ptr(0) as usize;
            assert_eq!(tier.expert_ptr(id) as usize % BLOB_ALIGN, 0);
            assert!(start >= previous_end);
            previous_end = start + tier.layout().bytes(id);
        }
    }
}
