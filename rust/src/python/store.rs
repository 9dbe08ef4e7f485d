//! Bindings for the expert store: opening one (or a checkpoint read in
//! place) and writing one. Blob bytes cross the boundary as an address and
//! a length that the caller keeps valid for the duration of the call.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use super::errors::{to_py, MoeOffloadError};
use crate::tiers::store::{ExpertStore, Extent, LayerSpec, StoreWriter, TensorIndex};

/// Experts on disk, ready to back an `ExpertCache`.
#[pyclass(frozen, module = "moe_offload._core", name = "ExpertStore")]
pub struct PyExpertStore {
    pub(crate) store: Arc<ExpertStore>,
}

#[pymethods]
impl PyExpertStore {
    /// Opens and checks the store in directory `path`.
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let store = py.detach(|| ExpertStore::open(&path)).map_err(to_py)?;
        Ok(Self {
            store: Arc::new(store),
        })
    }

    /// Reads a checkpoint in place: `extents[i]` lists (file, offset, length,
    /// offset in the blob) for the i-th expert (layer-major).
    #[staticmethod]
    fn from_extents(
        py: Python<'_>,
        root: PathBuf,
        files: Vec<PathBuf>,
        layers: Vec<(u32, usize)>,
        extents: Vec<Vec<(u32, u64, u64, u64)>>,
    ) -> PyResult<Self> {
        let extents = extents
            .into_iter()
            .map(|list| {
                list.into_iter()
                    .map(|(file, offset, len, dst)| Extent {
                        file,
                        offset,
                        len,
                        dst,
                    })
                    .collect()
            })
            .collect();
        let store = py
            .detach(|| ExpertStore::from_extents(&root, &files, &layers, extents))
            .map_err(to_py)?;
        Ok(Self {
            store: Arc::new(store),
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.store.root().to_path_buf()
    }

    /// Whether reads bypass the page cache.
    #[getter]
    fn direct_io(&self) -> bool {
        self.store.uses_direct_io()
    }

    /// The index as JSON (None for a checkpoint read in place).
    fn index_json(&self) -> PyResult<Option<String>> {
        self.store
            .index()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| MoeOffloadError::new_err(e.to_string()))
    }
}

type PyTensor = (String, String, Vec<u64>, u64);

/// Writes a store; see `StoreWriter` in the core for the crash-safety rules.
#[pyclass(frozen, module = "moe_offload._core", name = "StoreWriter")]
pub struct PyStoreWriter {
    writer: Mutex<Option<StoreWriter>>,
    partial_dir: PathBuf,
    needed_bytes: u64,
}

impl PyStoreWriter {
    fn with_writer<T>(&self, f: impl FnOnce(&mut StoreWriter) -> crate::Result<T>) -> PyResult<T> {
        let mut guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let writer = guard.as_mut().ok_or_else(|| {
            MoeOffloadError::new_err("this store writer has finished or was aborted")
        })?;
        f(writer).map_err(to_py)
    }
}

#[pymethods]
impl PyStoreWriter {
    /// `layers`: per MoE layer (module name, experts, blob bytes, tensors as
    /// (name, dtype, shape, offset)); `meta`: JSON stored in the index.
    #[new]
    #[pyo3(signature = (path, layers, meta, overwrite=false))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        layers: Vec<(String, u32, u64, Vec<PyTensor>)>,
        meta: &str,
        overwrite: bool,
    ) -> PyResult<Self> {
        let meta: serde_json::Value = serde_json::from_str(meta)
            .map_err(|e| MoeOffloadError::new_err(format!("meta is not JSON: {e}")))?;
        let specs = layers
            .into_iter()
            .map(|(name, experts, blob_bytes, tensors)| LayerSpec {
                name,
                experts,
                blob_bytes,
                tensors: tensors
                    .into_iter()
                    .map(|(name, dtype, shape, offset)| TensorIndex {
                        name,
                        dtype,
                        shape,
                        offset,
                    })
                    .collect(),
            })
            .collect();
        let writer = py
            .detach(|| StoreWriter::create(&path, specs, meta, overwrite))
            .map_err(to_py)?;
        Ok(Self {
            partial_dir: writer.partial_dir().to_path_buf(),
            needed_bytes: writer.needed_bytes(),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Where extra files go before `add_file`.
    #[getter]
    fn partial_dir(&self) -> PathBuf {
        self.partial_dir.clone()
    }

    /// Bytes the blob files take on disk.
    #[getter]
    fn needed_bytes(&self) -> u64 {
        self.needed_bytes
    }

    /// Writes one expert's blob: `nbytes` at host address `src`.
    fn write_expert(
        &self,
        py: Python<'_>,
        layer: usize,
        expert: usize,
        src: usize,
        nbytes: usize,
    ) -> PyResult<()> {
        // SAFETY: the caller guarantees `src` addresses `nbytes` readable
        // bytes that stay valid for this call (documented in `_core.pyi`).
        let bytes = unsafe { std::slice::from_raw_parts(src as *const u8, nbytes) };
        py.detach(|| self.with_writer(|w| w.write_expert(layer, expert, bytes)))
    }

    /// Registers a file written into `partial_dir`; its CRC-32 is checked
    /// when the store is opened, or, with `checked_by_reader`, by whoever
    /// reads it (the caller's reader must then check it).
    #[pyo3(signature = (name, checked_by_reader=false))]
    fn add_file(&self, name: &str, checked_by_reader: bool) -> PyResult<()> {
        self.with_writer(|w| w.add_file(name, checked_by_reader))
    }

    /// Syncs, writes the index, moves the store into place. Returns
    /// (experts, expert bytes, file bytes).
    fn finish(&self, py: Python<'_>) -> PyResult<(u64, u64, u64)> {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                MoeOffloadError::new_err("this store writer has finished or was aborted")
            })?;
        let summary = py.detach(|| writer.finish()).map_err(to_py)?;
        Ok((summary.experts, summary.expert_bytes, summary.file_bytes))
    }

    /// Drops the unfinished store: its partial output is removed.
    fn abort(&self, py: Python<'_>) {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(|| drop(writer));
    }
}
