//! Reading expert blobs from disk: [`ExpertStore`].
//!
//! A store opened from its index ([`ExpertStore::open`]) is checked before
//! anything is read: every file present with the size the index records,
//! every small file's CRC-32, every layer file's header ours, every blob
//! aligned and inside its file. Each read verifies the blob's CRC-32. A
//! damaged index (or a hostile one) is refused as such: names must be plain
//! file names, sizes and offsets are checked without overflow, and nothing
//! is allocated from a size the index states. A plain checkpoint whose
//! layout already keeps each expert's tensors in contiguous byte ranges can
//! be read in place ([`ExpertStore::from_extents`]): same reader, no
//! checksums (the checkpoint is trusted). Nothing here ever writes to the
//! files.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::writer::file_crc32;
use super::{
    layer_file_name, store_error, FileCheck, FileEntry, FileHeader, LayerIndex, StoreIndex, FORMAT,
    HEADER_BYTES, INDEX_FILE, PARTIAL_PREFIX, VERSION,
};
use crate::error::{CoreError, Result};
use crate::layout::{ExpertId, ExpertLayout};
use crate::tiers::BLOB_ALIGN;

/// `len` bytes at `offset` of file `file` land at `dst` inside the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub file: u32,
    pub offset: u64,
    pub len: u64,
    pub dst: u64,
}

/// One file the store reads, opened once.
struct StoreFile {
    path: PathBuf,
    size: u64,
    buffered: File,
    /// The same file opened with `O_DIRECT` (no page cache), unless the
    /// filesystem refused it.
    direct: Option<File>,
    /// Cleared the first time the filesystem rejects a direct read.
    direct_works: AtomicBool,
}

impl StoreFile {
    fn open(path: &Path, want_direct: bool) -> Result<Self> {
        let buffered = File::open(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => store_error(path, "is missing"),
            _ => store_error(path, format!("cannot be opened: {e}")),
        })?;
        let size = buffered
            .metadata()
            .map_err(|e| store_error(path, format!("cannot be inspected: {e}")))?
            .len();
        let direct = want_direct
            .then(|| {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten();
        Ok(Self {
            path: path.to_path_buf(),
            size,
            direct_works: AtomicBool::new(direct.is_some()),
            buffered,
            direct,
        })
    }

    /// Fills `buf` from `offset`: direct I/O when buffer, offset and length
    /// are aligned and the filesystem takes it, plain reads otherwise.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let aligned = [buf.as_ptr() as u64, offset, buf.len() as u64]
            .iter()
            .all(|n| n % BLOB_ALIGN as u64 == 0);
        if let Some(direct) = &self.direct {
            if aligned && self.direct_works.load(Ordering::Relaxed) {
                match direct.read_exact_at(buf, offset) {
                    // Some filesystems open O_DIRECT files but refuse the
                    // reads (EINVAL); some drivers' pinned memory cannot be
                    // a direct-I/O target (EFAULT). Plain reads work for both.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EFAULT)) => {
                        self.direct_works.store(false, Ordering::Relaxed);
                    }
                    outcome => return outcome,
                }
            }
        }
        self.buffered.read_exact_at(buf, offset)
    }
}

/// One expert's blob: where its bytes are, and its checksum when the store
/// has one (`(bytes covered, CRC-32)`).
struct Blob {
    extents: Vec<Extent>,
    checksum: Option<(u64, u32)>,
}

/// The experts on disk, read by any number of threads at once.
pub struct ExpertStore {
    root: PathBuf,
    files: Vec<StoreFile>,
    blobs: Vec<Blob>,
    layout: ExpertLayout,
    index: Option<StoreIndex>,
}

