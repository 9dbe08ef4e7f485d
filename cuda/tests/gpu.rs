//! End-to-end checks against a real device. They are ignored by a plain
//! `cargo test` (reported as ignored, never as passed) and run where a GPU
//! is with `cargo test -- --ignored` (as `scripts/gpu-check.sh` does), where
//! a missing driver or device fails them like any other driver error.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use moe_offload_cuda::sys::CUcontext;
use moe_offload_cuda::{
    copy_device_to_host, copy_host_to_device_async, device_count, driver, elapsed_seconds,
    stream_wait_event, Context, CudaError, DeviceBuffer, Event, EventState, PinnedHostBuffer,
    Stream,
};

const MIB: usize = 1 << 20;

/// Device 0's primary context, bound to the calling thread; these tests
/// were asked to run, so no driver or no device is a failure.
fn gpu() -> Arc<Context> {
    driver().expect("these tests need a CUDA driver (libcuda.so.1)");
    let devices = device_count().expect("cuDeviceGetCount with a loaded driver");
    assert!(
        devices > 0,
        "these tests need a CUDA device; the driver sees none"
    );
    let context = Context::primary(0).expect("retain device 0's primary context");
    context
        .bind_to_current_thread()
        .expect("bind the primary context");
    context
}

/// Bytes that differ from their neighbours and from other seeds, with a
/// period (251) that does not divide any power-of-two chunk size.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn pinned_with(context: &Arc<Context>, bytes: &[u8]) -> PinnedHostBuffer {
    let mut buffer = PinnedHostBuffer::new(context, bytes.len()).expect("pinned allocation");
    buffer.as_mut_slice().copy_from_slice(bytes);
    buffer
}

fn read_back(device: &DeviceBuffer) -> Vec<u8> {
    let mut host = vec![0u8; device.len()];
    copy_device_to_host(&mut host, device.ptr()).expect("device-to-host copy");
    host
}

/// Asserts equality without dumping megabytes into the failure message.
fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: first mismatch at byte {at}: {} != {}",
            actual[at], expected[at]
        );
    }
}

