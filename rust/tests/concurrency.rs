//! Concurrent callers of the cache's building blocks, on the host backend.
//!
//! Each test checks what a caller can observe, and checks it again after
//! giving the other threads time to act: a slot that is evicted or
//! overwritten while pinned, a request delivered twice, or one delivered
//! after a re-plan removed it, is caught however late it happens.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use moe_offload_core::planner::PlannerConfig;
use moe_offload_core::queue::{CopyRequest, PrefetchQueue, Urgency};
use moe_offload_core::tiers::host_cache::{Acquired, HostCache};
use moe_offload_core::{CacheConfig, CoreError, Device, ExpertCache};

/// How long a blocked thread may take to notice it was woken; only a hang
/// gets anywhere near it.
const HANG: Duration = Duration::from_secs(30);

/// A small deterministic generator, one per thread, so that a failure
/// replays the same choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u32) -> u32 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % below as u64) as u32
    }
}

/// Lets the other threads run between two reads of a pinned slot: a
/// sleep, a yield or a spin, so evictions get every kind of opening.
fn pause(round: usize) {
    match round % 4 {
        0 => thread::sleep(Duration::from_micros(20)),
        1 => thread::yield_now(),
        2 => (0..500).for_each(|_| std::hint::spin_loop()),
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// ExpertCache: fetch / wait / release from several threads at once.

const LAYERS: u32 = 2;
const EXPERTS: u32 = 6;
const BYTES: usize = 1000;
const SLOT: usize = 1024;
const N_SLOTS: usize = 8;
const THREADS: usize = 4;
/// Experts per fetch: THREADS * PER_FETCH == N_SLOTS, so the demand always
/// fits and a fetch never has to fail for lack of slots.
const PER_FETCH: usize = 2;
const ROUNDS: usize = 1500;

/// Expert (layer, expert)'s blob: a pattern no other expert shares at any
/// byte (37 is odd, so experts of a layer differ everywhere; the layer term
/// keeps layers apart for these small counts).
fn blob(layer: u32, expert: u32) -> Vec<u8> {
    (0..BYTES)
        .map(|i| (i as u32 * 7 + layer * 101 + expert * 37) as u8)
        .collect()
}

/// The caller-owned slot pool, used only through the address of its first
/// byte (copy workers write through it), so that no reference covers bytes
/// a copy worker may be writing.
struct Pool {
    _memory: Vec<u8>,
    base: usize,
}

impl Pool {
    fn new() -> Self {
        let mut memory = vec![0u8; N_SLOTS * SLOT];
        let base = memory.as_mut_ptr() as usize;
        Self {
            _memory: memory,
            base,
        }
    }

    fn address(&self) -> u64 {
        self.base as u64
    }

    /// Panics unless `slot` holds exactly (layer, expert)'s bytes.
    fn check(&self, slot: u32, layer: u32, expert: u32, when: &str) {
        assert!((slot as usize) < N_SLOTS, "slot {slot} out of range");
        let mut seen = vec![0u8; BYTES];
        // SAFETY: the range lies inside the pool, which outlives every
        // thread using it; the caller holds a pin on `slot` and has waited
        // for its copy, so no copy worker writes it (the invariant under
        // test, whose breach the comparison below reports).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base as *const u8).add(slot as usize * SLOT),
                seen.as_mut_ptr(),
                BYTES,
            )
        };
        assert!(
            seen == blob(layer, expert),
            "slot {slot} no longer holds expert {expert} of layer {layer} {when}"
        );
    }
}

fn cache_config(pool: &Pool, policy: &str) -> CacheConfig {
    CacheConfig {
        layers: vec![(EXPERTS, BYTES); LAYERS as usize],
        pool_address: pool.address(),
        slot_bytes: SLOT,
        n_slots: N_SLOTS,
        device: Device::Host,
        copy_workers: 3,
        policy: policy.into(),
        budget_bytes: (N_SLOTS * SLOT) as u64,
        planner: PlannerConfig::default(),
        eamc_path: None,
        cpu_experts: moe_offload_core::execution::CpuExperts::Never,
    }
}

