//! moe-offload's core: run a Mixture-of-Experts model whose experts do not
//! fit on the device.
//!
//! The data path, for one MoE layer of one forward step:
//! 1. The model's router picks experts; their ids reach [`ExpertCache::fetch`].
//! 2. Cached experts are hits; each miss gets a device slot from the
//!    [`SlotPool`](tiers::device::SlotPool), evicting the
//!    [`CachePolicy`](cache::CachePolicy)'s victim (never a slot in use).
//! 3. The miss's copy goes to the [`PrefetchQueue`](queue::PrefetchQueue),
//!    on-demand requests first.
//! 4. Copy workers move the expert's blob from the pinned
//!    [`HostTier`](tiers::host::HostTier) into the slot (memcpy, or an
//!    async CUDA copy on the worker's own stream plus an event).
//! 5. [`ExpertCache::wait`] makes the compute stream wait for exactly that
//!    expert's copy; the layer runs the expert from the slot.
//! 6. [`ExpertCache::release`] unpins; the slot is not overwritten before
//!    the compute stream is done with it.
//!
//! Everything here is plain Rust; the Python bindings live behind the
//! `python` feature so that `cargo test` needs neither Python nor CUDA.

pub mod cache;
pub mod copy;
pub mod error;
pub mod execution;
pub mod layout;
pub mod planner;
pub mod queue;
pub mod replay;
pub mod stats;
pub mod tiers;
pub mod timing;
pub mod trace;

#[cfg(feature = "python")]
mod python;

pub use cache::{CacheConfig, Device, ExpertCache};
pub use error::{CoreError, Result};
