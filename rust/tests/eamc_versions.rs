//! The EAMC file across versions: a version 1 file (written before the
//! planner's affinity tables were saved) still loads, without tables;
//! version 2 carries the tables, so a planner restarted from the file plans
//! as the one that learned them; a newer version is refused with the fix.

use std::fs;
use std::path::{Path, PathBuf};

use moe_offload_core::planner::{Planner, PlannerConfig};
use moe_offload_core::trace::{ActivationCollection, ActivationMatrix, Replacement};
use moe_offload_core::{CacheConfig, CoreError, Device, ExpertCache};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The entries of `fixtures/v1.eamc`, written by the version 1 code from
/// a collection of capacity 4 over 3 layers of 4 experts (least-matched
/// replacement) that took these, in this order, and then noted entry 1 as
/// a best match twice and entry 2 once.
const V1_ENTRIES: [[u32; 12]; 3] = [
    [2, 1, 0, 0, 0, 0, 3, 0, 1, 0, 0, 2],
    [0, 0, 4, 1, 1, 2, 0, 0, 0, 3, 0, 0],
    [1, 1, 1, 1, 0, 5, 0, 0, 2, 0, 2, 0],
];

fn matrix(layers: usize, experts: usize, counts: &[u32]) -> ActivationMatrix {
    ActivationMatrix::from_counts(layers, experts, counts.to_vec()).unwrap()
}

fn version_of(path: &Path) -> u32 {
    let bytes = fs::read(path).unwrap();
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

#[test]
fn a_version_1_file_loads_its_entries_and_match_counts_without_tables() {
    let path = fixture("v1.eamc");
    assert_eq!(version_of(&path), 1);
    let mut eamc = ActivationCollection::load(&path).unwrap();
    let shape = (eamc.layers(), eamc.experts(), eamc.capacity(), eamc.len());
    assert_eq!(shape, (3, 4, 4, 3));
    assert_eq!(eamc.replacement(), Replacement::LeastMatched);
    for (k, counts) in V1_ENTRIES.iter().enumerate() {
        assert_eq!(eamc.entry(k).counts(), counts, "entry {k}");
    }
    assert!(eamc.affinity().is_none());

    // A planner starts from it with empty tables (relearned from traffic).
    let planner = Planner::with_collection(eamc.clone(), PlannerConfig::default()).unwrap();
    let (tables, values) = planner.affinity();
    assert_eq!((tables, values.len()), (2, 2 * 3 * 4 * 4));
    assert!(values.iter().all(|&v| v == 0.0));

    // Saved again it is a version 2 file of the same entries.
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.eamc");
    eamc.save(&again).unwrap();
    assert_eq!(version_of(&again), 2);
    let back = ActivationCollection::load(&again).unwrap();
    for (k, counts) in V1_ENTRIES.iter().enumerate() {
        assert_eq!(back.entry(k).counts(), counts, "entry {k}");
    }

    // The match counts came along: least-matched replacement gives up the
    // saved entries in the order of their counts (0, 1 and 2 matches),
    // each newcomer noted as matched more often than any. Entry 3, the
    // first newcomer, is never matched: it goes after entry 0, the older.
    let newcomer = matrix(3, 4, &[1; 12]);
    assert_eq!(eamc.insert(&newcomer).unwrap(), Some(3), "the free entry");
    let replaced: Vec<usize> = (0..4)
        .map(|_| {
            let index = eamc.insert(&newcomer).unwrap().unwrap();
            (0..3).for_each(|_| eamc.note_match(index));
            index
        })
        .collect();
    assert_eq!(replaced, [0, 3, 2, 1]);
}

/// Requests of 6 layers of 8 experts, top-2, routed with structure (the
/// experts of layer l + 1 and l + 2 follow those of layer l) and noise.
fn routing(seed: u64, tokens: usize) -> Vec<[[u32; 2]; 6]> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..tokens)
        .map(|_| {
            let first = (next() % 8) as u32;
            let mut token = [[0; 2]; 6];
            for (l, row) in token.iter_mut().enumerate() {
                let noise = (next() % 3) as u32;
                row[0] = (first * (l as u32 + 1) + noise) % 8;
                row[1] = (row[0] + 1 + (next() % 2) as u32) % 8;
            }
            token
        })
        .collect()
}

/// Global frequencies are not saved (a restarted planner counts them
/// afresh), so they are left out of the comparison.
fn config(affinity_horizon: usize) -> PlannerConfig {
    PlannerConfig {
        global_weight: 0.0,
        affinity_horizon,
        ..PlannerConfig::default()
    }
}

fn learned_planner(affinity_horizon: usize) -> Planner {
    let mut planner = Planner::new(6, 8, config(affinity_horizon)).unwrap();
    for seed in 1..5 {
        let id = planner.begin_request();
        for token in routing(seed, 12) {
            for (l, row) in token.iter().enumerate() {
                planner.observe(id, l, row).unwrap();
            }
        }
        planner.end_request(id).unwrap();
    }
    planner
}

fn save(planner: &Planner, path: &Path) {
    let (tables, values) = planner.affinity();
    planner
        .collection()
        .save_with_affinity(path, tables, values)
        .unwrap();
}

