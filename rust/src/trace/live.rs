//! [`LiveTracer`]: the requests a patched model is serving now, each with
//! its activation matrix, fed to the planner as the model routes tokens.
//!
//! Requests come two ways. A plain batch (`begin_requests(n)`) holds one
//! request per sequence, its rows split equally, and ends when the next
//! batch begins. Under continuous batching each pass packs the rows of
//! several requests one after another, and requests join and leave between
//! passes: those are *keyed* (`set_layout`), live from the first pass that
//! names them until `end_request`, so their matching follows them across
//! passes.

use std::collections::{HashMap, HashSet};

use super::sizing;
use crate::error::{CoreError, Result};
use crate::planner::{Plan, Planner, RequestId, Timing};

/// A keyed request, as the caller names it.
pub type RequestKey = u64;

pub struct LiveTracer {
    planner: Planner,
    /// The plain batch's requests, one per sequence.
    live: Vec<RequestId>,
    keyed: HashMap<RequestKey, RequestId>,
    /// The current pass's rows, in order: each keyed request's row count.
    /// `None`: rows are split equally among the plain batch's requests.
    layout: Option<Vec<(RequestKey, usize)>>,
}

impl LiveTracer {
    pub fn new(planner: Planner) -> Self {
        Self {
            planner,
            live: Vec::new(),
            keyed: HashMap::new(),
            layout: None,
        }
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Bytes one live request takes: its matcher's two floats per EAMC
    /// entry, and its activation counts and recent activations (L×E each).
    pub fn request_bytes(&self) -> usize {
        let eamc = self.planner.collection();
        let cells = eamc.layers() * eamc.experts();
        (2 * eamc.capacity() + 2 * cells) * 4 + eamc.layers()
    }

    pub fn set_timing(&mut self, timing: Timing) {
        self.planner.set_timing(timing);
    }

    /// Ends the plain batch's requests (their matrices join the EAMC) and
    /// starts `n` new ones: one per sequence of the batch, which the next
    /// passes' rows are split among. Keyed requests stay live.
    pub fn begin_requests(&mut self, n: usize) -> Result<()> {
        check_batch(n + self.keyed.len(), self.request_bytes())?;
        self.end_requests()?;
        self.layout = None;
        self.live = (0..n.max(1))
            .map(|_| self.planner.begin_request())
            .collect();
        Ok(())
    }

    /// Ends the plain batch's requests; keyed ones end by `end_request`.
    pub fn end_requests(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.live) {
            self.planner.end_request(id)?;
        }
        Ok(())
    }

    /// Requests live now, plain and keyed.
    pub fn live_requests(&self) -> usize {
        self.live.len() + self.keyed.len()
    }

    /// The next passes' rows belong, in order, to the requests `keys`
    /// (`rows[i]` rows each); a key not live yet begins a request.
    pub fn set_layout(&mut self, keys: &[RequestKey], rows: &[usize]) -> Result<()> {
        check_layout(keys, rows)?;
        let new = keys.iter().filter(|k| !self.keyed.contains_key(k)).count();
        check_batch(self.live_requests() + new, self.request_bytes())?;
        for &key in keys {
            if !self.keyed.contains_key(&key) {
                let id = self.planner.begin_request();
                self.keyed.insert(key, id);
            }
        }
        self.layout = Some(keys.iter().copied().zip(rows.iter().copied()).collect());
        Ok(())
    }

    /// Back to splitting rows among the plain batch's requests.
    pub fn clear_layout(&mut self) {
        self.layout = None;
    }

    /// The keyed request finished: its activation matrix joins the EAMC.
    /// Rows the current layout still gives it are not traced.
    pub fn end_request(&mut self, key: RequestKey) -> Result<()> {
        let id = self.keyed.remove(&key).ok_or_else(|| unknown_key(key))?;
        self.planner.end_request(id)
    }

