//! [`LiveTracer`]: the requests a patched model is serving now, each with
//! its activation matrix, fed to the planner as the model routes tokens.

use super::sizing;
use crate::error::{CoreError, Result};
use crate::planner::{Plan, Planner, RequestId, Timing};

pub struct LiveTracer {
    planner: Planner,
    live: Vec<RequestId>,
}

impl LiveTracer {
    pub fn new(planner: Planner) -> Self {
        Self {
            planner,
            live: Vec::new(),
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

    /// Ends the current requests (their matrices join the EAMC) and starts
    /// `n` new ones: one per sequence of the batch.
    pub fn begin_requests(&mut self, n: usize) -> Result<()> {
        check_batch(n, self.request_bytes())?;
        self.end_requests()?;
        self.live = (0..n.max(1))
            .map(|_| self.planner.begin_request())
            .collect();
        Ok(())
    }

    pub fn end_requests(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.live) {
            self.planner.end_request(id)?;
        }
        Ok(())
    }

    pub fn live_requests(&self) -> usize {
        self.live.len()
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
