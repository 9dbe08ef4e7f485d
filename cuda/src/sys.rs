//! The raw layer: the C types of the CUDA driver API, its constants, and
//! [`Driver`], the table of entry points resolved from `libcuda` at run time.
//!
//! Nothing here checks anything. The safe types in the sibling modules are
//! built on top; this module is public so that a caller who needs an entry
//! point we do not wrap (e.g. `cuMemHostRegister_v2` on memory torch
//! allocated) can reach it without loading the library a second time.

#![allow(non_snake_case, non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use libloading::Library;

use crate::{CudaError, Result};

/// Status code every driver call returns; 0 is success.
pub type CUresult = c_int;
/// A device ordinal as the driver names it.
pub type CUdevice = c_int;
/// A device address; 64 bits wide in the `_v2` API.
pub type CUdeviceptr = u64;
/// Opaque driver handles; only ever passed back to the driver.
pub type CUcontext = *mut c_void;
pub type CUstream = *mut c_void;
pub type CUevent = *mut c_void;

pub const CUDA_SUCCESS: CUresult = 0;
/// Returned by the driver when it is being torn down at process exit.
pub const CUDA_ERROR_DEINITIALIZED: CUresult = 4;
/// Returned by query calls while work is still pending; not a failure.
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
/// The stream does not synchronize with the legacy default stream, so our
/// copies never serialize behind torch's work on stream 0.
pub const CU_STREAM_NON_BLOCKING: c_uint = 1;
/// Timing costs a timestamp per record; events that are only waited on or
/// queried go without (the timed ones measure copies and stalls).
pub const CU_EVENT_DISABLE_TIMING: c_uint = 2;
pub const CU_EVENT_BLOCKING_SYNC: c_uint = 1;
/// A plain event: it keeps a timestamp and is waited on by spinning.
pub const CU_EVENT_DEFAULT: c_uint = 0;
/// Pinned memory that every context treats as pinned, not only the one
/// current at allocation.
pub const CU_MEMHOSTALLOC_PORTABLE: c_uint = 1;
pub const CU_MEMHOSTREGISTER_PORTABLE: c_uint = 1;

pub type FnInit = unsafe extern "C" fn(flags: c_uint) -> CUresult;
pub type FnGetErrorName =
    unsafe extern "C" fn(error: CUresult, name: *mut *const c_char) -> CUresult;
pub type FnDeviceGet = unsafe extern "C" fn(device: *mut CUdevice, ordinal: c_int) -> CUresult;
pub type FnDeviceGetCount = unsafe extern "C" fn(count: *mut c_int) -> CUresult;
pub type FnDeviceGetName =
    unsafe extern "C" fn(name: *mut c_char, len: c_int, device: CUdevice) -> CUresult;
pub type FnDevicePrimaryCtxRetain =
    unsafe extern "C" fn(ctx: *mut CUcontext, device: CUdevice) -> CUresult;
pub type FnDevicePrimaryCtxRelease = unsafe extern "C" fn(device: CUdevice) -> CUresult;
pub type FnCtxSetCurrent = unsafe extern "C" fn(ctx: CUcontext) -> CUresult;
pub type FnCtxGetCurrent = unsafe extern "C" fn(ctx: *mut CUcontext) -> CUresult;
pub type FnMemGetInfo = unsafe extern "C" fn(free: *mut usize, total: *mut usize) -> CUresult;
pub type FnMemAlloc = unsafe extern "C" fn(dptr: *mut CUdeviceptr, bytes: usize) -> CUresult;
pub type FnMemFree = unsafe extern "C" fn(dptr: CUdeviceptr) -> CUresult;
pub type FnMemHostAlloc =
    unsafe extern "C" fn(pp: *mut *mut c_void, bytes: usize, flags: c_uint) -> CUresult;
pub type FnMemFreeHost = unsafe extern "C" fn(p: *mut c_void) -> CUresult;
pub type FnMemHostRegister =
    unsafe extern "C" fn(p: *mut c_void, bytes: usize, flags: c_uint) -> CUresult;
pub type FnMemHostUnregister = unsafe extern "C" fn(p: *mut c_void) -> CUresult;
pub type FnMemcpyHtoDAsync = unsafe extern "C" fn(
    dst: CUdeviceptr,
    src: *const c_void,
    bytes: usize,
    stream: CUstream,
) -> CUresult;
pub type FnMemcpyDtoH =
    unsafe extern "C" fn(dst: *mut c_void, src: CUdeviceptr, bytes: usize) -> CUresult;
