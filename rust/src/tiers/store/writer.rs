//! Writing a store: [`StoreWriter`].
//!
//! Crash safety: everything is written into a staging directory
//! `DIR/.partial-PID/` (blob files preallocated, so a full disk fails at the
//! start); [`finish`](StoreWriter::finish) syncs every file, writes the index,
//! and renames the files into `DIR`, the index last. A store without its
//! index is never used (the reader refuses it), so a crash at any point
//! leaves either the previous state or a detectably incomplete one. A writer
//! dropped before `finish` (an error, an interrupt) removes its staging
//! directory, and `DIR` too when it created it.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    align_to, layer_file_name, store_error, BlobIndex, FileEntry, FileHeader, LayerIndex,
    StoreIndex, TensorIndex, FORMAT, HEADER_BYTES, INDEX_FILE, PARTIAL_PREFIX, VERSION,
};
use crate::error::{CoreError, Result};
use crate::tiers::BLOB_ALIGN;

/// What one MoE layer's blobs hold.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub name: String,
    pub experts: u32,
    pub blob_bytes: u64,
    pub tensors: Vec<TensorIndex>,
}

/// What a finished store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSummary {
    pub experts: u64,
    /// Meaningful blob bytes (what the model's experts weigh).
    pub expert_bytes: u64,
    /// Bytes of every file of the store, index excluded.
    pub file_bytes: u64,
}

struct LayerFile {
    spec: LayerSpec,
    name: String,
    file: File,
    stride: u64,
    crc: Vec<Option<u32>>,
}

/// Writes a store into a directory; see the module doc.
pub struct StoreWriter {
    dir: PathBuf,
    partial: PathBuf,
    created_dir: bool,
    overwrite: bool,
    store_id: u64,
    layers: Vec<LayerFile>,
    extra: Vec<String>,
    meta: serde_json::Value,
    needed_bytes: u64,
    /// The staging directory is ours (created by this writer).
    staged: bool,
    finished: bool,
}

impl StoreWriter {
    /// Starts a store in `dir` (created if absent). Refuses a directory with
    /// other content unless `overwrite`, in which case a complete store
    /// there is replaced when this one finishes.
    pub fn create(
        dir: &Path,
        layers: Vec<LayerSpec>,
        meta: serde_json::Value,
        overwrite: bool,
    ) -> Result<Self> {
        check_specs(&layers)?;
        let needed_bytes = layers
            .iter()
            .map(|l| {
                HEADER_BYTES + u64::from(l.experts) * align_to(l.blob_bytes, BLOB_ALIGN as u64)
            })
            .sum();
        let created_dir = !dir.exists();
        fs::create_dir_all(dir)
            .map_err(|e| io_error(dir, "creating the directory", e, needed_bytes))?;
        let partial = dir.join(format!("{PARTIAL_PREFIX}{}", std::process::id()));
        let mut writer = Self {
            dir: dir.to_path_buf(),
            partial,
            created_dir,
            overwrite,
            store_id: RandomState::new().build_hasher().finish(),
            layers: Vec::with_capacity(layers.len()),
            extra: Vec::new(),
            meta,
            needed_bytes,
            staged: false,
            finished: false,
        };
        clear_stale_partials(dir)?;
        if !overwrite && has_content(dir)? {
            return Err(store_error(
                dir,
                "already exists and is not empty; choose another directory, or replace the store in it \
                 (moe-offload convert --overwrite, or overwrite=True)",
            ));
        }
        fs::create_dir(&writer.partial).map_err(|e| {
            io_error(
                &writer.partial,
                "creating the staging directory",
                e,
                needed_bytes,
            )
        })?;
        writer.staged = true;
        for (l, spec) in layers.into_iter().enumerate() {
            let layer = writer.create_layer_file(l, spec)?;
            writer.layers.push(layer);
        }
        Ok(writer)
    }

    /// Where the caller puts extra files before [`add_file`](Self::add_file).
    pub fn partial_dir(&self) -> &Path {
        &self.partial
    }

    /// Bytes the blob files take on disk.
    pub fn needed_bytes(&self) -> u64 {
        self.needed_bytes
    }