/// A plan's retention scores and prefetch candidates.
type OwnedPlan = (Vec<f32>, Vec<(u32, f32)>);

/// Every plan of a new request, layer by layer.
fn plans(planner: &mut Planner) -> Vec<OwnedPlan> {
    let id = planner.begin_request();
    let mut out = Vec::new();
    for token in routing(99, 3) {
        for (l, row) in token.iter().enumerate() {
            planner.observe(id, l, row).unwrap();
            let (scores, best) = planner.plan(l);
            out.push((scores.to_vec(), best));
        }
    }
    out
}

#[test]
fn a_planner_restarted_from_a_version_2_file_plans_as_the_one_that_learned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warm.eamc");
    let mut learned = learned_planner(4);
    save(&learned, &path);
    assert_eq!(version_of(&path), 2);

    let loaded = ActivationCollection::load(&path).unwrap();
    let (tables, values) = learned.affinity();
    let saved = loaded.affinity().expect("the tables were saved");
    assert_eq!((saved.tables(), saved.values()), (tables, values));
    assert!(values.iter().any(|&v| v > 0.0));
    let mut cold = loaded.clone();
    let mut restarted = Planner::with_collection(loaded, config(4)).unwrap();
    assert_eq!(restarted.affinity(), learned.affinity());

    let expected = plans(&mut learned);
    assert_eq!(plans(&mut restarted), expected);
    // Without the tables the same collection plans otherwise: they are
    // what the restart kept.
    cold.take_affinity();
    let mut cold = Planner::with_collection(cold, config(4)).unwrap();
    assert_ne!(plans(&mut cold), expected);
}

#[test]
fn saved_tables_for_other_distances_keep_the_common_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("warm.eamc");
    let learned = learned_planner(3);
    save(&learned, &path);
    let (_, values) = learned.affinity();
    let table = 6 * 8 * 8;
    assert_eq!(values.len(), 3 * table);

    let fewer = Planner::with_collection(ActivationCollection::load(&path).unwrap(), config(1));
    assert_eq!(fewer.unwrap().affinity(), (1, &values[..table]));

    let more = Planner::with_collection(ActivationCollection::load(&path).unwrap(), config(5));
    let more = more.unwrap();
    let (tables, kept) = more.affinity();
    assert_eq!((tables, &kept[..3 * table]), (5, values));
    assert!(kept[3 * table..].iter().all(|&v| v == 0.0));
}

const SLOT: usize = 4096;

fn cache_config(pool: &[u8], eamc_path: Option<PathBuf>) -> CacheConfig {
    CacheConfig {
        layers: vec![(8, 1000); 6],
        pool_address: pool.as_ptr() as u64,
        slot_bytes: SLOT,
        n_slots: 4,
        device: Device::Host,
        copy_workers: 1,
        policy: "activation-aware".into(),
        budget_bytes: (4 * SLOT) as u64,
        planner: PlannerConfig::default(),
        eamc_path,
        cpu_experts: moe_offload_core::execution::CpuExperts::Never,
    }
}

#[test]
fn the_cache_saves_its_planners_tables_and_a_restart_starts_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("a.eamc"), dir.path().join("b.eamc"));
    let pool = vec![0u8; 4 * SLOT];
    let cache = ExpertCache::new(cache_config(&pool, None)).unwrap();
    cache.begin_requests(1).unwrap();
    for token in routing(7, 10) {
        for (l, row) in token.iter().enumerate() {
            cache.observe(l as u32, row, 2).unwrap();
        }
    }
    cache.end_requests().unwrap();
    cache.save_eamc(&first).unwrap();
    drop(cache);
    let saved = ActivationCollection::load(&first).unwrap();
    let tables = saved.affinity().expect("the planner's tables were saved");
    assert!(tables.tables() > 0 && tables.values().iter().any(|&v| v > 0.0));

    // Restarted from the file and saved before any traffic: the same file,
    // tables included.
    let cache = ExpertCache::new(cache_config(&pool, Some(first.clone()))).unwrap();
    assert_eq!(cache.eamc_len().unwrap(), 1);
    cache.save_eamc(&second).unwrap();
    assert_eq!(fs::read(&second).unwrap(), fs::read(&first).unwrap());
}

#[test]
fn a_newer_version_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.eamc");
    let mut bytes = fs::read(fixture("v1.eamc")).unwrap();
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    let n = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
    fs::write(&path, &bytes).unwrap();

    let pool = vec![0u8; 4 * SLOT];
    let errors = [
        ActivationCollection::load(&path).unwrap_err(),
        ExpertCache::new(cache_config(&pool, Some(path.clone())))
            .err()
            .unwrap(),
    ];
    for err in errors {
        assert!(matches!(err, CoreError::EamcFile { .. }), "{err}");
        let message = err.to_string();
        for says in [
            "future.eamc",
            "version 3 is newer",
            "upgrade moe-offload",
            "delete the file to rebuild it from traffic",
        ] {
            assert!(message.contains(says), "{message}");
        }
    }
}