pub type FnStreamCreate = unsafe extern "C" fn(stream: *mut CUstream, flags: c_uint) -> CUresult;
pub type FnStreamDestroy = unsafe extern "C" fn(stream: CUstream) -> CUresult;
pub type FnStreamSynchronize = unsafe extern "C" fn(stream: CUstream) -> CUresult;
pub type FnStreamWaitEvent =
    unsafe extern "C" fn(stream: CUstream, event: CUevent, flags: c_uint) -> CUresult;
pub type FnEventCreate = unsafe extern "C" fn(event: *mut CUevent, flags: c_uint) -> CUresult;
pub type FnEventDestroy = unsafe extern "C" fn(event: CUevent) -> CUresult;
pub type FnEventRecord = unsafe extern "C" fn(event: CUevent, stream: CUstream) -> CUresult;
pub type FnEventSynchronize = unsafe extern "C" fn(event: CUevent) -> CUresult;
pub type FnEventQuery = unsafe extern "C" fn(event: CUevent) -> CUresult;
pub type FnEventElapsedTime =
    unsafe extern "C" fn(ms: *mut f32, start: CUevent, end: CUevent) -> CUresult;

/// The resolved entry points. Field names are the exported symbol names, so
/// a reader can grep the driver documentation for them.
///
/// The function pointers are only valid while `_library` stays loaded,
/// which is why it lives in the same struct and is dropped last.
pub struct Driver {
    pub cuInit: FnInit,
    pub cuGetErrorName: FnGetErrorName,
    pub cuDeviceGet: FnDeviceGet,
    pub cuDeviceGetCount: FnDeviceGetCount,
    pub cuDeviceGetName: FnDeviceGetName,
    pub cuDevicePrimaryCtxRetain: FnDevicePrimaryCtxRetain,
    pub cuDevicePrimaryCtxRelease_v2: FnDevicePrimaryCtxRelease,
    pub cuCtxSetCurrent: FnCtxSetCurrent,
    pub cuCtxGetCurrent: FnCtxGetCurrent,
    pub cuMemGetInfo_v2: FnMemGetInfo,
    pub cuMemAlloc_v2: FnMemAlloc,
    pub cuMemFree_v2: FnMemFree,
    pub cuMemHostAlloc: FnMemHostAlloc,
    pub cuMemFreeHost: FnMemFreeHost,
    pub cuMemHostRegister_v2: FnMemHostRegister,
    pub cuMemHostUnregister: FnMemHostUnregister,
    pub cuMemcpyHtoDAsync_v2: FnMemcpyHtoDAsync,
    pub cuMemcpyDtoH_v2: FnMemcpyDtoH,
    pub cuStreamCreate: FnStreamCreate,
    pub cuStreamDestroy_v2: FnStreamDestroy,
    pub cuStreamSynchronize: FnStreamSynchronize,
    pub cuStreamWaitEvent: FnStreamWaitEvent,
    pub cuEventCreate: FnEventCreate,
    pub cuEventDestroy_v2: FnEventDestroy,
    pub cuEventRecord: FnEventRecord,
    pub cuEventSynchronize: FnEventSynchronize,
    pub cuEventQuery: FnEventQuery,
    /// Absent from some stripped-down driver shims; without it, copy and
    /// stall times go unmeasured rather than the driver failing to load.
    pub cuEventElapsedTime: Option<FnEventElapsedTime>,
    _library: Library,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

impl Driver {
    /// Loads the driver library at `path`, resolves every entry point and
    /// initializes the driver, so that a `Driver` in hand is always usable.
    pub fn load_from(path: &str) -> Result<Driver> {
        // SAFETY: loading runs the library's initializers. libcuda's are
        // designed to run in any process that dlopens it; for any other
        // path, the caller asked for exactly that library.
        let library = unsafe { Library::new(path) }.map_err(|e| CudaError::LibraryNotFound {
            tried: path.to_string(),
            reason: e.to_string(),
        })?;
        let driver = Self::resolve(library)?;
        // SAFETY: cuInit takes no pointers; 0 is the only documented flag value.
        let code = unsafe { (driver.cuInit)(0) };
        driver.check("cuInit", code)?;
        Ok(driver)
    }