    /// One MoE layer's routing for the whole batch: `ids` holds `top_k` ids
    /// per token row, rows grouped by sequence (batch-major, as the model
    /// flattens them), traced into each live request.
    pub fn record(&mut self, layer: usize, ids: &[u32], top_k: usize) -> Result<()> {
        if top_k == 0 || ids.len() % top_k != 0 {
            return Err(CoreError::Protocol(format!(
                "{} routing ids do not split into rows of top_k = {top_k}",
                ids.len()
            )));
        }
        if let Some(layout) = &self.layout {
            return record_keyed(&mut self.planner, &self.keyed, layout, layer, ids, top_k);
        }
        if self.live.is_empty() {
            self.begin_requests(1)?;
        }
        let rows = ids.len() / top_k;
        // A row count the batch does not divide means the batch changed
        // without a new request being announced: trace it as one request.
        if rows % self.live.len() != 0 {
            self.begin_requests(1)?;
        }
        let per_request = rows / self.live.len();
        for (i, &request) in self.live.iter().enumerate() {
            let rows = &ids[i * per_request * top_k..(i + 1) * per_request * top_k];
            self.planner.observe_rows(request, layer, rows, top_k)?;
        }
        Ok(())
    }

    /// Retention scores and prefetch candidates for the layers after `layer`.
    pub fn plan(&mut self, layer: usize) -> Plan<'_> {
        self.planner.plan(layer)
    }
}

/// One layer's routing split by the layout's row counts. A request that
/// ended since the layout was set gives its rows up untraced.
fn record_keyed(
    planner: &mut Planner,
    keyed: &HashMap<RequestKey, RequestId>,
    layout: &[(RequestKey, usize)],
    layer: usize,
    ids: &[u32],
    top_k: usize,
) -> Result<()> {
    check_rows(
        layout.iter().map(|&(_, rows)| rows).sum(),
        ids.len() / top_k,
        layer,
    )?;
    let mut start = 0;
    for &(key, rows) in layout {
        let end = start + rows * top_k;
        if let (Some(&id), true) = (keyed.get(&key), rows > 0) {
            planner.observe_rows(id, layer, &ids[start..end], top_k)?;
        }
        start = end;
    }
    Ok(())
}

/// Checks a layout before anything follows it: one row count per key, each
/// key once.
pub fn check_layout(keys: &[RequestKey], rows: &[usize]) -> Result<()> {
    if keys.len() != rows.len() {
        return Err(CoreError::Protocol(format!(
            "a layout of {} request keys and {} row counts; give one row count per key",
            keys.len(),
            rows.len()
        )));
    }
    let mut seen = HashSet::with_capacity(keys.len());
    if let Some(key) = keys.iter().find(|&&k| !seen.insert(k)) {
        return Err(CoreError::Protocol(format!(
            "request key {key} appears twice in one layout; give each request's rows once, together"
        )));
    }
    Ok(())
}

/// Checks that a pass's routing has the rows its layout gives out.
pub fn check_rows(layout_rows: usize, routing_rows: usize, layer: usize) -> Result<()> {
    if layout_rows == routing_rows {
        return Ok(());
    }
    Err(CoreError::Protocol(format!(
        "the layout gives out {layout_rows} token rows but layer {layer}'s routing has \
         {routing_rows}; set the layout of each pass before it runs"
    )))
}

pub fn unknown_key(key: RequestKey) -> CoreError {
    CoreError::Protocol(format!(
        "request key {key} is not live: no layout named it, or it has ended already"
    ))
}

