//! The expert cache on a real device: slots in device memory, copies on the
//! copy workers' own streams, readers on the legacy default stream. Ignored
//! by a plain `cargo test`; run where a GPU is with `cargo test -- --ignored`
//! (as `scripts/gpu-check.sh` does), where a missing device fails them.

use std::sync::Arc;

use moe_offload_core::planner::PlannerConfig;
use moe_offload_core::{CacheConfig, Device, ExpertCache};
use moe_offload_cuda::{
    copy_device_to_host, copy_host_to_device_async, device_count, driver, synchronize_stream,
    Context, DeviceBuffer, Event, PinnedHostBuffer, Stream,
};

const EXPERTS: u32 = 16;
const BYTES: usize = 3 << 20;
const SLOT: usize = 3 << 20;

/// Device 0's primary context; these tests were asked to run, so no driver
/// or no device is a failure. The test thread is left without a current
/// context on purpose: the cache must not depend on what its caller has
/// current.
fn gpu() -> Arc<Context> {
    driver().expect("these tests need a CUDA driver (libcuda.so.1)");
    let devices = device_count().expect("cuDeviceGetCount with a loaded driver");
    assert!(
        devices > 0,
        "these tests need a CUDA device; the driver sees none"
    );
    Context::primary(0).expect("retain device 0's primary context")
}

fn blob(expert: u32) -> Vec<u8> {
    (0..BYTES)
        .map(|i| ((i % 251) as u32 * 7 + expert * 37) as u8)
        .collect()
}

/// A cache of `n_slots` device slots over `EXPERTS` experts, each written.
fn cache(context: &Arc<Context>, n_slots: usize, workers: usize) -> (ExpertCache, DeviceBuffer) {
    let pool = DeviceBuffer::new(context, n_slots * SLOT).expect("device slot pool");
    let cache = cache_on(&pool, n_slots, workers, 0);
    (cache, pool)
}

/// A cache over `pool`, allocated in stream order on `pool_stream`.
fn cache_on(pool: &DeviceBuffer, n_slots: usize, workers: usize, pool_stream: u64) -> ExpertCache {
    let config = CacheConfig {
        layers: vec![(EXPERTS, BYTES)],
        pool_address: pool.ptr(),
        slot_bytes: SLOT,
        n_slots,
        device: Device::Cuda {
            ordinal: 0,
            pool_stream,
        },
        copy_workers: workers,
        policy: "lru".into(),
        budget_bytes: (n_slots * SLOT) as u64,
        planner: PlannerConfig::default(),
        eamc_path: None,
        cpu_experts: moe_offload_core::execution::CpuExperts::Never,
    };
    let cache = ExpertCache::new(config).expect("a CUDA expert cache");
    for e in 0..EXPERTS {
        cache.write_expert(0, e, 0, &blob(e)).unwrap();
    }
    cache
}

/// Runs `work` on a thread of its own bound to the primary context (the
/// test threads have none current, see `gpu`).
fn bound<T: Send>(context: &Arc<Context>, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                context
                    .bind_to_current_thread()
                    .expect("bind the primary context");
                work()
            })
            .join()
            .expect("the bound thread")
    })
}

