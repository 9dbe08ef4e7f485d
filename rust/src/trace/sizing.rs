//! Sizes that come from arguments and files, checked before anything is
//! allocated: a mistyped capacity or a corrupt header must be an error, not
//! an allocation failure that aborts the process.

use crate::error::{CoreError, Result};

/// The share of physical memory that tracing structures (the EAMC, the
/// planner's tables) may claim: the experts' host tier needs the rest.
const MEMORY_SHARE_DIVISOR: usize = 2;

/// Used when the machine's memory cannot be queried.
const FALLBACK_MEMORY_BYTES: usize = 16 << 30;

/// Physical memory of this machine in bytes.
fn physical_memory() -> usize {
    // SAFETY: sysconf reads a system constant; it has no preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (usize::try_from(pages), usize::try_from(page_size)) {
        (Ok(pages), Ok(size)) if pages > 0 && size > 0 => pages.saturating_mul(size),
        _ => FALLBACK_MEMORY_BYTES,
    }
}

/// The most bytes one tracing structure may take on this machine.
pub fn memory_limit() -> usize {
    physical_memory() / MEMORY_SHARE_DIVISOR
}

/// `count` values of `bytes_each` bytes, or None when that overflows.
pub fn bytes_of(count: usize, bytes_each: usize) -> Option<usize> {
    count.checked_mul(bytes_each)
}

/// Checks that `bytes` (None: beyond `usize`) fits `limit` bytes (usually
/// [`memory_limit`]); `what` names the structure in the error.
pub fn check_fits(
    what: &str,
    bytes: Option<usize>,
    limit: usize,
) -> std::result::Result<(), String> {
    match bytes {
        Some(bytes) if bytes <= limit => Ok(()),
        Some(bytes) => Err(format!(
            "{what} would take {bytes} bytes, more than the {limit} bytes it may use (half of this machine's memory)"
        )),
        None => Err(format!(
            "{what} would take more bytes than a machine can address"
        )),
    }
}

/// A vector of `len` default values, or an error instead of an abort when
/// the allocator refuses (callers check the size against
/// [`memory_limit`] first; this catches what remains).
pub fn zeroed<T: Clone + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    let mut values = Vec::new();
    values.try_reserve_exact(len).map_err(|e| {
        CoreError::InvalidConfig(format!("cannot allocate {what} ({len} values): {e}"))
    })?;
    values.resize(len, T::default());
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_the_machine_are_refused_before_allocating() {
        assert!(check_fits("a table", Some(1024), memory_limit()).is_ok());
        let too_big = check_fits("a table", Some(usize::MAX), memory_limit()).unwrap_err();
        assert!(too_big.contains("a table") && too_big.contains("half of this machine's memory"));
        assert!(check_fits("a table", bytes_of(usize::MAX, 4), usize::MAX).is_err());
        assert!(zeroed::<f32>(usize::MAX / 2, "a table").is_err());
        assert_eq!(zeroed::<u32>(3, "a table").unwrap(), vec![0, 0, 0]);
    }
}