fn current_context() -> CUcontext {
    let driver = driver().expect("driver");
    let mut current: CUcontext = std::ptr::null_mut();
    // SAFETY: `current` is a valid out-pointer for the call.
    let status = unsafe { (driver.cuCtxGetCurrent)(&mut current) };
    driver
        .check("cuCtxGetCurrent", status)
        .expect("query current context");
    current
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn context_reports_device() {
    let context = gpu();
    assert_eq!(context.ordinal(), 0);
    let name = context.device_name().expect("device name");
    assert!(!name.trim().is_empty(), "empty device name");
    let (free, total) = context.mem_info().expect("memory info");
    assert!(total > 0 && free <= total, "free {free} of total {total}");
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn invalid_ordinal_is_a_driver_error() {
    let _context = gpu();
    let past_the_end = device_count().expect("device count");
    match Context::primary(past_the_end) {
        Err(CudaError::Driver { call, code, name }) => {
            assert_eq!(call, "cuDeviceGet");
            assert_ne!(code, 0);
            assert!(
                name.starts_with("CUDA_ERROR_"),
                "unexpected error name {name}"
            );
        }
        Err(other) => panic!("expected a driver error, got {other}"),
        Ok(_) => panic!("device {past_the_end} of {past_the_end} exists"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn pinned_buffer_is_zeroed_and_writable() {
    let context = gpu();
    let mut buffer = PinnedHostBuffer::new(&context, 3 * MIB + 5).expect("pinned allocation");
    assert_eq!(buffer.len(), 3 * MIB + 5);
    assert!(!buffer.as_ptr().is_null());
    assert!(
        buffer.as_slice().iter().all(|&b| b == 0),
        "pinned memory not zeroed"
    );
    let expected = pattern(buffer.len(), 3);
    buffer.as_mut_slice().copy_from_slice(&expected);
    assert_same_bytes(buffer.as_slice(), &expected, "pinned buffer");
    assert_eq!(buffer.as_mut_ptr().cast_const(), buffer.as_ptr());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn zero_byte_buffers_allocate_nothing() {
    let context = gpu();
    let host = PinnedHostBuffer::new(&context, 0).expect("empty pinned buffer");
    assert!(host.is_empty() && host.as_slice().is_empty());
    let device = DeviceBuffer::new(&context, 0).expect("empty device buffer");
    assert!(device.is_empty());
    assert_eq!(device.ptr(), 0);
    // SAFETY: zero bytes are copied, so no pointer is dereferenced.
    unsafe { copy_host_to_device_async(0, host.as_ptr(), 0, 0) }.expect("empty copy");
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn device_buffer_takes_device_memory() {
    let context = gpu();
    let (_, total) = context.mem_info().expect("memory info");
    let bytes = 64 * MIB;
    let first = DeviceBuffer::new(&context, bytes).expect("device allocation");
    let second = DeviceBuffer::new(&context, bytes).expect("device allocation");
    assert_eq!(first.len(), bytes);
    assert!(first.ptr() != 0 && second.ptr() != 0);
    let (low, high) = (first.ptr().min(second.ptr()), first.ptr().max(second.ptr()));
    assert!(low + bytes as u64 <= high, "allocations overlap");
    assert!(total >= 2 * bytes);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn async_copy_round_trips_a_pattern() {
    let context = gpu();
    let expected = pattern(5 * MIB + 17, 11);
    let source = pinned_with(&context, &expected);
    let slot = DeviceBuffer::new(&context, expected.len()).expect("device allocation");
    let copy_stream = Stream::new(&context).expect("copy stream");
    let compute_stream = Stream::new(&context).expect("compute stream");
    let landed = Event::new(&context).expect("event");

    // SAFETY: `source` and `slot` hold `len` bytes and outlive the copy,
    // which `compute_stream.synchronize()` below waits for via the event.
    unsafe {
        copy_host_to_device_async(
            slot.ptr(),
            source.as_ptr(),
            expected.len(),
            copy_stream.raw(),
        )
    }
    .expect("queue host-to-device copy");
    landed.record(copy_stream.raw()).expect("record copy event");
    stream_wait_event(compute_stream.raw(), &landed).expect("compute stream waits");
    compute_stream
        .synchronize()
        .expect("synchronize compute stream");

    assert!(
        landed.is_complete().expect("query event"),
        "the waiting stream finished before the copy"
    );
    assert_same_bytes(&read_back(&slot), &expected, "device copy");
}

/// The copy on the second stream may only start after the first stream's
/// copy; without the wait the (smaller, later) second copy could land first
/// and be overwritten.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn stream_wait_orders_copies_across_streams() {
    let context = gpu();
    let bytes = 128 * MIB;
    let (first, second) = (pattern(bytes, 1), pattern(bytes, 2));
    let (first_src, second_src) = (
        pinned_with(&context, &first),
        pinned_with(&context, &second),
    );
    let slot = DeviceBuffer::new(&context, bytes).expect("device allocation");
    let (stream_a, stream_b) = (
        Stream::new(&context).expect("stream"),
        Stream::new(&context).expect("stream"),
    );
    let first_done = Event::new(&context).expect("event");

    for _ in 0..3 {
        // SAFETY: sources and slot hold `bytes` and outlive the copy; both
        // streams are synchronized before the next round and the end.
        unsafe { copy_host_to_device_async(slot.ptr(), first_src.as_ptr(), bytes, stream_a.raw()) }
            .expect("first copy");
        first_done.record(stream_a.raw()).expect("record");
        stream_wait_event(stream_b.raw(), &first_done).expect("wait");
        // SAFETY: as above.
        unsafe {
            copy_host_to_device_async(slot.ptr(), second_src.as_ptr(), bytes, stream_b.raw())
        }
        .expect("second copy");
        stream_b.synchronize().expect("synchronize b");
        stream_a.synchronize().expect("synchronize a");
        assert_same_bytes(&read_back(&slot), &second, "ordered copies");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn legacy_default_stream_can_wait_on_our_event() {
    let context = gpu();
    let stream = Stream::new(&context).expect("stream");
    let event = Event::new(&context).expect("event");
    event.record(stream.raw()).expect("record");
    stream_wait_event(0, &event).expect("legacy default stream waits");
    event.synchronize().expect("event synchronize");
    assert!(event.is_complete().expect("query"));
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn event_query_tracks_completion() {
    let context = gpu();
    let event = Event::new(&context).expect("event");
    assert!(
        event.is_complete().expect("query fresh event"),
        "a never-recorded event is complete"
    );

    let bytes = 128 * MIB;
    let source = PinnedHostBuffer::new(&context, bytes).expect("pinned allocation");
    let slot = DeviceBuffer::new(&context, bytes).expect("device allocation");
    let stream = Stream::new(&context).expect("stream");
    // SAFETY: both buffers hold `bytes` and outlive the copy, which the
    // polling loop and `synchronize` below wait for.
    unsafe { copy_host_to_device_async(slot.ptr(), source.as_ptr(), bytes, stream.raw()) }
        .expect("copy");
    event.record(stream.raw()).expect("record");

    let deadline = Instant::now() + Duration::from_secs(30);
    while !event.is_complete().expect("query pending event") {
        assert!(Instant::now() < deadline, "a 128 MiB copy took over 30 s");
        thread::sleep(Duration::from_micros(50));
    }
    event.synchronize().expect("event synchronize");
    assert!(event.is_complete().expect("query after synchronize"));
    stream.synchronize().expect("stream synchronize");
}

/// The copy-engine shape: a worker thread binds the context, copies on its
/// own stream and records a shared event; another thread's stream waits.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn worker_thread_copy_is_visible_to_waiting_stream() {
    let context = gpu();
    let expected = pattern(7 * MIB + 3, 29);
    let source = Arc::new(pinned_with(&context, &expected));
    let slot = Arc::new(DeviceBuffer::new(&context, expected.len()).expect("device allocation"));
    let landed = Arc::new(Event::new(&context).expect("event"));

    let worker = {
        let (context, source, slot, landed) = (
            context.clone(),
            source.clone(),
            slot.clone(),
            landed.clone(),
        );
        thread::spawn(move || {
            context.bind_to_current_thread().expect("bind on worker");
            let stream = Stream::new(&context).expect("worker stream");
            // SAFETY: the Arcs keep both buffers alive past the copy, which
            // the main thread waits for through `landed` before reading.
            unsafe {
                copy_host_to_device_async(slot.ptr(), source.as_ptr(), source.len(), stream.raw())
            }
            .expect("worker copy");
            landed.record(stream.raw()).expect("worker record");
            stream
        })
    };
    let worker_stream = worker.join().expect("worker thread");

    let compute = Stream::new(&context).expect("compute stream");
    stream_wait_event(compute.raw(), &landed).expect("compute waits");
    compute.synchronize().expect("compute synchronize");
    assert!(landed.is_complete().expect("query"));
    assert_same_bytes(&read_back(&slot), &expected, "worker copy");
    drop(worker_stream);
}

/// Constructors switch to the context only for their own calls, so a thread
/// with no (or another) context current keeps it.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn constructors_restore_the_threads_context() {
    let context = gpu();
    thread::spawn(move || {
        assert!(current_context().is_null(), "a fresh thread has no context");
        let stream = Stream::new(&context).expect("stream");
        let event = Event::new(&context).expect("event");
        let host = PinnedHostBuffer::new(&context, MIB).expect("pinned allocation");
        let device = DeviceBuffer::new(&context, MIB).expect("device allocation");
        context.mem_info().expect("memory info");
        assert!(
            current_context().is_null(),
            "a constructor left its context current"
        );
        drop((stream, event, host, device));
        assert!(
            current_context().is_null(),
            "a destructor left its context current"
        );

        context.bind_to_current_thread().expect("bind");
        let bound = current_context();
        assert!(!bound.is_null());
        drop(Event::new(&context).expect("event"));
        assert_eq!(current_context(), bound, "binding did not stick");
    })
    .join()
    .expect("probe thread");
}

/// `state` tells a never-recorded event (which the driver calls complete)
/// from one whose work is done, and sees pending work as pending.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn event_state_tells_not_recorded_pending_and_complete() {
    let context = gpu();
    let event = Event::new(&context).expect("event");
    assert_eq!(event.state().expect("query"), EventState::NotRecorded);
    let bytes = 256 * MIB;
    let source = PinnedHostBuffer::new(&context, bytes).expect("pinned allocation");
    let slot = DeviceBuffer::new(&context, bytes).expect("device allocation");
    let stream = Stream::new(&context).expect("stream");
    // SAFETY: both buffers hold `bytes` and outlive the copy, which the
    // synchronization below waits for.
    unsafe { copy_host_to_device_async(slot.ptr(), source.as_ptr(), bytes, stream.raw()) }
        .expect("copy");
    event.record(stream.raw()).expect("record");
    // Microseconds after queueing 256 MiB, the copy cannot have landed.
    assert_eq!(event.state().expect("query"), EventState::Pending);
    stream.synchronize().expect("synchronize");
    assert_eq!(event.state().expect("query"), EventState::Complete);
}

/// Timed events measure a copy once both have completed, and not before;
/// a timing-disabled event cannot be measured.
#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn timed_events_measure_a_copy_once_it_has_landed() {
    let context = gpu();
    let (start, end) = (
        Event::timed(&context).expect("timed event"),
        Event::timed(&context).expect("timed event"),
    );
    let bytes = 256 * MIB;
    let source = PinnedHostBuffer::new(&context, bytes).expect("pinned allocation");
    let slot = DeviceBuffer::new(&context, bytes).expect("device allocation");
    let stream = Stream::new(&context).expect("stream");
    start.record(stream.raw()).expect("record start");
    // SAFETY: both buffers hold `bytes` and outlive the copy, which the
    // synchronization below waits for.
    unsafe { copy_host_to_device_async(slot.ptr(), source.as_ptr(), bytes, stream.raw()) }
        .expect("copy");
    end.record(stream.raw()).expect("record end");
    assert_eq!(elapsed_seconds(&start, &end).expect("in flight"), None);
    stream.synchronize().expect("synchronize");
    let seconds = elapsed_seconds(&start, &end)
        .expect("landed")
        .expect("both events complete");
    assert!(seconds > 0.0 && seconds < 30.0, "256 MiB took {seconds} s");
    let untimed = Event::new(&context).expect("event");
    untimed.record(stream.raw()).expect("record");
    stream.synchronize().expect("synchronize");
    assert!(
        elapsed_seconds(&start, &untimed).is_err(),
        "a timing-disabled event has no timestamp"
    );
}