fn slot_holds(context: &Arc<Context>, pool: &DeviceBuffer, slot: u32, expert: u32) -> bool {
    let address = pool.ptr() + slot as u64 * SLOT as u64;
    // A synchronous copy on the context's legacy default stream, which `wait`
    // made wait for the slot's copy. The copy needs a current context, which
    // the test thread must not have (see `gpu`): it runs on a thread of its
    // own, bound to the same primary context (and so the same legacy stream).
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                context
                    .bind_to_current_thread()
                    .expect("bind the primary context");
                let mut host = vec![0u8; BYTES];
                copy_device_to_host(&mut host, address).unwrap();
                host == blob(expert)
            })
            .join()
            .expect("the read-back thread")
    })
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn every_fetched_slot_holds_its_expert() {
    let context = gpu();
    let (cache, pool) = cache(&context, 4, 2);
    for round in 0..40u32 {
        let experts = [round % EXPERTS, (round * 5 + 3) % EXPERTS];
        let slots = cache.fetch(0, &experts).unwrap();
        for (&e, &slot) in experts.iter().zip(&slots) {
            cache.wait(0, e, 0).unwrap();
            assert!(
                slot_holds(&context, &pool, slot, e),
                "round {round}: slot {slot} lacks expert {e}"
            );
        }
        cache.release(0, &experts, 0).unwrap();
    }
    assert!(cache.stats().misses > 0 && cache.stats().hits > 0);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn a_slot_refilled_without_a_reader_ends_with_its_last_expert() {
    let context = gpu();
    // Two workers, two slots: copies into one slot are issued on different
    // streams with nobody reading in between; the last must land last.
    let (cache, pool) = cache(&context, 2, 2);
    for round in 0..200u32 {
        let expert = round % EXPERTS;
        cache.fetch(0, &[expert]).unwrap();
        cache.release(0, &[expert], 0).unwrap();
    }
    for expert in [EXPERTS - 2, EXPERTS - 1] {
        let [slot] = cache.fetch(0, &[expert]).unwrap()[..] else {
            unreachable!()
        };
        cache.wait(0, expert, 0).unwrap();
        assert!(
            slot_holds(&context, &pool, slot, expert),
            "slot {slot} lacks expert {expert}"
        );
        cache.release(0, &[expert], 0).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn dropping_the_cache_with_copies_in_flight_is_safe() {
    let context = gpu();
    for _ in 0..5 {
        let (cache, pool) = cache(&context, 4, 2);
        cache.fetch(0, &[0, 1, 2, 3]).unwrap();
        // The workers must let their copies land before the host tier is
        // freed; the pool outlives the cache here, as `pool_owner` does.
        drop(cache);
        drop(pool);
    }
}

/// Experts large enough that a copy is still in flight microseconds after
/// it was issued (256 MiB take milliseconds over any PCIe link).
const LARGE: usize = 256 << 20;

fn large_cache(context: &Arc<Context>) -> (ExpertCache, DeviceBuffer) {
    let pool = DeviceBuffer::new(context, LARGE).expect("device slot pool");
    let config = CacheConfig {
        layers: vec![(2, LARGE)],
        pool_address: pool.ptr(),
        slot_bytes: LARGE,
        n_slots: 1,
        device: Device::Cuda {
            ordinal: 0,
            pool_stream: 0,
        },
        copy_workers: 1,
        policy: "lru".into(),
        budget_bytes: LARGE as u64,
        planner: PlannerConfig::default(),
        eamc_path: None,
        cpu_experts: moe_offload_core::execution::CpuExperts::Never,
    };
    (ExpertCache::new(config).expect("a CUDA expert cache"), pool)
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn a_copy_in_flight_is_a_miss_and_the_readers_wait_a_stall() {
    let context = gpu();
    let (cache, _pool) = large_cache(&context);
    cache.fetch(0, &[0]).unwrap();
    // Returns once the copy is queued; the legacy stream waits on the device.
    cache.wait(0, 0, 0).unwrap();
    cache.release(0, &[0], 0).unwrap();
    // Queued but not landed: not a hit.
    cache.fetch(0, &[0]).unwrap();
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (0, 2), "{stats:?}");
    cache.release(0, &[0], 0).unwrap();
    bound(&context, || synchronize_stream(&context, 0)).expect("synchronize");
    let stats = cache.stats();
    assert!(
        stats.stall_seconds > 0.0,
        "the legacy stream waited for a 256 MiB copy: {stats:?}"
    );
    // Landed: a hit, with no further stall.
    cache.fetch(0, &[0]).unwrap();
    cache.wait(0, 0, 0).unwrap();
    cache.release(0, &[0], 0).unwrap();
    assert_eq!(cache.stats().hits, 1);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn copies_into_the_pool_wait_for_its_allocation_stream() {
    let context = gpu();
    // The pool's previous owner still writes it on the allocation stream:
    // many copies of other bytes into slot 0, queued before the cache exists.
    let pool = DeviceBuffer::new(&context, 2 * SLOT).expect("device slot pool");
    let garbage = {
        let mut buffer = PinnedHostBuffer::new(&context, SLOT).expect("pinned");
        buffer.as_mut_slice().fill(0xAB);
        buffer
    };
    let allocation_stream = Stream::new(&context).expect("stream");
    bound(&context, || {
        for _ in 0..200 {
            // SAFETY: both ranges hold SLOT bytes and outlive the copies,
            // which the stream synchronization below waits for.
            unsafe {
                copy_host_to_device_async(
                    pool.ptr(),
                    garbage.as_ptr(),
                    SLOT,
                    allocation_stream.raw(),
                )
            }
            .expect("queue the previous owner's writes");
        }
    });
    let cache = cache_on(&pool, 2, 2, allocation_stream.raw());
    let [slot] = cache.fetch(0, &[5]).unwrap()[..] else {
        unreachable!()
    };
    cache.wait(0, 5, 0).unwrap();
    assert!(
        slot_holds(&context, &pool, slot, 5),
        "slot {slot} was overwritten by the allocation stream's earlier work"
    );
    cache.release(0, &[5], 0).unwrap();
    allocation_stream.synchronize().expect("synchronize");
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test -- --ignored"]
fn dropping_the_cache_waits_for_its_readers() {
    let context = gpu();
    let (cache, pool) = cache(&context, 2, 1);
    let reader = Stream::new(&context).expect("reader stream");
    let scratch = DeviceBuffer::new(&context, LARGE).expect("scratch");
    let source = PinnedHostBuffer::new(&context, LARGE).expect("pinned");
    cache.fetch(0, &[1]).unwrap();
    cache.wait(0, 1, reader.raw()).unwrap();
    // The reader is busy for milliseconds before it is done with the slot.
    let busy_until = Event::new(&context).expect("event");
    bound(&context, || {
        // SAFETY: both ranges hold LARGE bytes and outlive the copy, which
        // the drop below (or the synchronization after it) waits for.
        unsafe { copy_host_to_device_async(scratch.ptr(), source.as_ptr(), LARGE, reader.raw()) }
            .expect("queue the reader's work");
        busy_until.record(reader.raw()).expect("record");
    });
    cache.release(0, &[1], reader.raw()).unwrap();
    drop(cache);
    assert!(
        busy_until.is_complete().expect("query"),
        "the cache (and so the pool's owner) went while a reader still used a slot"
    );
    reader.synchronize().expect("synchronize");
    drop(pool);
}