impl ExpertStore {
    /// Opens the store in `dir` and checks it (see the module doc).
    pub fn open(dir: &Path) -> Result<Self> {
        let index = read_index(dir)?;
        check_names(dir, &index)?;
        for entry in &index.files {
            check_file(dir, entry)?;
        }
        let mut files = Vec::new();
        let mut blobs = Vec::new();
        let mut layers = Vec::with_capacity(index.layers.len());
        for (l, layer) in index.layers.iter().enumerate() {
            let file = StoreFile::open(&dir.join(&layer.file), true)?;
            check_header(&file, l, index.store_id)?;
            let stride = check_layer_geometry(&file, l, layer)?;
            let file_id = files.len() as u32;
            blobs.extend(layer.blobs.iter().map(|b| Blob {
                extents: vec![Extent {
                    file: file_id,
                    offset: b.offset,
                    len: stride,
                    dst: 0,
                }],
                checksum: Some((layer.blob_bytes, b.crc32)),
            }));
            files.push(file);
            let experts = u32::try_from(layer.blobs.len()).map_err(|_| {
                store_error(
                    dir.join(INDEX_FILE),
                    format!("MoE layer {l} lists too many experts"),
                )
            })?;
            layers.push((experts, layer.blob_bytes as usize));
        }
        let layout = ExpertLayout::new(&layers)
            .map_err(|e| store_error(dir.join(INDEX_FILE), format!("is damaged: {e}")))?;
        Ok(Self {
            root: dir.to_path_buf(),
            files,
            blobs,
            layout,
            index: Some(index),
        })
    }