fn written_cache(pool: &Pool, policy: &str) -> ExpertCache {
    let cache = ExpertCache::new(cache_config(pool, policy)).unwrap();
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            cache.write_expert(l, e, 0, &blob(l, e)).unwrap();
        }
    }
    cache
}

/// `PER_FETCH` distinct experts of one layer.
fn pick(rng: &mut Rng) -> (u32, Vec<u32>) {
    let layer = rng.next(LAYERS);
    let mut experts = Vec::with_capacity(PER_FETCH);
    while experts.len() < PER_FETCH {
        let e = rng.next(EXPERTS);
        if !experts.contains(&e) {
            experts.push(e);
        }
    }
    (layer, experts)
}

/// One model thread: fetch, wait, read, let the others run, read again,
/// release. Returns how many experts it fetched.
fn fetch_wait_release(cache: &ExpertCache, pool: &Pool, seed: u64) -> u64 {
    let mut rng = Rng(seed);
    let mut fetched = 0;
    for round in 0..ROUNDS {
        let (layer, experts) = pick(&mut rng);
        let slots = match cache.fetch(layer, &experts) {
            Ok(slots) => slots,
            // THREADS * PER_FETCH slots suffice for all holders at once.
            Err(e @ CoreError::BudgetTooSmall { .. }) => {
                panic!("round {round}: a fetch that fits was refused: {e}")
            }
            Err(e) => panic!("round {round}: fetch failed: {e}"),
        };
        fetched += experts.len() as u64;
        for (&e, &slot) in experts.iter().zip(&slots) {
            cache.wait(layer, e, 0).unwrap();
            pool.check(slot, layer, e, "right after wait");
        }
        pause(round);
        for (&e, &slot) in experts.iter().zip(&slots) {
            pool.check(slot, layer, e, "just before release");
            assert_eq!(
                cache.slot_of(layer, e).unwrap(),
                Some(slot),
                "expert {e} of layer {layer} moved while pinned"
            );
        }
        cache.release(layer, &experts, 0).unwrap();
    }
    fetched
}

/// Runs `THREADS` model threads (and `during`, until they are done) and
/// returns how many experts they fetched in all.
fn hammer(cache: &ExpertCache, pool: &Pool, during: impl FnOnce(&AtomicBool) + Send) -> u64 {
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let side = s.spawn(|| during(&done));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| s.spawn(move || fetch_wait_release(cache, pool, 0x9e37_79b9 + t as u64)))
            .collect();
        // Every thread is joined before any failure is passed on, and the
        // side thread is stopped either way, so a failure cannot hang.
        let outcomes: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
        done.store(true, Ordering::Release);
        side.join().unwrap();
        outcomes.into_iter().map(|o| o.unwrap()).sum()
    })
}

/// After the threads: nothing held, the counters add up, and never more
/// bytes resident than the slots hold.
fn check_settled(cache: &ExpertCache, fetched: u64) {
    assert_eq!(
        cache.free_slots(),
        cache.n_slots(),
        "a slot is still pinned"
    );
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, fetched, "{stats:?}");
    assert_eq!(stats.bytes_to_device, stats.copies * BYTES as u64);
    assert!(
        stats.peak_resident_bytes <= (N_SLOTS * BYTES) as u64,
        "{} bytes resident with {N_SLOTS} slots of {BYTES}-byte experts",
        stats.peak_resident_bytes
    );
    assert!(stats.copies > 0 && stats.evictions > 0, "{stats:?}");
}

#[test]
fn pinned_slots_keep_their_expert_while_other_threads_evict() {
    let pool = Pool::new();
    let cache = written_cache(&pool, "lru");
    let fetched = hammer(&cache, &pool, |_| {});
    check_settled(&cache, fetched);
    let stats = cache.stats();
    // Without prefetches every copy is an on-demand miss.
    assert!(stats.copies <= stats.misses, "{stats:?}");
    assert!(
        stats.copies - stats.evictions <= N_SLOTS as u64,
        "{stats:?}"
    );
}

