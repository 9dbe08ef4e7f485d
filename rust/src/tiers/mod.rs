//! Where expert bytes live: the device tier (a fixed pool of slots, each
//! holding one expert at a time), and behind it either the host tier (every
//! expert in host memory, pinned when copies go to a CUDA device) or the
//! expert store on disk behind a bounded host cache.

pub mod device;
pub mod host;
pub mod host_cache;
pub mod source;
pub mod store;

/// Blobs start on this boundary so copies and direct I/O see aligned memory.
pub const BLOB_ALIGN: usize = 4096;

/// `n` rounded up to a multiple of [`BLOB_ALIGN`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(BLOB_ALIGN) * BLOB_ALIGN
}
