//! [`PlanningThread`]: tracing, EAMC matching and prefetch planning off the
//! model's thread. A MoE layer hands its routing over and goes on to fetch
//! its experts; this thread traces every routing into the live requests'
//! activation matrices, then plans once for the newest layer it has seen
//! (a backlog of layers is traced in full but planned once, so it cannot
//! fall behind) and passes the plan to the cache.

use std::collections::HashSet;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::live::{check_batch, check_layout, check_rows, unknown_key, LiveTracer, RequestKey};
use crate::cache::core::Gated;
use crate::error::{CoreError, Result};
use crate::layout::ExpertId;
use crate::planner::Timing;

/// What the model's thread tells the planner thread, in order.
enum Event {
    Begin(usize),
    End,
    Layout(Vec<RequestKey>, Vec<usize>),
    ClearLayout,
    EndKey(RequestKey),
    Observe {
        layer: usize,
        ids: Vec<u32>,
        top_k: usize,
        timing: Option<Timing>,
    },
    /// Router lookahead at `layer` for the `depth` layers after it.
    Lookahead {
        layer: usize,
        ids: Vec<u32>,
        top_k: usize,
        depth: usize,
    },
    /// Answered once every earlier event is processed.
    Flush(Sender<()>),
}

/// Receives each plan: retention scores and prefetch candidates, best first.
pub type ApplyPlan = Box<dyn FnMut(&[f32], &[(ExpertId, f32)], Option<Gated<'_>>) + Send>;

pub struct PlanningThread {
    sender: Option<Sender<Event>>,
    handle: Option<JoinHandle<()>>,
    tracer: Arc<Mutex<LiveTracer>>,
    /// The first error the thread met, reported by the next call.
    failure: Arc<Mutex<Option<String>>>,
    /// Bytes one live request takes, to check a batch before it is sent.
    request_bytes: usize,
    /// What the planner thread will know once it catches up, kept here so
    /// that a bad key or row count is refused on the caller's thread (an
    /// error on the planner thread would stop all tracing).
    keyed: Mutex<KeyedState>,
}

#[derive(Default)]
struct KeyedState {
    live: HashSet<RequestKey>,
    /// The current layout's rows in all; `None` when there is none.
    rows: Option<usize>,
    /// Requests of the plain batch.
    plain: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl PlanningThread {
    /// Traces every routing; with `apply`, also plans after each batch of
    /// them and hands the plan over (without, it only traces: nothing to
    /// plan when every expert has a device slot).
    pub fn spawn(tracer: LiveTracer, apply: Option<ApplyPlan>) -> Result<Self> {
        let request_bytes = tracer.request_bytes();
        let (sender, events) = channel();
        let tracer = Arc::new(Mutex::new(tracer));
        let failure = Arc::new(Mutex::new(None));
        let handle = {
            let (tracer, failure) = (Arc::clone(&tracer), Arc::clone(&failure));
            std::thread::Builder::new()
                .name("moe-offload-planner".into())
                .spawn(move || serve(&events, &tracer, &failure, apply))
                .map_err(|e| CoreError::InvalidConfig(format!("cannot start the planner: {e}")))?
        };
        Ok(Self {
            sender: Some(sender),
            handle: Some(handle),
            tracer,
            failure,
            request_bytes,
            keyed: Mutex::new(KeyedState::default()),
        })
    }

    fn send(&self, event: Event) -> Result<()> {
        if let Some(reason) = lock(&self.failure).as_ref() {
            return Err(CoreError::Protocol(format!(
                "request tracing failed: {reason}"
            )));
        }
        self.sender
            .as_ref()
            .and_then(|s| s.send(event).ok())
            .ok_or_else(|| CoreError::Protocol("the planner thread has stopped".into()))
    }

    /// Starts `n` requests; a batch too large to trace is refused here, on
    /// the caller's thread, and the live requests go on.
    pub fn begin_requests(&self, n: usize) -> Result<()> {
        let mut keyed = lock(&self.keyed);
        check_batch(n + keyed.live.len(), self.request_bytes)?;
        self.send(Event::Begin(n))?;
        keyed.rows = None;
        keyed.plain = n.max(1);
        Ok(())
    }

    /// The next passes' rows belong, in order, to the requests `keys`
    /// (`rows[i]` rows each); a key not live yet begins a request.
    pub fn set_layout(&self, keys: &[RequestKey], rows: &[usize]) -> Result<()> {
        check_layout(keys, rows)?;
        let mut keyed = lock(&self.keyed);
        let new = keys.iter().filter(|k| !keyed.live.contains(k)).count();
        check_batch(keyed.plain + keyed.live.len() + new, self.request_bytes)?;
        self.send(Event::Layout(keys.to_vec(), rows.to_vec()))?;
        keyed.live.extend(keys);
        keyed.rows = Some(rows.iter().sum());
        Ok(())
    }

    /// Back to splitting rows among the plain batch's requests.
    pub fn clear_layout(&self) -> Result<()> {
        let mut keyed = lock(&self.keyed);
        self.send(Event::ClearLayout)?;
        keyed.rows = None;
        Ok(())
    }

    /// The keyed request finished: its activation matrix joins the EAMC.
    pub fn end_request(&self, key: RequestKey) -> Result<()> {
        let mut keyed = lock(&self.keyed);
        if !keyed.live.contains(&key) {
            return Err(unknown_key(key));
        }
        self.send(Event::EndKey(key))?;
        keyed.live.remove(&key);
        Ok(())
    }

    pub fn end_requests(&self) -> Result<()> {
        let mut keyed = lock(&self.keyed);
        self.send(Event::End)?;
        keyed.plain = 0;
        Ok(())
    }

    /// Hands one layer's routing over (its ids checked by the caller; its
    /// row count against the layout here).
    pub fn observe(
        &self,
        layer: usize,
        ids: Vec<u32>,
        top_k: usize,
        timing: Option<Timing>,
    ) -> Result<()> {
        if let (Some(rows), true) = (lock(&self.keyed).rows, top_k > 0) {
            check_rows(rows, ids.len() / top_k, layer)?;
        }
        self.send(Event::Observe {
            layer,
            ids,
            top_k,
            timing,
        })
    }

    /// Hands a router lookahead over: `depth` blocks of token rows for the
    /// layers after `layer` (ids checked by the caller; the row count
    /// against the layout here). Send it before the layer's routing, so
    /// that the plan after that routing uses it.
    pub fn lookahead(&self, layer: usize, ids: Vec<u32>, top_k: usize, depth: usize) -> Result<()> {
        if let (Some(rows), true) = (lock(&self.keyed).rows, top_k > 0 && depth > 0) {
            check_rows(rows, ids.len() / top_k / depth, layer)?;
        }
        self.send(Event::Lookahead {
            layer,
            ids,
            top_k,
            depth,
        })
    }

    /// The tracer once every event sent so far is processed.
    pub fn settled(&self) -> Result<MutexGuard<'_, LiveTracer>> {
        let (reply, done) = channel();
        self.send(Event::Flush(reply))?;
        done.recv()
            .map_err(|_| CoreError::Protocol("the planner thread has stopped".into()))?;
        if let Some(reason) = lock(&self.failure).as_ref() {
            return Err(CoreError::Protocol(format!(
                "request tracing failed: {reason}"
            )));
        }
        Ok(lock(&self.tracer))
    }
}

impl Drop for PlanningThread {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn serve(
    events: &Receiver<Event>,
    tracer: &Mutex<LiveTracer>,
    failure: &Mutex<Option<String>>,
    mut apply: Option<ApplyPlan>,
) {
    while let Ok(first) = events.recv() {
        let mut tracer = lock(tracer);
        let mut newest = None;
        let mut flushes = Vec::new();
        for event in std::iter::once(first).chain(events.try_iter()) {
            let outcome = match event {
                Event::Begin(n) => {
                    newest = None;
                    tracer.begin_requests(n)
                }
                Event::End => {
                    newest = None;
                    tracer.end_requests()
                }
                Event::Layout(keys, rows) => tracer.set_layout(&keys, &rows),
                Event::ClearLayout => {
                    tracer.clear_layout();
                    Ok(())
                }
                Event::EndKey(key) => tracer.end_request(key),
                Event::Observe {
                    layer,
                    ids,
                    top_k,
                    timing,
                } => {
                    if let Some(timing) = timing {
                        tracer.set_timing(timing);
                    }
                    newest = Some(layer);
                    tracer.record(layer, &ids, top_k)
                }
                Event::Lookahead {
                    layer,
                    ids,
                    top_k,
                    depth,
                } => tracer.lookahead(layer, &ids, top_k, depth),
                Event::Flush(reply) => {
                    flushes.push(reply);
                    Ok(())
                }
            };
            if let Err(e) = outcome {
                lock(failure).get_or_insert(e.to_string());
            }
        }
        if let (Some(layer), Some(apply)) = (newest, apply.as_mut()) {
            let prefetch = tracer.plan(layer).1;
            let planner = tracer.planner();
            // With measured timing the core weighs each prefetch as the lab does.
            let gated = planner.timing().map(|t| Gated {
                gate: t.gate(),
                use_probability: planner.use_probability(),
            });
            apply(planner.scores(), &prefetch, gated);
        }
        drop(tracer);
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::{Planner, PlannerConfig};

    #[test]
    fn every_routing_is_traced_in_order_and_plans_reach_the_cache() {
        let planner = Planner::new(2, 4, PlannerConfig::default()).unwrap();
        let plans = Arc::new(Mutex::new(0usize));
        let counted = Arc::clone(&plans);
        let thread = PlanningThread::spawn(
            LiveTracer::new(planner),
            Some(Box::new(move |scores, _, _| {
                assert_eq!(scores.len(), 8);
                *lock(&counted) += 1;
            })),
        )
        .unwrap();
        for request in 0..3u32 {
            thread.begin_requests(1).unwrap();
            for _token in 0..5 {
                thread.observe(0, vec![request, 3], 2, None).unwrap();
                thread.observe(1, vec![request], 1, None).unwrap();
            }
        }
        // The batch that holds the last routing is planned before the flush
        // is answered.
        drop(thread.settled().unwrap());
        assert!(*lock(&plans) >= 1);
        thread.end_requests().unwrap();
        let tracer = thread.settled().unwrap();
        let eamc = tracer.planner().collection();
        assert_eq!(eamc.len(), 3);
        for request in 0..3 {
            let counts = eamc.entry(request);
            assert_eq!(counts.get(0, request), 5);
            assert_eq!(counts.get(0, 3), 5);
            assert_eq!(counts.get(1, request), 5);
        }
    }

    #[test]
    fn a_failure_is_reported_by_the_next_call() {
        let planner = Planner::new(1, 4, PlannerConfig::default()).unwrap();
        let thread = PlanningThread::spawn(LiveTracer::new(planner), None).unwrap();
        // Three ids do not split into rows of two.
        thread.observe(0, vec![0, 1, 2], 2, None).unwrap();
        let error = thread.settled().err().expect("the bad routing is reported");
        assert!(error.to_string().contains("top_k = 2"), "{error}");
        assert!(thread.begin_requests(1).is_err());
    }

    #[test]
    fn a_batch_too_large_to_trace_is_refused_and_tracing_goes_on() {
        let planner = Planner::new(1, 4, PlannerConfig::default()).unwrap();
        let thread = PlanningThread::spawn(LiveTracer::new(planner), None).unwrap();
        for n in [usize::MAX, 10_000_000_000] {
            let error = thread.begin_requests(n).unwrap_err().to_string();
            assert!(error.contains("use smaller batches"), "{error}");
        }
        thread.begin_requests(2).unwrap();
        thread.observe(0, vec![1, 3], 1, None).unwrap();
        thread.end_requests().unwrap();
        assert_eq!(thread.settled().unwrap().planner().collection().len(), 2);
    }

    #[test]
    fn keyed_requests_are_traced_by_the_layout_across_passes() {
        let planner = Planner::new(1, 4, PlannerConfig::default()).unwrap();
        let thread = PlanningThread::spawn(LiveTracer::new(planner), None).unwrap();
        thread.set_layout(&[10, 20], &[1, 2]).unwrap();
        thread.observe(0, vec![0, 1, 1], 1, None).unwrap();
        thread.set_layout(&[20, 30], &[1, 1]).unwrap();
        thread.observe(0, vec![1, 3], 1, None).unwrap();
        thread.end_request(20).unwrap();
        thread.end_request(10).unwrap();
        thread.end_request(30).unwrap();
        let tracer = thread.settled().unwrap();
        let eamc = tracer.planner().collection();
        let entries: Vec<_> = (0..eamc.len())
            .map(|i| eamc.entry(i).counts().to_vec())
            .collect();
        assert_eq!(
            entries,
            vec![vec![0, 3, 0, 0], vec![1, 0, 0, 0], vec![0, 0, 0, 1]]
        );
    }

    #[test]
    fn a_lookahead_is_scored_once_its_layer_routes_and_bad_rows_are_refused_at_once() {
        let planner = Planner::new(3, 4, PlannerConfig::default()).unwrap();
        let thread = PlanningThread::spawn(LiveTracer::new(planner), None).unwrap();
        thread.set_layout(&[1], &[2]).unwrap();
        let error = thread
            .lookahead(0, vec![0, 1, 2, 3], 1, 1)
            .unwrap_err()
            .to_string();
        assert!(error.contains("gives out 2 token rows"), "{error}");
        thread.lookahead(0, vec![0, 1, 2, 3], 1, 2).unwrap();
        for (layer, ids) in [(0, vec![3, 3]), (1, vec![0, 1]), (2, vec![2, 0])] {
            thread.observe(layer, ids, 1, None).unwrap();
        }
        let tracer = thread.settled().unwrap();
        let scored: Vec<_> = tracer
            .lookahead_counts()
            .into_iter()
            .map(|(key, c)| (key, c.hits, c.token_hits))
            .collect();
        assert_eq!(scored, vec![((1, 1), 2, 2), ((2, 2), 1, 1)]);
    }

    #[test]
    fn bad_keys_and_row_counts_are_refused_at_once_and_tracing_goes_on() {
        let planner = Planner::new(2, 4, PlannerConfig::default()).unwrap();
        let thread = PlanningThread::spawn(LiveTracer::new(planner), None).unwrap();
        let error = thread.end_request(4).unwrap_err().to_string();
        assert!(error.contains("request key 4 is not live"), "{error}");
        thread.set_layout(&[4], &[2]).unwrap();
        let error = thread
            .observe(1, vec![0, 1, 2], 1, None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("gives out 2 token rows"), "{error}");
        assert!(error.contains("layer 1's routing has 3"), "{error}");
        assert!(thread.set_layout(&[5, 5], &[1, 1]).is_err());
        // None of those reached the planner thread: tracing goes on.
        thread.observe(0, vec![0, 1], 1, None).unwrap();
        thread.end_request(4).unwrap();
        assert!(thread.end_request(4).is_err());
        // A plain batch after the layout splits rows equally again.
        thread.begin_requests(1).unwrap();
        thread.observe(0, vec![2, 2, 2], 1, None).unwrap();
        thread.end_requests().unwrap();
        assert_eq!(thread.settled().unwrap().planner().collection().len(), 2);
    }
}