#[test]
fn pinned_slots_keep_their_expert_while_prefetches_evict() {
    let pool = Pool::new();
    let cache = written_cache(&pool, "activation-aware");
    // A routing thread: every observation re-plans, dropping queued
    // prefetches and queueing new ones that evict unpinned slots.
    let fetched = hammer(&cache, &pool, |done| {
        let mut rng = Rng(7);
        cache.begin_requests(1).unwrap();
        while !done.load(Ordering::Acquire) {
            let (layer, experts) = pick(&mut rng);
            cache.observe(layer, &experts, PER_FETCH).unwrap();
            thread::yield_now();
        }
        cache.end_requests().unwrap();
    });
    // Let the planner thread finish its last plan. Copies of prefetches
    // may still run: their slots are never pinned, so they do not count.
    cache.eamc_len().unwrap();
    check_settled(&cache, fetched);
    assert!(
        cache.stats().prefetch_copies > 0,
        "no prefetch ran: {:?}",
        cache.stats()
    );
}

// ---------------------------------------------------------------------------
// PrefetchQueue: producers, consumers and a re-planning thread at once.

const PRODUCERS: u32 = 4;
const PER_PRODUCER: u32 = 4000;

/// Prefetches scored this high stay in every plan.
const KEPT: f32 = 10.0;

/// Request `i` of producer `p`: every third on demand, the rest prefetches.
fn request(p: u32, i: u32) -> CopyRequest {
    let urgency = if i % 3 == 0 {
        Urgency::OnDemand
    } else {
        Urgency::Prefetch((i % 13) as f32)
    };
    CopyRequest {
        expert: p * PER_PRODUCER + i,
        slot: None,
        urgency,
    }
}

fn origin(r: &CopyRequest) -> (u32, u32) {
    (r.expert / PER_PRODUCER, r.expert % PER_PRODUCER)
}

/// What one consumer popped, in order: its view of the queue's order.
fn check_order(delivered: &[CopyRequest]) {
    let mut last_demand: HashMap<u32, u32> = HashMap::new();
    let mut last_prefetch: HashMap<u32, u32> = HashMap::new();
    for r in delivered {
        let (p, i) = origin(r);
        match r.urgency {
            Urgency::OnDemand => {
                if let Some(&j) = last_demand.get(&p) {
                    assert!(j < i, "on-demand {i} of producer {p} came after {j}");
                }
                // Producer p pushed i before any later prefetch: once such
                // a prefetch is popped, i cannot still have been queued.
                if let Some(&j) = last_prefetch.get(&p) {
                    assert!(
                        j < i,
                        "on-demand {i} of producer {p} came after its later prefetch {j}"
                    );
                }
                last_demand.insert(p, i);
            }
            Urgency::Prefetch(_) => {
                let j = last_prefetch.entry(p).or_insert(i);
                *j = (*j).max(i);
            }
            Urgency::Stage | Urgency::Background => {
                unreachable!("nobody stages or runs on the CPU here")
            }
        }
    }
}

/// `n` consumers popping until the queue is closed and drained, once
/// `gate` opens; each sends what it got, in order. Detached threads, so
/// that one left blocked fails the test instead of hanging it.
fn consumers(
    queue: &Arc<PrefetchQueue>,
    n: usize,
    gate: &Arc<AtomicBool>,
) -> mpsc::Receiver<Vec<CopyRequest>> {
    let (results, received) = mpsc::channel();
    for _ in 0..n {
        let (queue, gate, results) = (Arc::clone(queue), Arc::clone(gate), results.clone());
        thread::spawn(move || {
            while !gate.load(Ordering::Acquire) {
                thread::yield_now();
            }
            let mut got = Vec::new();
            while let Some(r) = queue.pop() {
                got.push(r);
                // Slower than the producers, so the queue fills up and the
                // re-planner finds something to drop.
                (0..50).for_each(|_| std::hint::spin_loop());
            }
            let _ = results.send(got);
        });
    }
    received
}

