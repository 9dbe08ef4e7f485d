//! The Python module `moe_offload._core`. The only place that knows Python.
//!
//! Ownership across the boundary: tensors never cross it; their addresses
//! do. The caller of `ExpertCache(...)` passes the slot pool as an address
//! plus the object that owns that memory (a torch tensor); the cache keeps
//! a reference to that object for as long as it lives, so the pool cannot
//! be freed under the copy workers. Addresses given to `write_expert` /
//! `read_expert` must stay valid for the duration of the call only.

mod errors;
mod lab;
mod planner;
mod store;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::core::Placement;
use crate::cache::{CacheConfig, Device, ExpertCache as CoreCache};
use crate::execution::CpuExperts;
use crate::trace::live::LookaheadCounts;
use errors::to_py;
use store::PyExpertStore;

/// The device expert cache with its host tier (or expert store and host
/// cache) and copy workers.
#[pyclass(frozen, module = "moe_offload._core", name = "ExpertCache")]
struct PyExpertCache {
    cache: CoreCache,
    /// Keeps the slot pool's memory alive (see the module doc).
    _pool_owner: Py<PyAny>,
    budget_bytes: u64,
}

#[pymethods]
impl PyExpertCache {
    #[new]
    /// Planner settings (prefetch depth, EAMC capacity, ...) come as
    /// keyword arguments; see `planner.rs`. `pool_stream`: on CUDA, the
    /// stream the pool was allocated on; by default torch's current stream
    /// on the pool's device, which is the one a pool allocated just before
    /// was ordered on.
    #[pyo3(signature = (layers, pool_address, pool_owner, slot_bytes, n_slots, device="cpu", copy_workers=None,
        policy="activation-aware", budget_bytes=None, eamc_path=None, store=None, host_slots=0,
        pool_stream=None, cpu_experts="auto", **planner))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        layers: Vec<(u32, usize)>,
        pool_address: u64,
        pool_owner: Py<PyAny>,
        slot_bytes: usize,
        n_slots: usize,
        device: &str,
        copy_workers: Option<&Bound<'_, PyAny>>,
        policy: &str,
        budget_bytes: Option<u64>,
        eamc_path: Option<PathBuf>,
        store: Option<Py<PyExpertStore>>,
        host_slots: usize,
        pool_stream: Option<u64>,
        cpu_experts: &str,
        planner: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let cpu_experts = CpuExperts::parse(cpu_experts).map_err(to_py)?;
        let budget_bytes = budget_bytes.unwrap_or((slot_bytes * n_slots) as u64);
        let device = match parse_device(device)? {
            Some(ordinal) => Device::Cuda {
                ordinal,
                pool_stream: match pool_stream {
                    Some(stream) => stream,
                    None => torch_current_stream(pool_owner.bind(py))?,
                },
            },
            None => Device::Host,
        };
        let config = CacheConfig {
            layers,
            pool_address,
            slot_bytes,
            n_slots,
            device,
            copy_workers: copy_workers.map_or(Ok(1), worker_count)?,
            policy: policy.to_string(),
            budget_bytes,
            planner: planner::planner_config(planner)?,
            eamc_path,
            cpu_experts,
        };
        let store = store.map(|s| Arc::clone(&s.get().store));
        let cache = py
            .detach(|| match store {
                Some(store) => CoreCache::with_store(config, store, host_slots),
                None => CoreCache::new(config),
            })
            .map_err(to_py)?;
        Ok(Self {
            cache,
            _pool_owner: pool_owner,
            budget_bytes,
        })
    }

    /// "cuda" or "host": how copies reach the slots.
    #[getter]
    fn backend(&self) -> &'static str {
        if self.cache.is_cuda() {
            "cuda"
        } else {
            "host"
        }
    }

    #[getter]
    fn host_pinned(&self) -> bool {
        self.cache.host_is_pinned()
    }

    #[getter]
    fn n_slots(&self) -> usize {
        self.cache.n_slots()
    }

    /// Slots of the host cache (0 when every expert is in the host tier).
    #[getter]
    fn host_slots(&self) -> usize {
        self.cache.host_slots()
    }

    /// Reads (layer, expert) pairs from the store into the host cache on the
    /// copy workers; returns once they are in, or raises the first error.
    fn preload(&self, py: Python<'_>, experts: Vec<(u32, u32)>) -> PyResult<()> {
        py.detach(|| self.cache.preload(&experts)).map_err(to_py)
    }

    /// The host cache's statistics; None without a store.
    fn host_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(s) = self.cache.host_stats() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("host_hits", s.hits)?;
        d.set_item("host_misses", s.misses)?;
        d.set_item("host_staged", s.staged)?;
        d.set_item("host_evictions", s.evictions)?;
        d.set_item("bytes_from_store", s.bytes_read)?;
        d.set_item("store_read_seconds", s.read_seconds)?;
        d.set_item(
            "store_direct_io",
            self.cache.store().is_some_and(|s| s.uses_direct_io()),
        )?;
        Ok(Some(d))
    }

    /// Copies `nbytes` at host address `src` into the expert's host blob.
    fn write_expert(
        &self,
        py: Python<'_>,
        layer: u32,
        expert: u32,
        offset: usize,
        src: usize,
        nbytes: usize,
    ) -> PyResult<()> {
        // SAFETY: the caller guarantees `src` addresses `nbytes` readable
        // bytes that stay valid for this call (documented in `_core.pyi`).
        let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, nbytes) };
        py.detach(|| self.cache.write_expert(layer, expert, offset, bytes))
            .map_err(to_py)
    }

    /// Copies the expert's host bytes at `offset` to host address `dst`.
    fn read_expert(
        &self,
        py: Python<'_>,
        layer: u32,
        expert: u32,
        offset: usize,
        dst: usize,
        nbytes: usize,
    ) -> PyResult<()> {
        // SAFETY: the caller guarantees `dst` addresses `nbytes` writable
        // bytes that nothing else touches during this call.
        let bytes = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, nbytes) };
        py.detach(|| self.cache.read_expert(layer, expert, offset, bytes))
            .map_err(to_py)
    }

    /// Pins a slot for each expert; returns the slots in the same order.
    fn fetch(&self, py: Python<'_>, layer: u32, experts: Vec<u32>) -> PyResult<Vec<u32>> {
        py.detach(|| self.cache.fetch(layer, &experts))
            .map_err(to_py)
    }

    /// Where misses run: "never", "auto" or "always".
    #[getter]
    fn cpu_experts(&self) -> &'static str {
        self.cache.cpu_experts().name()
    }

    /// Places one layer's experts (`tokens[i]` tokens routed to
    /// `experts[i]`): per expert, its pinned slot (wait, run, release as
    /// after `fetch`), ON_CPU (run it from `host_acquire`'s bytes) or LATER
    /// (fetch it once this call's slots are released).
    fn place(
        &self,
        py: Python<'_>,
        layer: u32,
        experts: Vec<u32>,
        tokens: Vec<u32>,
    ) -> PyResult<Vec<i64>> {
        let placements = py
            .detach(|| self.cache.place(layer, &experts, &tokens))
            .map_err(to_py)?;
        Ok(placements
            .into_iter()
            .map(|p| match p {
                Placement::Slot(slot) => i64::from(slot),
                Placement::Cpu => ON_CPU,
                Placement::Later => LATER,
            })
            .collect())
    }

    /// The host address of the expert's bytes, held for the CPU until
    /// `host_release` (or `release_all`).
    fn host_acquire(&self, py: Python<'_>, layer: u32, expert: u32) -> PyResult<u64> {
        py.detach(|| self.cache.host_acquire(layer, expert))
            .map_err(to_py)
    }

    fn host_release(&self, py: Python<'_>, layer: u32, expert: u32) -> PyResult<()> {
        py.detach(|| self.cache.host_release(layer, expert))
            .map_err(to_py)
    }

    /// Experts whose host bytes are held for the CPU now.
    #[getter]
    fn host_held(&self) -> usize {
        self.cache.host_held()
    }

    /// (address, bytes) of the host memory `host_acquire`'s addresses lie in.
    #[getter]
    fn host_region(&self) -> (u64, usize) {
        self.cache.host_region()
    }

    /// (seconds for an expert with a few tokens, seconds per token for one
    /// with many) as measured so far; None until both were.
    #[getter]
    fn cpu_costs(&self) -> Option<(f64, f64)> {
        self.cache.cpu_costs()
    }

    /// The CPU ran an expert for `tokens` tokens in `seconds`; with `count`
    /// it is added to `cpu_seconds` (a calibration run is not).
    #[pyo3(signature = (tokens, seconds, count=true))]
    fn record_cpu(&self, tokens: u32, seconds: f64, count: bool) {
        self.cache.record_cpu(tokens, seconds, count);
    }

    /// Returns once the expert's slot may be read on CUDA stream `stream`
    /// (ignored by the host backend).
    #[pyo3(signature = (layer, expert, stream=0))]
    fn wait(&self, py: Python<'_>, layer: u32, expert: u32, stream: u64) -> PyResult<()> {
        py.detach(|| self.cache.wait(layer, expert, stream))
            .map_err(to_py)
    }

    /// Unpins the experts' slots once `stream` has passed this point.
    #[pyo3(signature = (layer, experts, stream=0))]
    fn release(&self, py: Python<'_>, layer: u32, experts: Vec<u32>, stream: u64) -> PyResult<()> {
        py.detach(|| self.cache.release(layer, &experts, stream))
            .map_err(to_py)
    }

    /// Unpins every slot still held (fetches whose release will never come:
    /// a forward pass cut short); returns how many pins were dropped.
    #[pyo3(signature = (stream=0))]
    fn release_all(&self, py: Python<'_>, stream: u64) -> PyResult<u32> {
        py.detach(|| self.cache.release_all(stream)).map_err(to_py)
    }

    /// Runs `call(*args, **kwargs)` as one forward pass of the model and
    /// returns what it returns: after any other thread's pass has ended
    /// (nested passes of this thread go straight in), and, for an outermost
    /// pass, after releasing slots an interrupted pass left held, and again
    /// when it raises. `stream`: the CUDA stream passes read slots on.
    #[pyo3(signature = (call, args, kwargs=None, stream=0))]
    fn run_pass<'py>(
        &self,
        py: Python<'py>,
        call: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
        kwargs: Option<&Bound<'py, PyDict>>,
        stream: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let gate = self.cache.passes();
        let turn = loop {
            // Waiting for another thread's pass: without the GIL (that pass
            // needs it to end), in slices, so a Ctrl-C can end the wait.
            if let Some(turn) = py.detach(|| gate.enter(Duration::from_millis(50))) {
                break turn;
            }
            py.check_signals()?;
        };
        if turn.is_outermost() {
            py.detach(|| self.cache.release_all(stream))
                .map_err(to_py)?;
        }
        let outcome = call.call(args, kwargs);
        if turn.is_outermost() && outcome.is_err() {
            // Now rather than at the next pass; a failure here would hide
            // the pass's own error, and the next pass tries again anyway.
            let _ = py.detach(|| self.cache.release_all(stream));
        }
        outcome
    }

    /// Starts `n` requests (one per sequence of a batch); the live ones end
    /// and join the EAMC.
    fn begin_requests(&self, n: usize) -> PyResult<()> {
        self.cache.begin_requests(n).map_err(to_py)
    }

    /// Ends the live requests; their activation matrices join the EAMC.
    fn end_requests(&self) -> PyResult<()> {
        self.cache.end_requests().map_err(to_py)
    }

    /// The next passes' token rows belong, in order, to the requests
    /// `keys` (`rows[i]` rows each); a key not live yet begins a request.
    fn set_layout(&self, keys: Vec<u64>, rows: Vec<usize>) -> PyResult<()> {
        self.cache.set_layout(&keys, &rows).map_err(to_py)
    }

    /// Back to splitting rows equally among the plain batch's requests.
    fn clear_layout(&self) -> PyResult<()> {
        self.cache.clear_layout().map_err(to_py)
    }

    /// The keyed request `key` finished: its activation matrix joins the EAMC.
    fn end_request(&self, key: u64) -> PyResult<()> {
        self.cache.end_request(key).map_err(to_py)
    }

    /// Traces one MoE layer's routing (`top_k` ids per token row,
    /// batch-major) and re-plans the prefetches for the layers ahead.
    fn observe(&self, py: Python<'_>, layer: u32, ids: Vec<u32>, top_k: usize) -> PyResult<()> {
        py.detach(|| self.cache.observe(layer, &ids, top_k))
            .map_err(to_py)
    }

    /// A router lookahead at `layer`: `depth` blocks of token rows (`top_k`
    /// ids each), what the routers of the next `depth` layers chose on this
    /// layer's hidden state. Call it before `observe` of the same layer.
    fn lookahead(
        &self,
        py: Python<'_>,
        layer: u32,
        ids: Vec<u32>,
        top_k: usize,
        depth: usize,
    ) -> PyResult<()> {
        py.detach(|| self.cache.lookahead(layer, &ids, top_k, depth))
            .map_err(to_py)
    }

    /// The router lookahead's agreement with the routing since the last
    /// reset: (distance, target layer, passes, predicted, used, hits,
    /// token_hits, token_ids) per pair scored, in that order.
    #[allow(clippy::type_complexity)]
    fn lookahead_counts(
        &self,
        py: Python<'_>,
    ) -> PyResult<Vec<(usize, usize, u64, u64, u64, u64, u64, u64)>> {
        let counts = py.detach(|| self.cache.lookahead_counts()).map_err(to_py)?;
        Ok(counts
            .into_iter()
            .map(|((d, layer), c)| {
                let LookaheadCounts {
                    passes,
                    predicted,
                    used,
                    hits,
                    token_hits,
                    token_ids,
                } = c;
                (
                    d, layer, passes, predicted, used, hits, token_hits, token_ids,
                )
            })
            .collect())
    }

    /// Clears `lookahead_counts`.
    fn reset_lookahead_counts(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.cache.reset_lookahead_counts())
            .map_err(to_py)
    }

    /// Writes the EAMC to `path` atomically.
    fn save_eamc(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.cache.save_eamc(&path)).map_err(to_py)
    }

    /// Entries in the EAMC, once every routing handed over is traced.
    #[getter]
    fn eamc_len(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| self.cache.eamc_len()).map_err(to_py)
    }

    fn slot_of(&self, layer: u32, expert: u32) -> PyResult<Option<u32>> {
        self.cache.slot_of(layer, expert).map_err(to_py)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.cache.stats();
        let d = PyDict::new(py);
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("copies", s.copies)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("bytes_to_device", s.bytes_to_device)?;
        d.set_item("peak_resident_bytes", s.peak_resident_bytes)?;
        d.set_item("budget_bytes", self.budget_bytes)?;
        d.set_item("stall_seconds", s.stall_seconds)?;
        d.set_item("prefetch_hits", s.prefetch_hits)?;
        d.set_item("prefetch_late", s.prefetch_late)?;
        d.set_item("prefetch_wasted", s.prefetch_wasted)?;
        d.set_item("prefetch_copies", s.prefetch_copies)?;
        d.set_item("cpu_experts", s.cpu_experts)?;
        d.set_item("cpu_seconds", s.cpu_seconds)?;
        d.set_item("background_copies", s.background_copies)?;
        d.set_item("free_slots", self.cache.free_slots())?;
        let rates: Vec<f64> = s
            .layer_hits
            .iter()
            .zip(&s.layer_misses)
            .map(|(&h, &m)| {
                if h + m > 0 {
                    h as f64 / (h + m) as f64
                } else {
                    0.0
                }
            })
            .collect();
        d.set_item("layer_hit_rates", rates)?;
        Ok(d)
    }

    /// Clears the statistics; with `host=False` only the device cache's,
    /// keeping what the host cache read (e.g. an up-front read).
    #[pyo3(signature = (host=true))]
    fn reset_stats(&self, host: bool) {
        self.cache.reset_stats(host);
    }
}

