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

use std::collections::{BTreeMap, HashMap, HashSet};

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
    /// How the router lookahead's predictions compare with the routing.
    lookahead: LookaheadScore,
}

impl LiveTracer {
    pub fn new(planner: Planner) -> Self {
        Self {
            planner,
            live: Vec::new(),
            keyed: HashMap::new(),
            layout: None,
            lookahead: LookaheadScore::default(),
        }
    }

    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Bytes one live request takes: its matcher's two floats per EAMC
    /// entry, and its activation counts, recent activations and router
    /// lookahead (at most one distribution per layer): L×E each.
    pub fn request_bytes(&self) -> usize {
        let eamc = self.planner.collection();
        let cells = eamc.layers() * eamc.experts();
        (2 * eamc.capacity() + 3 * cells) * 4 + eamc.layers()
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
        self.lookahead.score(layer, ids, top_k);
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
        for_each_plain(&self.live, ids, top_k, |request, rows| {
            self.planner.observe_rows(request, layer, rows, top_k)
        })
    }

    /// Retention scores and prefetch candidates for the layers after `layer`.
    pub fn plan(&mut self, layer: usize) -> Plan<'_> {
        self.planner.plan(layer)
    }

    /// Router lookahead at `layer`: `ids` holds `depth` blocks of the
    /// pass's token rows (`top_k` ids each, batch-major), the routing that
    /// the routers of layers `layer + 1 ..= layer + depth` chose on this
    /// layer's hidden state. Each block goes to the live requests (split
    /// as `record` splits) and is kept to be scored against its layer's
    /// routing.
    pub fn lookahead(
        &mut self,
        layer: usize,
        ids: &[u32],
        top_k: usize,
        depth: usize,
    ) -> Result<()> {
        let rows_of_all = top_k.checked_mul(depth).filter(|&n| n > 0);
        if rows_of_all.is_none_or(|n| ids.is_empty() || ids.len() % n != 0) {
            return Err(CoreError::Protocol(format!(
                "{} lookahead ids do not split into {depth} layers of rows of top_k = {top_k}",
                ids.len()
            )));
        }
        let block = ids.len() / depth;
        self.lookahead.forget_before(layer);
        self.planner
            .forget_lookahead_past(layer.saturating_add(depth));
        for (d, predicted) in (1..=depth).zip(ids.chunks(block)) {
            let target = layer + d;
            self.lookahead.expect(target, d, predicted);
            self.predict_live(target, predicted, top_k)?;
        }
        Ok(())
    }

    /// Hands one layer's looked-ahead routing to the live requests. Rows
    /// the plain batch does not divide are the next pass's business (its
    /// routing starts a new request): not handed on.
    fn predict_live(&mut self, target: usize, ids: &[u32], top_k: usize) -> Result<()> {
        if let Some(layout) = &self.layout {
            return for_each_keyed(&self.keyed, layout, target, ids, top_k, |id, rows| {
                self.planner.lookahead(id, target, rows, top_k)
            });
        }
        let rows = ids.len() / top_k;
        if self.live.is_empty() || rows % self.live.len() != 0 {
            return Ok(());
        }
        for_each_plain(&self.live, ids, top_k, |request, rows| {
            self.planner.lookahead(request, target, rows, top_k)
        })
    }

    /// The router lookahead's agreement with the routing so far, per
    /// (distance, target layer), in that order.
    pub fn lookahead_counts(&self) -> Vec<((usize, usize), LookaheadCounts)> {
        self.lookahead
            .counts
            .iter()
            .map(|(&key, &counts)| (key, counts))
            .collect()
    }

    pub fn reset_lookahead_counts(&mut self) {
        self.lookahead.counts.clear();
    }
}

/// How a router lookahead at distance d compared with its target layer's
/// routing, summed over the passes scored. Per pass, P is the set of
/// experts predicted for the layer and U the set it used: precision is
/// `hits / predicted`, recall `hits / used`; per token, `token_hits` counts
/// the ids of its predicted row in its real row, out of `token_ids`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LookaheadCounts {
    pub passes: u64,
    /// |P| summed over passes.
    pub predicted: u64,
    /// |U| summed over passes.
    pub used: u64,
    /// |P ∩ U| summed over passes.
    pub hits: u64,
    pub token_hits: u64,
    pub token_ids: u64,
}

/// Predictions waiting for their layer's routing, and the counts so far.
#[derive(Default)]
struct LookaheadScore {
    /// Per target layer: (distance, predicted ids) of the pass under way.
    pending: Vec<Vec<(usize, Vec<u32>)>>,
    counts: BTreeMap<(usize, usize), LookaheadCounts>,
}

impl LookaheadScore {
    /// Keeps what distance `d` predicts for `layer` (replacing the same
    /// distance's prediction of an earlier pass that never reached it).
    fn expect(&mut self, layer: usize, d: usize, ids: &[u32]) {
        if self.pending.len() <= layer {
            self.pending.resize_with(layer + 1, Vec::new);
        }
        let pending = &mut self.pending[layer];
        pending.retain(|(distance, _)| *distance != d);
        pending.push((d, ids.to_vec()));
    }

    /// Drops predictions for layers before `layer`: a lookahead from there
    /// means a pass moved past them, and what is left is a stopped pass's
    /// (`layer`'s own routing comes after its lookahead).
    fn forget_before(&mut self, layer: usize) {
        for pending in self.pending.iter_mut().take(layer) {
            pending.clear();
        }
    }

