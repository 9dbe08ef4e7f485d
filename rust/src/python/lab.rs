//! Bindings for the policy lab: trace replay and the EAMC with its matcher.
//!
//! Routing crosses the boundary as (tokens, address, length) of C-contiguous
//! uint32 arrays that the caller keeps alive for the duration of the call.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_py;
use crate::execution::CpuExperts;
use crate::replay::{
    replay_with_progress as run_replay, ReplayConfig, Routing, SimulatedLookahead,
};
use crate::trace::{ActivationCollection, ActivationMatrix, Replacement, RequestMatcher};

type RawRouting = (usize, usize, usize);

fn routings(raw: &[RawRouting]) -> Vec<Routing<'_>> {
    raw.iter()
        .map(|&(tokens, address, len)| Routing {
            tokens,
            // SAFETY: the caller passes the address of `len` contiguous u32
            // values that stay alive and unchanged for this call (see the
            // module doc); an empty array may have any address.
            ids: if len == 0 {
                &[]
            } else {
                unsafe { std::slice::from_raw_parts(address as *const u32, len) }
            },
        })
        .collect()
}

/// Replays routing through the cache core under one policy on a simulated
/// clock; planner settings come as keyword arguments (see `planner.rs`).
/// `cpu_expert_s` (one expert's CPU time for one token) adds the CPU as a
/// second executor, with misses placed by `cpu_experts` ("auto", "always"
/// or "never"); see `replay.rs`. `copy_chunk_bytes` models copies in chunks
/// that an on-demand copy can get between (the live cache copies whole
/// experts). `lookahead` (layers) simulates a router lookahead whose ids
/// are right with probability `lookahead_accuracy` (see `replay.rs`). `progress(done)` is called after each
/// measured request; an exception it raises (KeyboardInterrupt included)
/// stops the replay and is raised here.
#[pyfunction]
#[pyo3(signature = (policy, requests, warmup, *, layers, experts, top_k, slots, expert_bytes,
    bandwidth_bytes_per_s, layer_compute_s, cpu_expert_s=None, cpu_experts="auto", progress=None,
    copy_chunk_bytes=None, lookahead=None, lookahead_accuracy=1.0, **planner))]
#[allow(clippy::too_many_arguments)]
pub fn replay<'py>(
    py: Python<'py>,
    policy: &str,
    requests: Vec<RawRouting>,
    warmup: Vec<RawRouting>,
    layers: usize,
    experts: usize,
    top_k: usize,
    slots: usize,
    expert_bytes: u64,
    bandwidth_bytes_per_s: f64,
    layer_compute_s: f64,
    cpu_expert_s: Option<f64>,
    cpu_experts: &str,
    progress: Option<Py<PyAny>>,
    copy_chunk_bytes: Option<u64>,
    lookahead: Option<usize>,
    lookahead_accuracy: f64,
    planner: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let config = ReplayConfig {
        layers,
        experts,
        top_k,
        slots,
        expert_bytes,
        bandwidth_bytes_per_s,
        layer_compute_s,
        planner: super::planner::planner_config(planner)?,
        cpu_expert_s,
        cpu_experts: CpuExperts::parse(cpu_experts).map_err(to_py)?,
        copy_chunk_bytes,
        lookahead: lookahead.map(|depth| SimulatedLookahead {
            depth,
            accuracy: lookahead_accuracy,
        }),
    };
    let mut raised = None;
    let on_request = |done: usize| {
        let Some(callback) = &progress else {
            return ControlFlow::Continue(());
        };
        Python::attach(|py| match callback.call1(py, (done,)) {
            Ok(_) => ControlFlow::Continue(()),
            Err(e) => {
                raised = Some(e);
                ControlFlow::Break(())
            }
        })
    };
    let (requests, warmup) = (routings(&requests), routings(&warmup));
    let report = py.detach(|| run_replay(policy, &config, &requests, &warmup, on_request));
    let Some(report) = report.map_err(to_py)? else {
        return Err(raised.unwrap_or_else(|| {
            super::errors::MoeOffloadError::new_err("the replay stopped without a reason")
        }));
    };
    let d = PyDict::new(py);
    d.set_item("tokens", report.tokens)?;
    d.set_item("accesses", report.accesses)?;
    d.set_item("hits", report.hits)?;
    d.set_item("misses", report.misses)?;
    d.set_item("prefetch_hits", report.prefetch_hits)?;
    d.set_item("prefetch_late", report.prefetch_late)?;
    d.set_item("prefetch_wasted", report.prefetch_wasted)?;
    d.set_item("prefetch_copies", report.prefetch_copies)?;
    d.set_item("copies", report.copies)?;
    d.set_item("bytes_moved", report.bytes_moved)?;
    d.set_item("stall_s", report.stall_s)?;
    d.set_item("total_s", report.total_s)?;
    d.set_item("resident_s", report.resident_s)?;
    d.set_item("cpu_experts", report.cpu_experts)?;
    d.set_item("cpu_s", report.cpu_s)?;
    // Per look-ahead distance d = 1, 2, ...: the planner's top-k experts at
    // layer l + d that the token used there, and how many it predicted.
    d.set_item("predicted_used", report.predictor.used.to_vec())?;
    d.set_item("predicted", report.predictor.predicted.to_vec())?;
    Ok(d)
}