    /// Reads a checkpoint in place: `extents[id]` says where expert `id`'s
    /// bytes are in `files`. Checks that every file exists and holds every
    /// extent that points into it.
    pub fn from_extents(
        root: &Path,
        files: &[PathBuf],
        layers: &[(u32, usize)],
        extents: Vec<Vec<Extent>>,
    ) -> Result<Self> {
        let layout = ExpertLayout::new(layers)?;
        if extents.len() != layout.num_experts() {
            return Err(CoreError::InvalidConfig(format!(
                "{} extent lists for {} experts",
                extents.len(),
                layout.num_experts()
            )));
        }
        let files = files
            .iter()
            .map(|p| StoreFile::open(p, false))
            .collect::<Result<Vec<_>>>()?;
        let mut blobs = Vec::with_capacity(extents.len());
        for (id, list) in extents.into_iter().enumerate() {
            let (layer, expert) = layout.locate(id as ExpertId);
            for ext in &list {
                let file = files.get(ext.file as usize).ok_or_else(|| {
                    CoreError::InvalidConfig(format!(
                        "extent names file {} of {}",
                        ext.file,
                        files.len()
                    ))
                })?;
                let end = ext.offset + ext.len;
                if end > file.size {
                    return Err(store_error(
                        &file.path,
                        format!(
                            "is truncated: expert {expert} of MoE layer {layer} needs bytes {}..{end} but the file has {} bytes",
                            ext.offset, file.size
                        ),
                    ));
                }
                if ext.dst + ext.len > layout.bytes(id as ExpertId) as u64 {
                    return Err(CoreError::InvalidConfig(format!(
                        "an extent of expert {expert} of MoE layer {layer} ends past its {} byte blob",
                        layout.bytes(id as ExpertId)
                    )));
                }
            }
            blobs.push(Blob {
                extents: list,
                checksum: None,
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            blobs,
            layout,
            index: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layout(&self) -> &ExpertLayout {
        &self.layout
    }

    /// The index, for a store opened with [`open`](Self::open).
    pub fn index(&self) -> Option<&StoreIndex> {
        self.index.as_ref()
    }

    /// Whether reads bypass the page cache (a store on a filesystem that
    /// supports `O_DIRECT`).
    pub fn uses_direct_io(&self) -> bool {
        !self.files.is_empty()
            && self
                .files
                .iter()
                .all(|f| f.direct.is_some() && f.direct_works.load(Ordering::Relaxed))
    }

    /// Bytes a read of `id` writes into its destination (a store's blobs
    /// are read whole, padding included).
    pub fn span(&self, id: ExpertId) -> usize {
        self.blobs[id as usize]
            .extents
            .iter()
            .map(|e| (e.dst + e.len) as usize)
            .max()
            .unwrap_or(0)
    }

    /// The largest [`span`](Self::span): what a staging buffer must hold.
    pub fn max_span(&self) -> usize {
        (0..self.blobs.len() as ExpertId)
            .map(|id| self.span(id))
            .max()
            .unwrap_or(0)
    }

    /// Reads expert `id`'s blob into `dst` (at least [`span`](Self::span)
    /// bytes) and verifies its checksum.
    pub fn read(&self, id: ExpertId, dst: &mut [u8]) -> Result<()> {
        if dst.len() < self.span(id) {
            return Err(CoreError::Protocol(format!(
                "a {} byte buffer cannot take a {} byte blob",
                dst.len(),
                self.span(id)
            )));
        }
        let blob = &self.blobs[id as usize];
        for ext in &blob.extents {
            let file = &self.files[ext.file as usize];
            let range = ext.dst as usize..(ext.dst + ext.len) as usize;
            file.read_exact_at(&mut dst[range], ext.offset)
                .map_err(|e| self.read_error(id, ext, e))?;
        }
        if let Some((bytes, expected)) = blob.checksum {
            let actual = crc32fast::hash(&dst[..bytes as usize]);
            if actual != expected {
                let ext = &blob.extents[0];
                return Err(store_error(
                    &self.files[ext.file as usize].path,
                    format!(
                        "checksum mismatch in {} (bytes {}..{}): expected {expected:08x}, read {actual:08x}. \
                         The store is damaged. {}",
                        self.describe(id),
                        ext.offset,
                        ext.offset + bytes,
                        reconvert(&self.root)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn describe(&self, id: ExpertId) -> String {
        let (layer, expert) = self.layout.locate(id);
        match &self.index {
            Some(index) => format!(
                "expert {expert} of MoE layer {layer} ({})",
                index.layers[layer as usize].name
            ),
            None => format!("expert {expert} of MoE layer {layer}"),
        }
    }

    fn read_error(&self, id: ExpertId, ext: &Extent, e: std::io::Error) -> CoreError {
        let path = &self.files[ext.file as usize].path;
        let what = format!(
            "{} (bytes {}..{})",
            self.describe(id),
            ext.offset,
            ext.offset + ext.len
        );
        match e.kind() {
            ErrorKind::UnexpectedEof => {
                store_error(path, format!("is truncated: it ends inside {what}"))
            }
            _ => store_error(path, format!("reading {what} failed: {e}")),
        }
    }
}

/// Far above the index of the largest model (DeepSeek-V3's is under 2 MB):
/// a larger file is not read into memory.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The index of the store in `dir`, or an error saying what `dir` is instead.
fn read_index(dir: &Path) -> Result<StoreIndex> {
    if !dir.is_dir() {
        return Err(store_error(dir, "is not a directory"));
    }
    let path = dir.join(INDEX_FILE);
    let size = match std::fs::metadata(&path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(store_error(dir, missing_index(dir)));
        }
        Err(e) => return Err(store_error(&path, format!("cannot be read: {e}"))),
    };
    if size > MAX_INDEX_BYTES {
        return Err(store_error(
            &path,
            format!(
                "is {size} bytes, more than any store index ({MAX_INDEX_BYTES}); the store is damaged. {}",
                reconvert(dir)
            ),
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| store_error(&path, format!("cannot be read ({e}). {}", reconvert(dir))))?;
    let index: StoreIndex = serde_json::from_str(&text).map_err(|e| {
        store_error(
            &path,
            format!(
                "is damaged ({e}); the store cannot be used. {}",
                reconvert(dir)
            ),
        )
    })?;
    if index.format != FORMAT {
        return Err(store_error(&path, "is not a moe-offload store index"));
    }
    if index.version != VERSION {
        return Err(store_error(
            &path,
            format!(
                "has format version {}, this moe-offload reads version {VERSION}. {}",
                index.version,
                reconvert(dir)
            ),
        ));
    }
    Ok(index)
}

fn missing_index(dir: &Path) -> String {
    let partial = std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with(PARTIAL_PREFIX) || name == layer_file_name(0)
            })
        })
        .unwrap_or(false);
    if partial {
        format!(
            "is a half-written expert store: its index {INDEX_FILE} is missing, so a conversion did not \
             finish. It is not used; run `moe-offload convert` into it again (that replaces the partial output)"
        )
    } else {
        format!("is not a moe-offload expert store (it has no {INDEX_FILE})")
    }
}

fn missing_file(dir: &Path) -> String {
    format!("is missing from the store. {}", reconvert(dir))
}

fn reconvert(dir: &Path) -> String {
    format!(
        "Convert the checkpoint again: moe-offload convert CHECKPOINT {} --overwrite",
        dir.display()
    )
}

fn check_header(file: &StoreFile, layer: usize, store_id: u64) -> Result<()> {
    let mut page = vec![0u8; HEADER_BYTES as usize];
    file.buffered
        .read_exact_at(&mut page, 0)
        .map_err(|e| store_error(&file.path, format!("has no readable header: {e}")))?;
    let header = FileHeader::decode(&page).map_err(|reason| store_error(&file.path, reason))?;
    if header.layer as usize != layer || header.store_id != store_id {
        return Err(store_error(
            &file.path,
            format!(
                "belongs to another store or layer (header: layer {}, store {:016x}; index: layer {layer}, store {store_id:016x})",
                header.layer, header.store_id
            ),
        ));
    }
    Ok(())
}

/// Every file the index names is a plain name inside the store, listed
/// once, and each layer's file is listed as a blob file.
fn check_names(dir: &Path, index: &StoreIndex) -> Result<()> {
    let damaged = |reason: String| {
        Err(store_error(
            dir.join(INDEX_FILE),
            format!("is damaged: {reason}. {}", reconvert(dir)),
        ))
    };
    let mut seen = std::collections::HashSet::new();
    for entry in &index.files {
        let plain = !entry.name.is_empty()
            && !entry.name.contains(['/', '\0'])
            && entry.name != "."
            && entry.name != ".."
            && entry.name != INDEX_FILE;
        if !plain {
            return damaged(format!("it lists a file named {:?}", entry.name));
        }
        if !seen.insert(entry.name.as_str()) {
            return damaged(format!("it lists {} twice", entry.name));
        }
        if entry.check != FileCheck::Blobs && entry.crc32.is_none() {
            return damaged(format!("it records no checksum for {}", entry.name));
        }
    }
    let mut layer_files = std::collections::HashSet::new();
    for (l, layer) in index.layers.iter().enumerate() {
        let listed = index
            .files
            .iter()
            .any(|f| f.name == layer.file && f.check == FileCheck::Blobs);
        if !listed || !layer_files.insert(layer.file.as_str()) {
            return damaged(format!(
                "it names {:?} for MoE layer {l} but lists no such blob file (or names it twice)",
                layer.file
            ));
        }
    }
    Ok(())
}

/// A file of the store has the size the index records and, when it is
/// checked at open, the CRC-32.
fn check_file(dir: &Path, entry: &FileEntry) -> Result<()> {
    let path = dir.join(&entry.name);
    let file = File::open(&path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => store_error(&path, missing_file(dir)),
        _ => store_error(&path, format!("cannot be opened: {e}")),
    })?;
    let size = file
        .metadata()
        .map_err(|e| store_error(&path, format!("cannot be inspected: {e}")))?
        .len();
    if size != entry.bytes {
        return Err(store_error(
            &path,
            format!(
                "is {size} bytes but the store's index says {}: the file was truncated or replaced. {}",
                entry.bytes,
                reconvert(dir)
            ),
        ));
    }
    let (Some(expected), FileCheck::Open) = (entry.crc32, entry.check) else {
        return Ok(());
    };
    let (_, actual) =
        file_crc32(file).map_err(|e| store_error(&path, format!("cannot be read: {e}")))?;
    if actual != expected {
        return Err(store_error(
            &path,
            format!(
                "checksum mismatch: expected {expected:08x}, read {actual:08x}; the file was changed or damaged. {}",
                reconvert(dir)
            ),
        ));
    }
    Ok(())
}

/// Checks where a layer's blobs lie; returns the stride.
fn check_layer_geometry(file: &StoreFile, l: usize, layer: &LayerIndex) -> Result<u64> {
    let bad = |reason: String| Err(store_error(&file.path, reason));
    let stride = layer
        .blob_bytes
        .checked_next_multiple_of(BLOB_ALIGN as u64)
        .filter(|&stride| layer.blob_bytes > 0 && stride == layer.stride && stride <= file.size);
    let Some(stride) = stride else {
        return bad(format!(
            "MoE layer {l}: blobs of {} bytes with a stride of {} (expected the size rounded up to 4 KiB, within the file's {} bytes)",
            layer.blob_bytes, layer.stride, file.size
        ));
    };
    for (expert, blob) in layer.blobs.iter().enumerate() {
        if blob.offset < HEADER_BYTES || blob.offset % BLOB_ALIGN as u64 != 0 {
            return bad(format!(
                "expert {expert} of MoE layer {l} starts at byte {}, which is not a 4 KiB boundary after the header",
                blob.offset
            ));
        }
        let end = blob
            .offset
            .checked_add(stride)
            .filter(|&end| end <= file.size);
        if end.is_none() {
            return bad(format!(
                "is truncated: expert {expert} of MoE layer {l} needs bytes {}..{} but the file has {} bytes",
                blob.offset,
                blob.offset.saturating_add(stride),
                file.size
            ));
        }
    }
    Ok(stride)
}