    /// Scores the predictions for `layer` against its routing `ids`.
    fn score(&mut self, layer: usize, ids: &[u32], top_k: usize) {
        let Some(pending) = self.pending.get_mut(layer) else {
            return;
        };
        for (d, predicted) in pending.drain(..) {
            // Another pass's rows (one that stopped before this layer).
            if predicted.len() != ids.len() {
                continue;
            }
            let counts = self.counts.entry((d, layer)).or_default();
            add_agreement(counts, &predicted, ids, top_k);
        }
    }
}

/// Adds one pass's agreement between `predicted` and `used` (rows of
/// `top_k` ids, the same rows) to `counts`.
fn add_agreement(counts: &mut LookaheadCounts, predicted: &[u32], used: &[u32], top_k: usize) {
    let distinct = |ids: &[u32]| {
        let mut set = ids.to_vec();
        set.sort_unstable();
        set.dedup();
        set
    };
    let (p, u) = (distinct(predicted), distinct(used));
    let hits = p.iter().filter(|e| u.binary_search(e).is_ok()).count();
    let token_hits: usize = predicted
        .chunks(top_k)
        .zip(used.chunks(top_k))
        .map(|(p, u)| p.iter().filter(|e| u.contains(e)).count())
        .sum();
    counts.passes += 1;
    counts.predicted += p.len() as u64;
    counts.used += u.len() as u64;
    counts.hits += hits as u64;
    counts.token_hits += token_hits as u64;
    counts.token_ids += used.len() as u64;
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
    for_each_keyed(keyed, layout, layer, ids, top_k, |id, rows| {
        planner.observe_rows(id, layer, rows, top_k)
    })
}

/// Calls `each` with every request of the plain batch `live` and its
/// equal share of the token rows of `ids` (which the batch divides), in
/// order.
fn for_each_plain(
    live: &[RequestId],
    ids: &[u32],
    top_k: usize,
    mut each: impl FnMut(RequestId, &[u32]) -> Result<()>,
) -> Result<()> {
    let share = ids.len() / top_k / live.len() * top_k;
    for (i, &request) in live.iter().enumerate() {
        each(request, &ids[i * share..(i + 1) * share])?;
    }
    Ok(())
}

/// Calls `each` with every live keyed request's rows of `ids`, split by
/// the layout's row counts (checked against `ids` first).
fn for_each_keyed(
    keyed: &HashMap<RequestKey, RequestId>,
    layout: &[(RequestKey, usize)],
    layer: usize,
    ids: &[u32],
    top_k: usize,
    mut each: impl FnMut(RequestId, &[u32]) -> Result<()>,
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
            each(id, &ids[start..end])?;
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
    fn a_lookahead_is_scored_against_its_layers_routing_per_distance() {
        let mut t = tracer(3, 4);
        t.begin_requests(1).unwrap();
        // Two token rows, top-1: layer 1 predicted [1, 2], layer 2 [3, 3].
        t.lookahead(0, &[1, 2, 3, 3], 1, 2).unwrap();
        t.record(0, &[0, 0], 1).unwrap();
        t.lookahead(1, &[3, 0], 1, 1).unwrap();
        t.record(1, &[1, 2], 1).unwrap();
        t.record(2, &[3, 0], 1).unwrap();
        let exact = LookaheadCounts {
            passes: 1,
            predicted: 2,
            used: 2,
            hits: 2,
            token_hits: 2,
            token_ids: 2,
        };
        // From layer 0, layer 2: {3} of {0, 3}, one token of two.
        let half = LookaheadCounts {
            predicted: 1,
            hits: 1,
            token_hits: 1,
            ..exact
        };
        assert_eq!(
            t.lookahead_counts(),
            vec![((1, 1), exact), ((1, 2), exact), ((2, 2), half)]
        );
        t.reset_lookahead_counts();
        assert!(t.lookahead_counts().is_empty());
        // A routing without a pending prediction scores nothing.
        t.record(1, &[1, 2], 1).unwrap();
        assert!(t.lookahead_counts().is_empty());
        let error = t.lookahead(0, &[1, 2, 3], 1, 2).unwrap_err().to_string();
        assert!(error.contains("3 lookahead ids"), "{error}");
    }

    #[test]
    fn a_lookahead_reaches_the_planner_per_request_and_stale_ones_are_dropped() {
        let mut t = tracer(4, 4);
        t.set_layout(&[7, 9], &[1, 1]).unwrap();
        t.lookahead(0, &[1, 2], 1, 1).unwrap();
        let error = t.lookahead(0, &[1, 2, 3], 1, 1).unwrap_err().to_string();
        assert!(error.contains("gives out 2 token rows"), "{error}");
        // A pass that stopped after layer 0: its prediction for layer 1 is
        // dropped when a pass looks ahead from a layer past it.
        t.lookahead(2, &[0, 0], 1, 1).unwrap();
        t.record(1, &[1, 2], 1).unwrap();
        assert!(t.lookahead_counts().is_empty());
        // Plain batches: rows split equally; an uneven split is not handed on.
        t.begin_requests(2).unwrap();
        t.lookahead(0, &[1, 2, 3], 1, 1).unwrap();
        t.lookahead(0, &[1, 2], 1, 1).unwrap();
        t.record(0, &[0, 0], 1).unwrap();
        t.record(1, &[1, 3], 1).unwrap();
        let [(key, counts)] = t.lookahead_counts()[..] else {
            panic!("{:?}", t.lookahead_counts());
        };
        assert_eq!((key, counts.hits, counts.token_hits), ((1, 1), 1, 1));
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