/// `place`'s answer for an expert that runs on the CPU.
const ON_CPU: i64 = -1;
/// `place`'s answer for an expert fetched after the layer's slots are released.
const LATER: i64 = -2;

/// `copy_workers` as a count; any Python int (or not an int at all) gets
/// the core's range check or a message naming the argument, never a bare
/// OverflowError or TypeError.
fn worker_count(value: &Bound<'_, PyAny>) -> PyResult<usize> {
    value.extract::<usize>().map_err(|_| {
        let shown = value.repr().map_or_else(|_| "?".into(), |r| r.to_string());
        errors::MoeOffloadError::new_err(format!(
            "copy_workers = {shown} is out of range: use 1 to {} copy workers",
            crate::cache::MAX_COPY_WORKERS
        ))
    })
}

/// The CUDA device ordinal `device` names; `None` for the host.
fn parse_device(device: &str) -> PyResult<Option<i32>> {
    match device {
        "cpu" | "host" => Ok(None),
        "cuda" => Ok(Some(0)),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(ordinal) => Ok(Some(ordinal)),
            None => Err(errors::MoeOffloadError::new_err(format!(
                "unknown device {other:?}; use \"cpu\", \"cuda\" or \"cuda:N\""
            ))),
        },
    }
}

/// torch's current stream on the device of `pool` (a CUDA tensor), as a
/// driver handle.
fn torch_current_stream(pool: &Bound<'_, PyAny>) -> PyResult<u64> {
    let stream = || -> PyResult<u64> {
        let torch = pool.py().import("torch")?;
        let current = torch
            .getattr("cuda")?
            .call_method1("current_stream", (pool.getattr("device")?,))?;
        current.getattr("cuda_stream")?.extract()
    };
    stream().map_err(|e| {
        errors::MoeOffloadError::new_err(format!(
            "pool_stream: cannot ask torch for the current stream of the pool's device ({e}); \
             pass pool_stream, the stream the pool was allocated on"
        ))
    })
}