/// Closes the queue and collects what each of `n` consumers got.
fn close_and_collect(
    queue: &PrefetchQueue,
    received: &mpsc::Receiver<Vec<CopyRequest>>,
    n: usize,
) -> Vec<Vec<CopyRequest>> {
    queue.close();
    (0..n)
        .map(|_| {
            received
                .recv_timeout(HANG)
                .expect("close() left a consumer blocked in pop()")
        })
        .collect()
}

fn replan_while_pushing(n_consumers: usize) {
    let queue = Arc::new(PrefetchQueue::new());
    let producing = AtomicBool::new(true);
    // Consumers are held back until the first re-plan dropped something,
    // so that every run exercises removal, however it is scheduled.
    let dropped = Arc::new(AtomicBool::new(false));
    let start = Barrier::new(PRODUCERS as usize + 1);
    let received = consumers(&queue, n_consumers, &dropped);
    let removed = thread::scope(|s| {
        let replanner = s.spawn(|| {
            let mut removed = Vec::new();
            start.wait();
            let mut round = 0u32;
            // Until the producers are done, and at least once with effect
            // (unless removal is broken: then the check below fails).
            let mut after = 0;
            while producing.load(Ordering::Acquire) || (removed.is_empty() && after < 1000) {
                after += u32::from(!producing.load(Ordering::Acquire));
                // Drops half the stale prefetches each time, the other half
                // next time; the best ones (score >= KEPT) are never stale.
                removed.extend(queue.remove_if(|r| match r.urgency {
                    Urgency::Prefetch(score) => score < KEPT && r.expert % 2 == round % 2,
                    _ => false,
                }));
                dropped.store(!removed.is_empty(), Ordering::Release);
                round += 1;
                thread::yield_now();
            }
            dropped.store(true, Ordering::Release);
            removed
        });
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let (queue, start) = (&queue, &start);
                s.spawn(move || {
                    start.wait();
                    (0..PER_PRODUCER).for_each(|i| queue.push(request(p, i)));
                })
            })
            .collect();
        producers.into_iter().for_each(|p| p.join().unwrap());
        producing.store(false, Ordering::Release);
        replanner.join().unwrap()
    });
    // Every consumer is, or soon will be, blocked on an empty queue.
    let delivered = close_and_collect(&queue, &received, n_consumers);

    let mut seen = HashSet::new();
    for got in &delivered {
        check_order(got);
        for r in got {
            assert!(seen.insert(r.expert), "request {r:?} delivered twice");
        }
    }
    for r in &removed {
        assert!(
            matches!(r.urgency, Urgency::Prefetch(_)),
            "re-planning removed {r:?}"
        );
        assert!(
            !seen.contains(&r.expert),
            "request {r:?} was delivered and also removed"
        );
        assert!(seen.insert(r.expert), "request {r:?} removed twice");
    }
    let all: HashSet<u32> = (0..PRODUCERS * PER_PRODUCER).collect();
    assert_eq!(seen, all, "requests lost (neither delivered nor removed)");
    let delivered_prefetches = delivered
        .iter()
        .flatten()
        .filter(|r| matches!(r.urgency, Urgency::Prefetch(_)))
        .count();
    assert!(
        !removed.is_empty() && delivered_prefetches > 0,
        "the run must both drop and deliver prefetches ({} removed, {delivered_prefetches} delivered)",
        removed.len()
    );
}

#[test]
fn concurrent_replanning_delivers_or_removes_each_request_once_one_consumer() {
    replan_while_pushing(1);
}

#[test]
fn concurrent_replanning_delivers_or_removes_each_request_once_two_consumers() {
    replan_while_pushing(2);
}

#[test]
fn close_wakes_every_blocked_consumer() {
    let queue = Arc::new(PrefetchQueue::new());
    let received = consumers(&queue, 3, &Arc::new(AtomicBool::new(true)));
    // Not needed for correctness (a consumer that has not blocked yet sees
    // the queue closed when it gets there), but most will be blocked.
    thread::sleep(Duration::from_millis(10));
    for got in close_and_collect(&queue, &received, 3) {
        assert!(got.is_empty(), "popped {got:?} from an empty queue");
    }
}

