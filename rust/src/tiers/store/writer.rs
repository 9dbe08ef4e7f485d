//! Writing a store: [`StoreWriter`].
//!
//! Crash safety: everything is written into a staging directory beside the
//! store (see [`commit`](super::commit)); blob files are preallocated, so a
//! full disk fails at the start. [`finish`](StoreWriter::finish) syncs every
//! file, checksums the files the caller added, writes the index and swaps
//! the staging directory with the store's in one rename, so the directory
//! always holds one complete store (or, before the first, none). A writer
//! dropped before `finish` (an error, an interrupt) removes its staging
//! directory; one that is killed leaves it to the next writer, which removes
//! it.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::commit::Staging;
use super::{
    align_to, layer_file_name, store_error, BlobIndex, FileCheck, FileEntry, FileHeader,
    LayerIndex, StoreIndex, TensorIndex, FORMAT, HEADER_BYTES, INDEX_FILE, VERSION,
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
    /// `None` once committed.
    staging: Option<Staging>,
    store_id: u64,
    layers: Vec<LayerFile>,
    /// Files the caller added, and how they are checked.
    extra: Vec<(String, FileCheck)>,
    meta: serde_json::Value,
    needed_bytes: u64,
}

impl StoreWriter {
    /// Starts a store in `dir` (created if absent). Refuses a directory with
    /// other content unless `overwrite`, in which case a store there is
    /// replaced when this one finishes.
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
                let stride = align_to(l.blob_bytes, BLOB_ALIGN as u64);
                HEADER_BYTES.saturating_add(u64::from(l.experts).saturating_mul(stride))
            })
            .fold(0u64, u64::saturating_add);
        let staging = Staging::begin(dir, overwrite, &|path, doing, e| {
            io_error(path, doing, e, needed_bytes)
        })?;
        let mut writer = Self {
            dir: dir.to_path_buf(),
            partial: staging.dir().to_path_buf(),
            staging: Some(staging),
            store_id: RandomState::new().build_hasher().finish(),
            layers: Vec::with_capacity(layers.len()),
            extra: Vec::new(),
            meta,
            needed_bytes,
        };
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
    /// it is synced, checksummed and moved into place with the rest. Its
    /// CRC-32 is checked when the store is opened, unless
    /// `checked_by_reader`: then whoever reads it checks it as it reads (for
    /// files too large to read twice).
    pub fn add_file(&mut self, name: &str, checked_by_reader: bool) -> Result<()> {
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
        let check = if checked_by_reader {
            FileCheck::Reader
        } else {
            FileCheck::Open
        };
        match self.extra.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = check,
            None => self.extra.push((name.to_string(), check)),
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
        self.staging
            .take()
            .expect("a writer is finished once")
            .commit()?;
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
                crc32: None,
                check: FileCheck::Blobs,
            });
        }
        for (name, check) in &self.extra {
            let path = self.partial.join(name);
            let (bytes, crc32) = File::open(&path)
                .and_then(|f| {
                    f.sync_all()?;
                    file_crc32(f)
                })
                .map_err(|e| io_error(&path, "syncing and checksumming", e, self.needed_bytes))?;
            entries.push(FileEntry {
                name: name.clone(),
                bytes,
                crc32: Some(crc32),
                check: *check,
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
            .map_err(|e| io_error(&path, "writing the index", e, 0))
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

/// Size and CRC-32 of a whole file, read in 1 MiB pieces.
pub(super) fn file_crc32(mut file: File) -> std::io::Result<(u64, u32)> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((bytes, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
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