/// The largest EAMC capacity allowed for `layers` × `experts` on this
/// machine (see `trace::eamc::max_capacity`).
#[pyfunction]
fn max_eamc_capacity(layers: usize, experts: usize) -> usize {
    crate::trace::eamc::max_capacity(layers, experts)
}

/// Whether the CUDA driver library could be loaded, and if not, why.
#[pyfunction]
fn cuda_driver_status() -> (bool, String) {
    match moe_offload_cuda::driver() {
        Ok(_) => (true, "CUDA driver loaded".to_string()),
        Err(e) => (false, e.to_string()),
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyExpertCache>()?;
    m.add_class::<PyExpertStore>()?;
    m.add_class::<store::PyStoreWriter>()?;
    m.add_class::<lab::PyActivationCollection>()?;
    m.add_class::<lab::PyMatcher>()?;
    m.add_function(wrap_pyfunction!(lab::replay, m)?)?;
    m.add_function(wrap_pyfunction!(lab::exercise_queue, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_driver_status, m)?)?;
    m.add_function(wrap_pyfunction!(max_eamc_capacity, m)?)?;
    m.add("MAX_EAMC_CAPACITY", crate::trace::eamc::MAX_CAPACITY)?;
    m.add("ON_CPU", ON_CPU)?;
    m.add("LATER", LATER)?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Benchmarks refuse to time an unoptimised build.
    m.add("debug_build", cfg!(debug_assertions))?;
    Ok(())
}