    fn create_layer_file(&self, l: usize, spec: LayerSpec) -> Result<LayerFile> {
        let name = layer_file_name(l);
        let path = self.partial.join(&name);
        let stride = align_to(spec.blob_bytes, BLOB_ALIGN as u64);
        let len = HEADER_BYTES + u64::from(spec.experts) * stride;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(&path, "creating the file", e, self.needed_bytes))?;
        reserve(&file, len)
            .map_err(|e| io_error(&path, "reserving space", e, self.needed_bytes))?;
        let header = FileHeader {
            version: VERSION,
            layer: l as u32,
            store_id: self.store_id,
        };
        file.write_all_at(&header.encode(), 0)
            .map_err(|e| io_error(&path, "writing the header", e, self.needed_bytes))?;
        Ok(LayerFile {
            crc: vec![None; spec.experts as usize],
            spec,
            name,
            file,
            stride,
        })
    }

    /// Writes expert `expert` of MoE layer `layer`: exactly its blob bytes.
    pub fn write_expert(&mut self, layer: usize, expert: usize, data: &[u8]) -> Result<()> {
        let needed = self.needed_bytes;
        let target = self
            .layers
            .get_mut(layer)
            .filter(|l| expert < l.crc.len())
            .ok_or_else(|| {
                CoreError::InvalidConfig(format!("no expert {expert} in MoE layer {layer}"))
            })?;
        if data.len() as u64 != target.spec.blob_bytes {
            return Err(CoreError::InvalidConfig(format!(
                "expert {expert} of MoE layer {layer}: {} bytes given, its blob holds {}",
                data.len(),
                target.spec.blob_bytes
            )));
        }
        let offset = HEADER_BYTES + expert as u64 * target.stride;
        let path = self.partial.join(&target.name);
        target
            .file
            .write_all_at(data, offset)
            .map_err(|e| io_error(&path, "writing an expert", e, needed))?;
        target.crc[expert] = Some(crc32fast::hash(data));
        Ok(())
    }

    /// Registers a file the caller wrote into [`partial_dir`](Self::partial_dir);
    /// it is synced, size-checked on open, and moved into place with the rest.
    pub fn add_file(&mut self, name: &str) -> Result<()> {
        let reserved = name == INDEX_FILE || self.layers.iter().any(|l| l.name == name);
        if name.is_empty() || name.contains('/') || name.starts_with('.') || reserved {
            return Err(CoreError::InvalidConfig(format!(
                "{name:?} cannot be a file of the store"
            )));
        }
        if !self.partial.join(name).is_file() {
            return Err(store_error(
                self.partial.join(name),
                "was registered but not written",
            ));
        }
        if !self.extra.iter().any(|n| n == name) {
            self.extra.push(name.to_string());
        }
        Ok(())
    }

    /// Syncs everything, writes the index and moves the store into place.
    pub fn finish(mut self) -> Result<StoreSummary> {
        let missing = self
            .layers
            .iter()
            .enumerate()
            .find_map(|(l, layer)| layer.crc.iter().position(Option::is_none).map(|e| (l, e)));
        if let Some((l, e)) = missing {
            return Err(store_error(
                &self.dir,
                format!("expert {e} of MoE layer {l} was never written; the store is incomplete"),
            ));
        }
        let files = self.sync_files()?;
        let summary = StoreSummary {
            experts: self.layers.iter().map(|l| u64::from(l.spec.experts)).sum(),
            expert_bytes: self
                .layers
                .iter()
                .map(|l| u64::from(l.spec.experts) * l.spec.blob_bytes)
                .sum(),
            file_bytes: files.iter().map(|f| f.bytes).sum(),
        };
        let index = StoreIndex {
            format: FORMAT.to_string(),
            version: VERSION,
            store_id: self.store_id,
            layers: self.layers.iter().map(layer_index).collect(),
            files,
            meta: std::mem::take(&mut self.meta),
        };
        self.write_index(&index)?;
        self.move_into_place(&index)?;
        self.finished = true;
        // Best effort: the store is complete whether or not this succeeds.
        let _ = fs::remove_dir(&self.partial);
        Ok(summary)
    }

    fn sync_files(&self) -> Result<Vec<FileEntry>> {
        let mut entries = Vec::new();
        for layer in &self.layers {
            let path = self.partial.join(&layer.name);
            layer
                .file
                .sync_all()
                .map_err(|e| io_error(&path, "syncing", e, self.needed_bytes))?;
            entries.push(FileEntry {
                name: layer.name.clone(),
                bytes: file_size(&path)?,
            });
        }
        for name in &self.extra {
            let path = self.partial.join(name);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error(&path, "syncing", e, self.needed_bytes))?;
            entries.push(FileEntry {
                name: name.clone(),
                bytes: file_size(&path)?,
            });
        }
        Ok(entries)
    }

    fn write_index(&self, index: &StoreIndex) -> Result<()> {
        let path = self.partial.join(INDEX_FILE);
        let text = serde_json::to_vec_pretty(index).map_err(|e| {
            CoreError::InvalidConfig(format!("the store's metadata cannot be written: {e}"))
        })?;
        let mut file =
            File::create(&path).map_err(|e| io_error(&path, "creating the index", e, 0))?;
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error(&path, "writing the index", e, 0))?;
        sync_dir(&self.partial)
    }

    /// Renames the staged files into the directory, the index last; with
    /// `overwrite`, the old index goes first so the old store stops being
    /// one before any of its files is replaced.
    fn move_into_place(&self, index: &StoreIndex) -> Result<()> {
        if self.overwrite {
            remove_old_store(&self.dir)?;
        }
        for entry in &index.files {
            rename(&self.partial.join(&entry.name), &self.dir.join(&entry.name))?;
        }
        sync_dir(&self.dir)?;
        rename(&self.partial.join(INDEX_FILE), &self.dir.join(INDEX_FILE))?;
        sync_dir(&self.dir)
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Unfinished: take back everything this writer put on disk.
        if self.staged {
            let _ = fs::remove_dir_all(&self.partial);
        }
        if self.created_dir {
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

fn check_specs(layers: &[LayerSpec]) -> Result<()> {
    if layers.is_empty() {
        return Err(CoreError::InvalidConfig(
            "a store needs at least one MoE layer".into(),
        ));
    }
    match layers
        .iter()
        .position(|l| l.experts == 0 || l.blob_bytes == 0)
    {
        Some(l) => Err(CoreError::InvalidConfig(format!(
            "MoE layer {l} has {} experts of {} bytes; both must be positive",
            layers[l].experts, layers[l].blob_bytes
        ))),
        None => Ok(()),
    }
}

fn layer_index(layer: &LayerFile) -> LayerIndex {
    LayerIndex {
        name: layer.spec.name.clone(),
        file: layer.name.clone(),
        blob_bytes: layer.spec.blob_bytes,
        stride: layer.stride,
        tensors: layer.spec.tensors.clone(),
        blobs: layer
            .crc
            .iter()
            .enumerate()
            .map(|(e, crc)| BlobIndex {
                offset: HEADER_BYTES + e as u64 * layer.stride,
                crc32: crc.expect("finish checked every expert was written"),
            })
            .collect(),
    }
}

/// Allocates `len` bytes for `file` now, so a full disk fails before any
/// expert is written; filesystems without `fallocate` get a sparse file.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "file too large"))?;
    // SAFETY: `fallocate` only reads its integer arguments; the descriptor
    // belongs to `file`, which outlives the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len as u64),
        _ => Err(error),
    }
}

