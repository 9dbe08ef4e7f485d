//! The prefetch queue: copy requests ordered on-demand first, then by
//! prefetch priority (highest first), then first come first served. Copy
//! workers block on it; planners replace its stale part.
//!
//! One mutex guards a binary heap; every critical section is a heap
//! operation or a linear filter over the queued requests, never I/O.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::layout::ExpertId;
use crate::tiers::device::SlotId;

/// How urgent a copy is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Urgency {
    /// A layer is waiting for this expert now.
    OnDemand,
    /// Predicted to be needed; higher scores are copied first.
    Prefetch(f32),
    /// Just run on the CPU: copied, after every prefetch, when the policy
    /// would keep it (see `CacheCore::place`); replanning leaves these alone.
    Background,
    /// Read from the expert store into the host cache only (preloading),
    /// after everything else; replanning leaves these alone.
    Stage,
}

/// Copy `expert`'s blob from the host tier into a slot: the one reserved at
/// request time (on demand), or one chosen when a worker takes the request
/// (prefetch), so a prefetch that a new plan drops never evicted anything.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CopyRequest {
    pub expert: ExpertId,
    pub slot: Option<SlotId>,
    pub urgency: Urgency,
}

struct Entry {
    request: CopyRequest,
    seq: u64,
}

impl Entry {
    fn rank(&self) -> (bool, f32) {
        match self.request.urgency {
            Urgency::OnDemand => (true, f32::INFINITY),
            Urgency::Prefetch(score) => (false, score),
            // Below every prefetch (scores are finite), above staging.
            Urgency::Background => (false, f32::MIN),
            Urgency::Stage => (false, f32::NEG_INFINITY),
        }
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a_demand, a_score) = self.rank();
        let (b_demand, b_score) = other.rank();
        a_demand
            .cmp(&b_demand)
            .then(a_score.total_cmp(&b_score))
            // Earlier requests first among equals: a smaller seq ranks higher.
            .then(other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}

impl Eq for Entry {}

struct State {
    heap: BinaryHeap<Entry>,
    next_seq: u64,
    closed: bool,
}

/// A blocking priority queue of copy requests.
pub struct PrefetchQueue {
    state: Mutex<State>,
    nonempty: Condvar,
}

impl Default for PrefetchQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl PrefetchQueue {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                heap: BinaryHeap::new(),
                next_seq: 0,
                closed: false,
            }),
            nonempty: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-operation left a heap that is still
        // well-formed (BinaryHeap operations do not unwind halfway).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, request: CopyRequest) {
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.heap.push(Entry { request, seq });
        drop(state);
        self.nonempty.notify_one();
    }

    /// The most urgent request, waiting for one; `None` once closed.
    pub fn pop(&self) -> Option<CopyRequest> {
        let mut state = self.lock();
        loop {
            if let Some(entry) = state.heap.pop() {
                return Some(entry.request);
            }
            if state.closed {
                return None;
            }
            state = self.nonempty.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The most urgent request, if any, without waiting.
    pub fn try_pop(&self) -> Option<CopyRequest> {
        self.lock().heap.pop().map(|e| e.request)
    }

    /// Removes and returns every queued request that `stale` selects (a
    /// planner replacing its old plan). Requests already popped by a worker
    /// are not affected.
    pub fn remove_if(&self, mut stale: impl FnMut(&CopyRequest) -> bool) -> Vec<CopyRequest> {
        let mut state = self.lock();
        let mut removed = Vec::new();
        state.heap.retain(|e| {
            let drop_it = stale(&e.request);
            if drop_it {
                removed.push(e.request);
            }
            !drop_it
        });
        removed
    }

    /// Raises a queued request for `expert` to on-demand. Returns whether
    /// one was queued.
    pub fn promote(&self, expert: ExpertId) -> bool {
        let mut state = self.lock();
        let mut found = None;
        state.heap.retain(|e| {
            if e.request.expert == expert && found.is_none() {
                found = Some(e.request);
                false
            } else {
                true
            }
        });
        let Some(mut request) = found else {
            return false;
        };
        request.urgency = Urgency::OnDemand;
        let seq = state.next_seq;
        state.next_seq += 1;
        state.heap.push(Entry { request, seq });
        true
    }

    pub fn len(&self) -> usize {
        self.lock().heap.len()
    }

    /// Queued requests that `selected` selects.
    pub fn count_if(&self, mut selected: impl FnMut(&CopyRequest) -> bool) -> usize {
        self.lock()
            .heap
            .iter()
            .filter(|e| selected(&e.request))
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every waiting worker; `pop` returns `None` once drained.
    pub fn close(&self) {
        self.lock().closed = true;
        self.nonempty.notify_all();
    }
}

/// Pushes `per_producer` requests from each of `producers` threads (every
/// third on demand, the rest prefetches of varying priority) while
/// `consumers` threads pop until the queue is closed and drained; returns
/// the experts each consumer received. The load behind the concurrency
/// test and the throughput benchmark.
pub fn exercise(producers: u32, consumers: usize, per_producer: u32) -> Vec<Vec<ExpertId>> {
    let queue = std::sync::Arc::new(PrefetchQueue::new());
    let consumers: Vec<_> = (0..consumers)
        .map(|_| {
            let queue = std::sync::Arc::clone(&queue);
            std::thread::spawn(move || {
                std::iter::from_fn(|| queue.pop())
                    .map(|r| r.expert)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let producers: Vec<_> = (0..producers)
        .map(|p| {
            let queue = std::sync::Arc::clone(&queue);
            std::thread::spawn(move || {
                for i in 0..per_producer {
                    let expert = p * per_producer + i;
                    let urgency = if i % 3 == 0 {
                        Urgency::OnDemand
                    } else {
                        Urgency::Prefetch((i % 17) as f32)
                    };
                    queue.push(CopyRequest {
                        expert,
                        slot: None,
                        urgency,
                    });
                    if i % 101 == 0 {
                        // Re-planning concurrently loses nothing it does not remove.
                        queue.promote(expert);
                    }
                }
            })
        })
        .collect();
    for p in producers {
        p.join().expect("a producer panicked");
    }
    queue.close();
    consumers
        .into_iter()
        .map(|c| c.join().expect("a consumer panicked"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::thread;

    fn prefetch(expert: ExpertId, score: f32) -> CopyRequest {
        CopyRequest {
            expert,
            slot: None,
            urgency: Urgency::Prefetch(score),
        }
    }

    fn on_demand(expert: ExpertId) -> CopyRequest {
        CopyRequest {
            expert,
            slot: Some(expert),
            urgency: Urgency::OnDemand,
        }
    }

    fn drain(queue: &PrefetchQueue) -> Vec<ExpertId> {
        std::iter::from_fn(|| queue.try_pop())
            .map(|r| r.expert)
            .collect()
    }

    #[test]
    fn on_demand_first_then_priority_then_fifo() {
        let queue = PrefetchQueue::new();
        queue.push(CopyRequest {
            expert: 7,
            slot: None,
            urgency: Urgency::Stage,
        });
        queue.push(prefetch(1, 0.5));
        queue.push(prefetch(2, 0.9));
        queue.push(on_demand(3));
        queue.push(prefetch(4, 0.5));
        queue.push(on_demand(5));
        queue.push(prefetch(6, 0.1));
        assert_eq!(drain(&queue), vec![3, 5, 2, 1, 4, 6, 7]);
    }

    #[test]
    fn replanning_removes_only_the_stale_part() {
        let queue = PrefetchQueue::new();
        for e in 0..6 {
            queue.push(prefetch(e, e as f32));
        }
        queue.push(on_demand(9));
        let removed =
            queue.remove_if(|r| matches!(r.urgency, Urgency::Prefetch(_)) && r.expert % 2 == 0);
        let mut removed: Vec<_> = removed.iter().map(|r| r.expert).collect();
        removed.sort();
        assert_eq!(removed, vec![0, 2, 4]);
        assert_eq!(drain(&queue), vec![9, 5, 3, 1]);
    }

    #[test]
    fn promote_moves_a_prefetch_to_the_front() {
        let queue = PrefetchQueue::new();
        queue.push(prefetch(1, 0.9));
        queue.push(prefetch(2, 0.1));
        assert!(queue.promote(2));
        assert!(!queue.promote(7));
        assert_eq!(drain(&queue), vec![2, 1]);
    }

    #[test]
    fn close_wakes_blocked_workers() {
        let queue = Arc::new(PrefetchQueue::new());
        let worker = {
            let queue = Arc::clone(&queue);
            thread::spawn(move || queue.pop())
        };
        thread::sleep(std::time::Duration::from_millis(20));
        queue.close();
        assert_eq!(worker.join().unwrap(), None);
    }

    #[test]
    fn no_request_is_lost_or_duplicated_under_concurrency() {
        const PRODUCERS: u32 = 4;
        const PER_PRODUCER: u32 = 5_000;
        let mut seen = HashSet::new();
        let mut total = 0;
        for received in exercise(PRODUCERS, 4, PER_PRODUCER) {
            for id in received {
                assert!(seen.insert(id), "request {id} delivered twice");
                total += 1;
            }
        }
        assert_eq!(total, (PRODUCERS * PER_PRODUCER) as usize, "requests lost");
    }
}
