//! Request-level expert tracing (MoE-Infinity): each request's expert
//! activation matrix, the collection of past requests' matrices, and the
//! incremental cosine matching of a live request against that collection.

pub mod eam;
pub mod eamc;
pub mod live;
pub mod matcher;
pub mod planning;
pub mod sizing;

pub use eam::ActivationMatrix;
pub use eamc::{ActivationCollection, AffinityTables, Replacement};
pub use matcher::RequestMatcher;
