//! The slice of the CUDA driver API that moe-offload needs to stream experts
//! from pinned host memory into device slots.
//!
//! `libcuda` is opened with `dlopen` on first use rather than linked, so the
//! crate builds without a CUDA toolkit and a process without a GPU gets an
//! error value from [`driver`] instead of failing to start.
//!
//! # Layers
//! 1. [`sys`]: the C types, constants and the [`Driver`] table of resolved
//!    entry points. Nothing is checked there.
//! 2. [`Driver::check`]: turns each status code into a [`Result`] carrying the
//!    call's name and the driver's name for the code.
//! 3. The safe RAII types: [`Context`], [`Stream`], [`Event`],
//!    [`PinnedHostBuffer`], [`DeviceBuffer`], plus the copy and wait
//!    functions that work on foreign handles.
//!
//! # Contexts and threads
//! Everything runs in the device's *primary* context, the one the CUDA
//! runtime (and therefore torch) uses, so device pointers, streams and events
//! are interchangeable with torch's. Constructors and destructors make the
//! context current only for the duration of their own driver calls and then
//! restore whatever the thread had, so creating a buffer never changes
//! torch's notion of the current device. The copy functions do not switch
//! contexts (they sit on the hot path): a thread that issues copies calls
//! [`Context::bind_to_current_thread`] once first.
//!
//! # Ownership
//! Every RAII type holds an `Arc<Context>`, so the primary context outlives
//! all streams, events and allocations made in it. Handles cross the API as
//! `u64` because that is how torch exposes `cuda_stream`; a `u64` passed in
//! must name a live stream of the same context (0 is the legacy default
//! stream). Asynchronous copies borrow their source until the event recorded
//! after them completes; the caller keeps the source alive that long.

use std::sync::OnceLock;

pub mod sys;

mod context;
mod event;
mod memory;
mod stream;

pub use context::{device_count, Context};
pub use event::{elapsed_seconds, Event, EventState};
pub use memory::{copy_device_to_host, copy_host_to_device_async, DeviceBuffer, PinnedHostBuffer};
pub use stream::{stream_wait_event, synchronize_stream, Stream};
pub use sys::Driver;

/// Everything that can go wrong talking to the driver. `Clone` because the
/// outcome of loading is computed once and handed to every caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// No driver library could be opened: no NVIDIA driver on this machine.
    #[error("CUDA driver library not found (tried {tried}): {reason}")]
    LibraryNotFound { tried: String, reason: String },
    /// The library opened but lacks an entry point: a driver too old for us.
    #[error("CUDA driver lacks symbol {symbol}: {reason}")]
    SymbolMissing {
        symbol: &'static str,
        reason: String,
    },
    /// A driver call returned a status other than success.
    #[error("{call} failed with {name} ({code})")]
    Driver {
        call: &'static str,
        code: i32,
        name: String,
    },
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Sonames tried in order: the versioned one is what the driver package
/// installs; the bare one exists on some setups with only dev symlinks.
const LIBRARY_NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

static DRIVER: OnceLock<Result<Driver>> = OnceLock::new();

/// The process-wide driver, loaded and initialized on first call.
///
/// The outcome, success or failure, is cached: the driver is never loaded
/// twice and every caller sees the same error.
pub fn driver() -> Result<&'static Driver> {
    DRIVER
        .get_or_init(load_system_driver)
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether CUDA work is possible in this process at all.
pub fn is_available() -> bool {
    driver().is_ok()
}

/// Only a missing library moves on to the next name: a library that opens
/// but fails later is the real driver, and its error is the one to report.
fn load_system_driver() -> Result<Driver> {
    let mut reasons = Vec::new();
    for name in LIBRARY_NAMES {
        match Driver::load_from(name) {
            Err(CudaError::LibraryNotFound { reason, .. }) => reasons.push(reason),
            outcome => return outcome,
        }
    }
    Err(CudaError::LibraryNotFound {
        tried: LIBRARY_NAMES.join(", "),
        reason: reasons.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonexistent_library_is_library_not_found() {
        let path = "/nonexistent/dir/libcuda-missing.so.1";
        match Driver::load_from(path) {
            Err(CudaError::LibraryNotFound { tried, reason }) => {
                assert_eq!(tried, path);
                assert!(!reason.is_empty());
            }
            Err(other) => panic!("expected LibraryNotFound, got {other}"),
            Ok(_) => panic!("a nonexistent path loaded"),
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn library_without_cuda_symbols_is_symbol_missing() {
        match Driver::load_from("libc.so.6") {
            Err(CudaError::SymbolMissing { symbol, .. }) => assert_eq!(symbol, "cuInit"),
            Err(other) => panic!("expected SymbolMissing, got {other}"),
            Ok(_) => panic!("libc passed for a CUDA driver"),
        }
    }

    #[test]
    fn driver_outcome_is_cached() {
        match (driver(), driver()) {
            (Ok(first), Ok(second)) => assert!(std::ptr::eq(first, second)),
            (Err(first), Err(second)) => {
                assert_eq!(first, second);
                assert!(!is_available());
            }
            (first, second) => panic!("driver() changed its answer: {first:?} then {second:?}"),
        }
    }

    #[test]
    fn errors_say_what_failed() {
        let error = CudaError::Driver {
            call: "cuMemAlloc_v2",
            code: 2,
            name: "CUDA_ERROR_OUT_OF_MEMORY".to_string(),
        };
        assert_eq!(
            error.to_string(),
            "cuMemAlloc_v2 failed with CUDA_ERROR_OUT_OF_MEMORY (2)"
        );
    }
}
