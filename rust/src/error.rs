//! The core's one error type. The Python bindings map each variant to one
//! exception class, in one place (`python/errors.rs`).

use moe_offload_cuda::CudaError;

/// Everything that can go wrong inside the core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The device budget cannot hold what one step needs.
    #[error("device budget too small: {needed} slots are needed at once but the pool has {available} free; raise `device_budget` to at least {min_bytes} bytes")]
    BudgetTooSmall {
        needed: usize,
        available: usize,
        min_bytes: usize,
    },
    /// A (layer, expert) pair outside the layout the cache was built with.
    #[error("unknown expert {expert} of MoE layer {layer} (the layout has {layers} layers; that layer has {experts} experts)")]
    UnknownExpert {
        layer: u32,
        expert: u32,
        layers: usize,
        experts: usize,
    },
    /// A byte range outside one expert's blob.
    #[error("bytes {offset}..{end} are outside expert {expert} of layer {layer}, which holds {size} bytes")]
    OutOfBounds {
        layer: u32,
        expert: u32,
        offset: usize,
        end: usize,
        size: usize,
    },
    /// The caller broke the fetch / wait / release protocol.
    #[error("{0}")]
    Protocol(String),
    /// A constructor argument that cannot describe a cache.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A copy into a slot failed; the expert cannot be used. `from_store`:
    /// reading the expert store failed (reported as a store error).
    #[error("copy of expert {expert} of layer {layer} failed: {reason}")]
    CopyFailed {
        layer: u32,
        expert: u32,
        reason: String,
        from_store: bool,
    },
    /// An expert store that cannot be read, written or trusted; `path` is
    /// the file or directory at fault.
    #[error("{path}: {reason}")]
    Store { path: String, reason: String },
    /// An EAMC file that cannot be used.
    #[error("EAMC file {path}: {reason}")]
    EamcFile { path: String, reason: String },
    /// The CUDA driver refused a call or could not be loaded.
    #[error("CUDA: {0}")]
    Cuda(#[from] CudaError),
}

pub type Result<T> = std::result::Result<T, CoreError>;