/// Removes staging directories left by writers that no longer run; refuses
/// to go on while another live process writes into `dir`.
fn clear_stale_partials(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, "listing the directory", e, 0))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PARTIAL_PREFIX) else {
            continue;
        };
        match pid.parse::<i32>() {
            Ok(pid) if process_alive(pid) => {
                return Err(store_error(
                    dir,
                    format!("another conversion (process {pid}) is writing into it; wait for it to finish"),
                ));
            }
            _ => {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 performs only the existence and permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn has_content(dir: &Path) -> Result<bool> {
    let mut entries =
        fs::read_dir(dir).map_err(|e| io_error(dir, "listing the directory", e, 0))?;
    Ok(entries.any(|e| {
        e.map(|e| !e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX))
            .unwrap_or(true)
    }))
}

/// Unmakes the store in `dir`: its index first, then the files it listed.
fn remove_old_store(dir: &Path) -> Result<()> {
    let index_path = dir.join(INDEX_FILE);
    let old: Option<StoreIndex> = fs::read_to_string(&index_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    match fs::remove_file(&index_path) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&index_path, "removing the old index", e, 0)),
    }
    for entry in old.map(|i| i.files).unwrap_or_default() {
        if !entry.name.contains('/') {
            let _ = fs::remove_file(dir.join(&entry.name));
        }
    }
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| io_error(to, "moving the file into place", e, 0))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "syncing the directory", e, 0))
}

fn file_size(path: &Path) -> Result<u64> {
    fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| io_error(path, "inspecting", e, 0))
}

/// An I/O error while `doing` something to `path`; a full disk says so and
/// what the store needs.
fn io_error(path: &Path, doing: &str, e: std::io::Error, needed: u64) -> CoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return store_error(
            path,
            format!(
                "no space left on the device while {doing} (the expert blobs alone need {needed} bytes). \
                 Free space or choose another directory; the partial output is removed"
            ),
        );
    }
    store_error(path, format!("{doing} failed: {e}"))
}