// ---------------------------------------------------------------------------
// HostCache: loaders and readers of host slots from several threads.

const HOST_SLOTS: usize = 3;
const HOST_SLOT_BYTES: usize = 4096;
const HOST_EXPERTS: u32 = 10;
const HOST_ROUNDS: usize = 1500;
/// More threads than slots: `acquire` waits while every slot is pinned; a
/// thread holds one slot at a time, so the waits always end.
const HOST_THREADS: usize = HOST_SLOTS + 1;

fn host_blob(id: u32) -> Vec<u8> {
    (0..HOST_SLOT_BYTES)
        .map(|i| (i as u32 * 5 + id * 29) as u8)
        .collect()
}

fn host_check(cache: &HostCache, slot: u32, id: u32, when: &str) -> Result<(), String> {
    let mut seen = vec![0u8; HOST_SLOT_BYTES];
    // SAFETY: `ptr(slot)` starts a slot of HOST_SLOT_BYTES inside the
    // cache's allocation; the caller holds a pin on it in state Ready, so
    // nobody writes it (the invariant under test).
    unsafe { std::ptr::copy_nonoverlapping(cache.ptr(slot), seen.as_mut_ptr(), HOST_SLOT_BYTES) };
    if seen == host_blob(id) {
        Ok(())
    } else {
        Err(format!(
            "host slot {slot} no longer holds expert {id} {when}"
        ))
    }
}

/// `HOST_THREADS` threads acquire, read, pause, read again and release
/// host slots; returns the cache and how many acquires they made.
fn host_cache_under_load() -> (HostCache, u64) {
    let cache = HostCache::new(HOST_SLOTS, HOST_SLOT_BYTES, HOST_EXPERTS as usize, None).unwrap();
    thread::scope(|s| {
        for t in 0..HOST_THREADS {
            let cache = &cache;
            s.spawn(move || {
                let mut rng = Rng(0x5eed + t as u64);
                for round in 0..HOST_ROUNDS {
                    let id = rng.next(HOST_EXPERTS);
                    let slot = match cache.acquire(id).unwrap() {
                        Acquired::Load(slot) => {
                            let bytes = host_blob(id);
                            // SAFETY: the slot is reserved for this loader
                            // until finish_load; it is HOST_SLOT_BYTES long.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    bytes.as_ptr(),
                                    cache.ptr(slot),
                                    bytes.len(),
                                )
                            };
                            cache.finish_load(slot, Ok(()), bytes.len() as u64, 0.0);
                            slot
                        }
                        Acquired::Ready(slot) => slot,
                    };
                    let first = host_check(cache, slot, id, "right after acquire");
                    pause(round);
                    let second = host_check(cache, slot, id, "just before release");
                    // Released before failing: a pin left behind could
                    // block the other threads' acquires for ever.
                    cache.release(slot);
                    if let Err(failure) = first.and(second) {
                        panic!("round {round}: {failure}");
                    }
                }
            });
        }
    });
    (cache, (HOST_THREADS * HOST_ROUNDS) as u64)
}

#[test]
fn pinned_host_slots_keep_their_expert_while_other_threads_load() {
    let (cache, _) = host_cache_under_load();
    assert!(cache.stats().evictions > 0, "{:?}", cache.stats());
    // Every slot was given back: each can be reserved for a new expert.
    let absent: Vec<u32> = (0..HOST_EXPERTS)
        .filter(|&id| !cache.contains(id))
        .collect();
    let reserved: HashSet<u32> = absent
        .iter()
        .take(HOST_SLOTS)
        .map(|&id| cache.try_reserve(id).expect("a slot left pinned"))
        .collect();
    assert_eq!(reserved.len(), HOST_SLOTS);
}

#[test]
fn host_cache_counts_each_acquire_once_as_hit_or_miss() {
    let (cache, acquires) = host_cache_under_load();
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.misses, acquires, "{stats:?}");
}