/// Checks that a batch of `n` requests of `request_bytes` each fits the
/// memory the tracing may use, before any of them is allocated.
pub fn check_batch(n: usize, request_bytes: usize) -> Result<()> {
    let what = format!("tracing a batch of {n} requests");
    sizing::check_fits(
        &what,
        sizing::bytes_of(n, request_bytes),
        sizing::memory_limit(),
    )
    .map_err(|reason| CoreError::InvalidConfig(format!("{reason}; use smaller batches")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::PlannerConfig;

    fn tracer(layers: usize, experts: usize) -> LiveTracer {
        LiveTracer::new(Planner::new(layers, experts, PlannerConfig::default()).unwrap())
    }

    fn entries(tracer: &LiveTracer) -> Vec<Vec<u32>> {
        let eamc = tracer.planner().collection();
        (0..eamc.len())
            .map(|i| eamc.entry(i).counts().to_vec())
            .collect()
    }

    #[test]
    fn keyed_requests_follow_their_keys_across_passes() {
        let mut t = tracer(1, 4);
        // Prefill: request 7 has two rows, request 9 one (top-1).
        t.set_layout(&[7, 9], &[2, 1]).unwrap();
        t.record(0, &[0, 1, 3], 1).unwrap();
        // Request 5 joins and goes first; 7 and 9 decode one row each.
        t.set_layout(&[5, 7, 9], &[3, 1, 1]).unwrap();
        t.record(0, &[2, 2, 2, 1, 3], 1).unwrap();
        assert_eq!(t.live_requests(), 3);
        t.end_request(9).unwrap();
        t.set_layout(&[7, 5], &[1, 1]).unwrap();
        t.record(0, &[0, 2], 1).unwrap();
        t.end_request(7).unwrap();
        t.end_request(5).unwrap();
        assert_eq!(t.live_requests(), 0);
        // Entries in the order the requests ended: 9, 7, 5.
        assert_eq!(
            entries(&t),
            vec![vec![0, 0, 0, 2], vec![2, 2, 0, 0], vec![0, 0, 4, 0]]
        );
    }

    #[test]
    fn plain_batches_and_keyed_requests_do_not_end_each_other() {
        let mut t = tracer(1, 4);
        t.set_layout(&[1], &[1]).unwrap();
        t.record(0, &[3], 1).unwrap();
        // A plain batch of two in between: split equally, as before.
        t.begin_requests(2).unwrap();
        t.record(0, &[0, 0, 1, 1], 1).unwrap();
        t.end_requests().unwrap();
        assert_eq!(t.live_requests(), 1);
        t.set_layout(&[1], &[1]).unwrap();
        t.record(0, &[3], 1).unwrap();
        t.end_request(1).unwrap();
        assert_eq!(
            entries(&t),
            vec![vec![2, 0, 0, 0], vec![0, 2, 0, 0], vec![0, 0, 0, 2]]
        );
    }

    #[test]
    fn bad_layouts_and_keys_are_refused_with_the_reason() {
        let mut t = tracer(2, 4);
        let error = t.set_layout(&[1, 2], &[1]).unwrap_err().to_string();
        assert!(error.contains("2 request keys and 1 row counts"), "{error}");
        let error = t.set_layout(&[1, 1], &[1, 1]).unwrap_err().to_string();
        assert!(error.contains("key 1 appears twice"), "{error}");
        let error = t.end_request(3).unwrap_err().to_string();
        assert!(error.contains("request key 3 is not live"), "{error}");
        t.set_layout(&[1, 2], &[2, 1]).unwrap();
        let error = t.record(1, &[0, 1, 2, 3], 2).unwrap_err().to_string();
        assert!(error.contains("gives out 3 token rows"), "{error}");
        assert!(error.contains("layer 1's routing has 2"), "{error}");
        t.end_request(2).unwrap();
        let error = t.end_request(2).unwrap_err().to_string();
        assert!(error.contains("ended already"), "{error}");
    }

    #[test]
    fn rows_of_a_request_ended_mid_layout_are_not_traced() {
        let mut t = tracer(1, 4);
        t.set_layout(&[1, 2], &[1, 1]).unwrap();
        t.end_request(1).unwrap();
        t.record(0, &[0, 3], 1).unwrap();
        t.end_request(2).unwrap();
        // Request 1 saw nothing: an empty matrix is not kept.
        assert_eq!(entries(&t), vec![vec![0, 0, 0, 1]]);
    }
}
