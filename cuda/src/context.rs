//! The primary context of one device, shared with the CUDA runtime (and
//! therefore with torch), plus the scoped switch into it that the RAII
//! types use around their own driver calls.

use std::ffi::{c_char, c_int, CStr};
use std::ptr;
use std::sync::Arc;

use crate::sys::{cu, CUcontext, CUdevice, Driver, CUDA_ERROR_DEINITIALIZED};
use crate::{driver, Result};

/// Longer than any marketing name the driver reports.
const DEVICE_NAME_CAPACITY: usize = 256;

/// How many devices the driver sees; 0 when it loads but finds none usable.
pub fn device_count() -> Result<i32> {
    let driver = driver()?;
    let mut count: c_int = 0;
    // SAFETY: `count` is a valid out-pointer for the duration of the call.
    unsafe { cu!(driver, cuDeviceGetCount(&mut count))? };
    Ok(count)
}

/// A retained reference to device `ordinal`'s primary context.
///
/// The primary context is the one torch allocates in and launches on, so
/// device pointers and stream handles from torch are valid here and ours are
/// valid there. Retaining keeps it alive even if torch resets the device.
pub struct Context {
    driver: &'static Driver,
    ordinal: i32,
    device: CUdevice,
    raw: CUcontext,
}

// SAFETY: a CUcontext is an opaque token the driver accepts from any thread;
// the driver API is thread-safe and we never dereference the handle.
unsafe impl Send for Context {}
// SAFETY: every method takes `&self` and only passes the token to the
// thread-safe driver; there is no interior state to race on.
unsafe impl Sync for Context {}

impl Context {
    /// Retains device `ordinal`'s primary context (creating it if no one has
    /// yet) without making it current anywhere.
    pub fn primary(ordinal: i32) -> Result<Arc<Context>> {
        let driver = driver()?;
        let mut device: CUdevice = 0;
        let mut raw: CUcontext = ptr::null_mut();
        // SAFETY: both out-pointers are valid locals; the driver validates
        // the ordinal and the device it returns.
        unsafe {
            cu!(driver, cuDeviceGet(&mut device, ordinal))?;
            cu!(driver, cuDevicePrimaryCtxRetain(&mut raw, device))?;
        }
        Ok(Arc::new(Context {
            driver,
            ordinal,
            device,
            raw,
        }))
    }

    /// Makes this context current on the calling thread for good.
    ///
    /// Threads that issue copies or waits through the free functions
    /// ([`crate::copy_host_to_device_async`], [`crate::copy_device_to_host`])
    /// call this once, since those do not switch contexts themselves.
    pub fn bind_to_current_thread(&self) -> Result<()> {
        // SAFETY: `raw` is a primary context we hold a retain on.
        unsafe { cu!(self.driver, cuCtxSetCurrent(self.raw)) }
    }

    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    pub fn device_name(&self) -> Result<String> {
        let mut name = [0 as c_char; DEVICE_NAME_CAPACITY];
        // SAFETY: the driver writes at most `len` bytes, NUL included, into
        // `name`, which has exactly that capacity.
        unsafe {
            cu!(
                self.driver,
                cuDeviceGetName(
                    name.as_mut_ptr(),
                    DEVICE_NAME_CAPACITY as c_int,
                    self.device
                )
            )?;
        }
        // SAFETY: the buffer was zeroed and the driver NUL-terminates what it
        // writes, so a terminator lies inside the array.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) };
        Ok(name.to_string_lossy().into_owned())
    }

    /// Free and total device memory in bytes, as the driver sees it now
    /// (other processes and torch's caching allocator included).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        let _current = self.make_current()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid locals; our context is current.
        unsafe { cu!(self.driver, cuMemGetInfo_v2(&mut free, &mut total))? };
        Ok((free, total))
    }

    pub(crate) fn driver(&self) -> &'static Driver {
        self.driver
    }

    /// Makes this context current until the guard drops, then restores the
    /// thread's previous context, so that library calls made from torch's
    /// threads never change torch's current device behind its back.
    pub(crate) fn make_current(&self) -> Result<CurrentGuard<'_>> {
        let mut previous: CUcontext = ptr::null_mut();
        // SAFETY: `previous` is a valid out-pointer.
        unsafe { cu!(self.driver, cuCtxGetCurrent(&mut previous))? };
        if previous == self.raw {
            return Ok(CurrentGuard {
                driver: self.driver,
                restore: None,
            });
        }
        self.bind_to_current_thread()?;
        Ok(CurrentGuard {
            driver: self.driver,
            restore: Some(previous),
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we retained this device's primary context exactly once in
        // `primary`; every stream, event and buffer made in it held an
        // `Arc<Context>`, so none is left to use it.
        let status = unsafe { (self.driver.cuDevicePrimaryCtxRelease_v2)(self.device) };
        report_drop_failure(self.driver, "cuDevicePrimaryCtxRelease_v2", status);
    }
}

/// Restores the thread's previous context when dropped.
pub(crate) struct CurrentGuard<'a> {
    driver: &'a Driver,
    /// `None` when the context was already current and nothing changed.
    restore: Option<CUcontext>,
}

impl Drop for CurrentGuard<'_> {
    fn drop(&mut self) {
        if let Some(previous) = self.restore {
            // SAFETY: `previous` was current on this thread moments ago (or
            // null, which unbinds); the driver rejects a destroyed context
            // with an error rather than misbehaving.
            let status = unsafe { (self.driver.cuCtxSetCurrent)(previous) };
            report_drop_failure(self.driver, "cuCtxSetCurrent", status);
        }
    }
}

/// Destructors cannot return errors and must not panic. A failure there
/// means a leak, worth a line on stderr; at process exit the driver may
/// already be torn down, which is expected and stays quiet.
pub(crate) fn report_drop_failure(driver: &Driver, call: &'static str, status: i32) {
    if status == CUDA_ERROR_DEINITIALIZED {
        return;
    }
    if let Err(error) = driver.check(call, status) {
        eprintln!("moe-offload-cuda: while releasing: {error}");
    }
}