/// The expert activation matrix collection (EAMC).
#[pyclass(frozen, module = "moe_offload._core", name = "ActivationCollection")]
pub struct PyActivationCollection {
    inner: Arc<RwLock<ActivationCollection>>,
}

fn matrix(eamc: &ActivationCollection, counts: Vec<u32>) -> PyResult<ActivationMatrix> {
    let (layers, experts) = (eamc.layers(), eamc.experts());
    let n = counts.len();
    ActivationMatrix::from_counts(layers, experts, counts).ok_or_else(|| {
        super::errors::MoeOffloadError::new_err(format!(
            "{n} counts do not form a {layers}x{experts} activation matrix"
        ))
    })
}

#[pymethods]
impl PyActivationCollection {
    #[new]
    #[pyo3(signature = (capacity, layers, experts, replacement="least-matched"))]
    fn new(capacity: usize, layers: usize, experts: usize, replacement: &str) -> PyResult<Self> {
        let rule = Replacement::parse(replacement).map_err(to_py)?;
        let eamc = ActivationCollection::new(capacity, layers, experts, rule).map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(RwLock::new(eamc)),
        })
    }

    /// Reads a saved collection; a missing, truncated, corrupt or foreign
    /// file raises MoeOffloadError naming it.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let eamc = py
            .detach(|| ActivationCollection::load(&path))
            .map_err(to_py)?;
        Ok(Self {
            inner: Arc::new(RwLock::new(eamc)),
        })
    }

    /// Writes the collection atomically (temporary file, then rename).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let eamc = self.inner.read().unwrap_or_else(|e| e.into_inner());
        py.detach(|| eamc.save(&path)).map_err(to_py)
    }

    /// Adds a finished request's row-major L×E counts; returns the entry
    /// index used, or None for an all-zero matrix.
    fn insert(&self, counts: Vec<u32>) -> PyResult<Option<usize>> {
        let mut eamc = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let m = matrix(&eamc, counts)?;
        eamc.insert(&m).map_err(to_py)
    }

    /// Entry `index` as row-major counts.
    fn entry(&self, index: usize) -> PyResult<Vec<u32>> {
        let eamc = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if index >= eamc.len() {
            return Err(super::errors::MoeOffloadError::new_err(format!(
                "entry {index} of a collection of {}",
                eamc.len()
            )));
        }
        Ok(eamc.entry(index).counts().to_vec())
    }

    fn __len__(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .capacity()
    }

    #[getter]
    fn shape(&self) -> (usize, usize) {
        let eamc = self.inner.read().unwrap_or_else(|e| e.into_inner());
        (eamc.layers(), eamc.experts())
    }

    /// A live request's incremental matcher against this collection.
    fn matcher(&self) -> PyMatcher {
        let eamc = self.inner.read().unwrap_or_else(|e| e.into_inner());
        PyMatcher {
            eamc: Arc::clone(&self.inner),
            matcher: Mutex::new(RequestMatcher::new(&eamc)),
        }
    }
}

/// Cosine similarity of one live request to every EAMC entry, updated
/// incrementally as the request's tokens are routed.
#[pyclass(frozen, module = "moe_offload._core", name = "RequestMatcher")]
pub struct PyMatcher {
    eamc: Arc<RwLock<ActivationCollection>>,
    matcher: Mutex<RequestMatcher>,
}

#[pymethods]
impl PyMatcher {
    /// One token's routing at `layer`.
    fn observe(&self, layer: usize, experts: Vec<u32>) -> PyResult<()> {
        let eamc = self.eamc.read().unwrap_or_else(|e| e.into_inner());
        if layer >= eamc.layers() {
            return Err(super::errors::MoeOffloadError::new_err(format!(
                "layer {layer} of a {}-layer collection",
                eamc.layers()
            )));
        }
        self.matcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(&eamc, layer, &experts);
        Ok(())
    }

    /// Similarity to every entry, in entry order.
    fn similarities(&self) -> Vec<f32> {
        let eamc = self.eamc.read().unwrap_or_else(|e| e.into_inner());
        let matcher = self.matcher.lock().unwrap_or_else(|e| e.into_inner());
        (0..eamc.len()).map(|k| matcher.similarity(k)).collect()
    }

    /// The `n` best entries, best first, as (index, similarity).
    fn best(&self, n: usize) -> Vec<(usize, f32)> {
        let eamc = self.eamc.read().unwrap_or_else(|e| e.into_inner());
        self.matcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .best(&eamc, n)
    }
}

/// The prefetch queue under `producers` pushing threads and `consumers`
/// popping ones, for its throughput benchmark; returns how many requests
/// were delivered (all of them: `producers * per_producer`).
#[pyfunction]
pub fn exercise_queue(
    py: Python<'_>,
    producers: u32,
    consumers: usize,
    per_producer: u32,
) -> usize {
    py.detach(|| {
        crate::queue::exercise(producers, consumers, per_producer)
            .iter()
            .map(Vec::len)
            .sum()
    })
}