    fn resolve(library: Library) -> Result<Driver> {
        // SAFETY: every `symbol` call below asks for the field's type, which
        // is the function-pointer type of that symbol's C prototype in
        // cuda.h; `library` moves into the same struct, outliving them.
        unsafe {
            Ok(Driver {
                cuInit: symbol(&library, "cuInit")?,
                cuGetErrorName: symbol(&library, "cuGetErrorName")?,
                cuDeviceGet: symbol(&library, "cuDeviceGet")?,
                cuDeviceGetCount: symbol(&library, "cuDeviceGetCount")?,
                cuDeviceGetName: symbol(&library, "cuDeviceGetName")?,
                cuDevicePrimaryCtxRetain: symbol(&library, "cuDevicePrimaryCtxRetain")?,
                cuDevicePrimaryCtxRelease_v2: symbol(&library, "cuDevicePrimaryCtxRelease_v2")?,
                cuCtxSetCurrent: symbol(&library, "cuCtxSetCurrent")?,
                cuCtxGetCurrent: symbol(&library, "cuCtxGetCurrent")?,
                cuMemGetInfo_v2: symbol(&library, "cuMemGetInfo_v2")?,
                cuMemAlloc_v2: symbol(&library, "cuMemAlloc_v2")?,
                cuMemFree_v2: symbol(&library, "cuMemFree_v2")?,
                cuMemHostAlloc: symbol(&library, "cuMemHostAlloc")?,
                cuMemFreeHost: symbol(&library, "cuMemFreeHost")?,
                cuMemHostRegister_v2: symbol(&library, "cuMemHostRegister_v2")?,
                cuMemHostUnregister: symbol(&library, "cuMemHostUnregister")?,
                cuMemcpyHtoDAsync_v2: symbol(&library, "cuMemcpyHtoDAsync_v2")?,
                cuMemcpyDtoH_v2: symbol(&library, "cuMemcpyDtoH_v2")?,
                cuStreamCreate: symbol(&library, "cuStreamCreate")?,
                cuStreamDestroy_v2: symbol(&library, "cuStreamDestroy_v2")?,
                cuStreamSynchronize: symbol(&library, "cuStreamSynchronize")?,
                cuStreamWaitEvent: symbol(&library, "cuStreamWaitEvent")?,
                cuEventCreate: symbol(&library, "cuEventCreate")?,
                cuEventDestroy_v2: symbol(&library, "cuEventDestroy_v2")?,
                cuEventRecord: symbol(&library, "cuEventRecord")?,
                cuEventSynchronize: symbol(&library, "cuEventSynchronize")?,
                cuEventQuery: symbol(&library, "cuEventQuery")?,
                cuEventElapsedTime: symbol(&library, "cuEventElapsedTime").ok(),
                _library: library,
            })
        }
    }

    /// The middle layer: turns a driver status into a `Result` whose error
    /// names the call and the driver's own name for the code.
    pub fn check(&self, call: &'static str, code: CUresult) -> Result<()> {
        if code == CUDA_SUCCESS {
            return Ok(());
        }
        Err(CudaError::Driver {
            call,
            code,
            name: self.error_name(code),
        })
    }

    fn error_name(&self, code: CUresult) -> String {
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: `name` is a valid out-pointer; the driver stores a pointer
        // to a static string there or leaves it untouched on failure.
        let status = unsafe { (self.cuGetErrorName)(code, &mut name) };
        if status != CUDA_SUCCESS || name.is_null() {
            return format!("CUDA_ERROR_{code}");
        }
        // SAFETY: on success `name` points to a NUL-terminated string with
        // static lifetime inside the driver.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Looks up `name` and copies the function pointer out of the `Symbol`.
///
/// # Safety
/// `T` must be the function-pointer type matching the symbol's C prototype,
/// and the returned pointer must not outlive `library`.
unsafe fn symbol<T: Copy>(library: &Library, name: &'static str) -> Result<T> {
    // SAFETY: the caller guarantees `T` matches the symbol's prototype.
    let found = unsafe { library.get::<T>(name) };
    found.map(|s| *s).map_err(|e| CudaError::SymbolMissing {
        symbol: name,
        reason: e.to_string(),
    })
}

/// Driver handles cross our API as integers (that is how torch hands out
/// `cuda_stream`); these convert without changing the bits.
pub(crate) fn handle_to_u64(handle: *mut c_void) -> u64 {
    handle as usize as u64
}

pub(crate) fn u64_to_handle(raw: u64) -> *mut c_void {
    raw as usize as *mut c_void
}

/// Invokes a raw entry point and checks its status, naming the call after
/// the field, so no call site can misspell what failed.
///
/// Expands to a call through a raw function pointer, so it must sit inside
/// an `unsafe` block whose SAFETY comment covers the arguments.
macro_rules! cu {
    ($driver:expr, $symbol:ident($($arg:expr),* $(,)?)) => {{
        let driver: &$crate::sys::Driver = $driver;
        driver.check(stringify!($symbol), (driver.$symbol)($($arg),*))
    }};
}
pub(crate) use cu;
