//! The three tiers end to end on the host backend: an expert store on disk,
//! a host cache smaller than the experts, device slots fewer still. Every
//! fetched slot must hold exactly the expert's bytes.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use moe_offload_core::planner::PlannerConfig;
use moe_offload_core::tiers::store::{ExpertStore, LayerSpec, StoreWriter, TensorIndex};
use moe_offload_core::{CacheConfig, CoreError, Device, ExpertCache};

const LAYERS: u32 = 3;
const EXPERTS: u32 = 8;
const BYTES: usize = 6000;
const SLOT: usize = 8192;

fn blob(layer: u32, expert: u32) -> Vec<u8> {
    (0..BYTES)
        .map(|i| (i as u32 * 7 + layer * 101 + expert * 37) as u8)
        .collect()
}

fn write_store(dir: &Path) {
    let specs = (0..LAYERS)
        .map(|l| LayerSpec {
            name: format!("layers.{l}.experts"),
            experts: EXPERTS,
            blob_bytes: BYTES as u64,
            tensors: vec![TensorIndex {
                name: "w".into(),
                dtype: "uint8".into(),
                shape: vec![BYTES as u64],
                offset: 0,
            }],
        })
        .collect();
    let mut writer = StoreWriter::create(dir, specs, serde_json::Value::Null, false).unwrap();
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            writer
                .write_expert(l as usize, e as usize, &blob(l, e))
                .unwrap();
        }
    }
    writer.finish().unwrap();
}

struct Fixture {
    cache: ExpertCache,
    pool: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn fixture(n_slots: usize, host_slots: usize, workers: usize, policy: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path());
    let store = Arc::new(ExpertStore::open(dir.path()).unwrap());
    let pool = vec![0u8; n_slots * SLOT];
    let config = CacheConfig {
        layers: vec![(EXPERTS, BYTES); LAYERS as usize],
        pool_address: pool.as_ptr() as u64,
        slot_bytes: SLOT,
        n_slots,
        device: Device::Host,
        copy_workers: workers,
        policy: policy.into(),
        budget_bytes: (n_slots * SLOT) as u64,
        planner: PlannerConfig::default(),
        eamc_path: None,
        cpu_experts: moe_offload_core::execution::CpuExperts::Never,
    };
    let cache = ExpertCache::with_store(config, store, host_slots).unwrap();
    Fixture {
        cache,
        pool,
        _dir: dir,
    }
}

fn slot_bytes(f: &Fixture, slot: u32) -> &[u8] {
    &f.pool[slot as usize * SLOT..slot as usize * SLOT + BYTES]
}

#[test]
fn misses_go_disk_to_host_to_device_and_host_hits_skip_the_disk() {
    let f = fixture(2, 4, 2, "lru");
    assert_eq!(f.cache.host_slots(), 4);
    for round in 0..2 {
        for l in 0..LAYERS {
            let experts = [round % EXPERTS, (round + 3) % EXPERTS];
            let slots = f.cache.fetch(l, &experts).unwrap();
            for (&e, &slot) in experts.iter().zip(&slots) {
                f.cache.wait(l, e, 0).unwrap();
                assert_eq!(slot_bytes(&f, slot), blob(l, e), "layer {l} expert {e}");
            }
            f.cache.release(l, &experts, 0).unwrap();
        }
    }
    let host = f.cache.host_stats().unwrap();
    // 12 device misses; the host cache (4 slots) cannot keep 6 experts.
    assert_eq!(f.cache.stats().misses, 12);
    assert_eq!(host.hits + host.misses, 12);
    assert!(host.misses >= 6 && host.evictions > 0, "{host:?}");
    // Experts used again soon are served from host memory.
    let before = f.cache.host_stats().unwrap();
    f.cache.fetch(2, &[1, 4]).unwrap();
    f.cache.wait(2, 1, 0).unwrap();
    f.cache.wait(2, 4, 0).unwrap();
    f.cache.release(2, &[1, 4], 0).unwrap();
    f.cache.fetch(0, &[5]).unwrap();
    f.cache.wait(0, 5, 0).unwrap();
    f.cache.release(0, &[5], 0).unwrap();
    let after = f.cache.host_stats().unwrap();
    assert_eq!(
        after.misses,
        before.misses + 1,
        "only the new expert is read"
    );
}

#[test]
fn preload_fills_the_host_cache_and_read_expert_serves_from_it() {
    let f = fixture(2, (LAYERS * EXPERTS) as usize, 3, "lru");
    let all: Vec<_> = (0..LAYERS)
        .flat_map(|l| (0..EXPERTS).map(move |e| (l, e)))
        .collect();
    f.cache.preload(&all).unwrap();
    let host = f.cache.host_stats().unwrap();
    assert_eq!(host.staged, u64::from(LAYERS * EXPERTS));
    let mut out = vec![0u8; 100];
    f.cache.read_expert(1, 6, 200, &mut out).unwrap();
    assert_eq!(out, blob(1, 6)[200..300]);
    assert_eq!(
        f.cache.host_stats().unwrap().misses,
        0,
        "no disk read after preloading"
    );
    assert!(matches!(
        f.cache.write_expert(0, 0, 0, &[1]),
        Err(CoreError::Protocol(_))
    ));
}

#[test]
fn a_corrupt_blob_fails_its_fetch_and_nothing_else() {
    let f = fixture(2, 2, 1, "lru");
    let path = f._dir.path().join("layer-001.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 3 * SLOT + 10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    f.cache.fetch(1, &[3]).unwrap();
    let error = f.cache.wait(1, 3, 0).unwrap_err().to_string();
    f.cache.release(1, &[3], 0).unwrap();
    assert!(
        error.contains("layer-001.bin")
            && error.contains("checksum mismatch in expert 3 of MoE layer 1"),
        "{error}"
    );
    let slots = f.cache.fetch(1, &[2]).unwrap();
    f.cache.wait(1, 2, 0).unwrap();
    assert_eq!(slot_bytes(&f, slots[0]), blob(1, 2));
    f.cache.release(1, &[2], 0).unwrap();
    let error = f.cache.preload(&[(1, 3)]).unwrap_err();
    assert!(matches!(error, CoreError::Store { .. }), "{error}");
}

#[test]
fn concurrent_layers_under_prefetch_always_see_their_own_bytes() {
    let f = Arc::new(fixture(4, 3, 3, "activation-aware"));
    let readers: Vec<_> = (0..2u32)
        .map(|t| {
            let f = Arc::clone(&f);
            thread::spawn(move || {
                for step in 0..60u32 {
                    let layer = (step + t) % LAYERS;
                    let expert = (step * 5 + t * 3) % EXPERTS;
                    f.cache
                        .observe(layer, &[expert, (expert + 1) % EXPERTS], 2)
                        .unwrap();
                    let slots = f.cache.fetch(layer, &[expert]).unwrap();
                    f.cache.wait(layer, expert, 0).unwrap();
                    assert_eq!(slot_bytes(&f, slots[0]), blob(layer, expert));
                    f.cache.release(layer, &[expert], 0).unwrap();
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
}
