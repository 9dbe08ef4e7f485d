//! The expert cache on a real device: slots in device memory, copies on the
//! copy workers' own streams, readers on the legacy default stream. Ignored
//! by a plain `cargo test`; run where a GPU is with `cargo test -- --ignored`
//! (as `scripts/gpu-check.sh` does), where a missing device fails them.

use std::sync::Arc;

use moe_offload_core::planner::PlannerConfig;
use moe_offload_core::{CacheConfig, Device, ExpertCache};
use moe_offload_cuda::{copy_device_to_host, device_count, driver, Context, DeviceBuffer};

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
    let config = CacheConfig {
        layers: vec![(EXPERTS, BYTES)],
        pool_address: pool.ptr(),
        slot_bytes: SLOT,
        n_slots,
        device: Device::Cuda { ordinal: 0 },
        copy_workers: workers,
        policy: "lru".into(),
        budget_bytes: (n_slots * SLOT) as u64,
        planner: PlannerConfig::default(),
        eamc_path: None,
    };
    let cache = ExpertCache::new(config).expect("a CUDA expert cache");
    for e in 0..EXPERTS {
        cache.write_expert(0, e, 0, &blob(e)).unwrap();
    }
    (cache, pool)
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
