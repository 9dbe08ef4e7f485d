//! [`ActivationCollection`] (EAMC): a bounded set of past requests' activation
//! matrices, the representatives of the workload that live requests are
//! matched against. Persisted to a versioned, checksummed file so a restarted
//! process starts warm.
//!
//! Storage is column-major over entries: for each (layer, expert) cell, the
//! values of all K entries are contiguous, so a matcher's per-token update
//! (one cell per routed expert) is a vectorisable sweep over K floats.
//!
//! The file (little endian): magic, version, layers L, experts E, capacity,
//! entries, replacement rule and, from version 2, the number D of the
//! planner's affinity tables; then each entry's L·E counts (u32), match
//! count (u32) and sequence number (u64); from version 2 the D·L·E·E table
//! values (f32); then a CRC-32 of all of that. Version 1 files (no tables)
//! still load; the planner relearns their tables from traffic.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::eam::ActivationMatrix;
use super::sizing;
use crate::error::{CoreError, Result};

const MAGIC: &[u8; 8] = b"MOEEAMC\0";
/// The version this build writes, and the newest it reads.
const VERSION: u32 = 2;
/// Version 1: no affinity tables, and a header without their count.
const VERSION_1: u32 = 1;
/// Magic, six words (version, layers, experts, capacity, entries,
/// replacement rule) and, from version 2, the table count.
const HEADER_BYTES: usize = 8 + 4 * 6 + 4;
const HEADER_BYTES_V1: usize = HEADER_BYTES - 4;

/// The most entries an EAMC holds. Matching sweeps every entry once per
/// routed expert (68 µs per layer at K = 10,000 on DeepSeek-V2-Lite's
/// shape), so a collection a hundred times larger could not keep up with a
/// model; the cap turns a mistyped capacity or a corrupt header into an
/// error before anything is allocated.
pub const MAX_CAPACITY: usize = 1_000_000;

/// Bytes a collection of this shape holds: K·L·E cells and two K·L layer
/// sums (f32), and a match count and sequence number per entry.
fn footprint(capacity: usize, layers: usize, experts: usize) -> Option<usize> {
    let cells = capacity.checked_mul(layers)?.checked_mul(experts)?;
    let layer_sums = capacity.checked_mul(layers)?.checked_mul(2)?;
    let floats = sizing::bytes_of(cells.checked_add(layer_sums)?, 4)?;
    floats.checked_add(sizing::bytes_of(capacity, 12)?)
}

/// The largest capacity a collection of `layers` × `experts` may have on
/// this machine: [`MAX_CAPACITY`], or fewer where that many entries would
/// take more than [`sizing::memory_limit`]. Callers that take a capacity
/// from a user check it against this, to name their own argument.
pub fn max_capacity(layers: usize, experts: usize) -> usize {
    let Some(entry) = footprint(1, layers, experts).filter(|&bytes| bytes > 0) else {
        return 0;
    };
    MAX_CAPACITY.min(sizing::memory_limit() / entry)
}

/// Whether a collection of this shape may be allocated: positive sizes, at
/// most [`MAX_CAPACITY`] entries, sizes the file format can store, and at
/// most `max_bytes` in all.
fn check_shape(
    capacity: usize,
    layers: usize,
    experts: usize,
    max_bytes: usize,
) -> std::result::Result<(), String> {
    if capacity == 0 || layers == 0 || experts == 0 {
        return Err(format!(
            "an EAMC needs positive capacity, layers and experts (got {capacity}, {layers}, {experts})"
        ));
    }
    if capacity > MAX_CAPACITY {
        return Err(format!(
            "an EAMC capacity of {capacity} entries is above the limit of {MAX_CAPACITY}"
        ));
    }
    if u32::try_from(layers).is_err() || u32::try_from(experts).is_err() {
        return Err(format!(
            "{layers} layers of {experts} experts do not fit the EAMC file's 32-bit fields"
        ));
    }
    let what = format!("an EAMC of {capacity} entries of {layers}x{experts} counts");
    sizing::check_fits(&what, footprint(capacity, layers, experts), max_bytes)
}

/// Values in `tables` affinity tables of `layers` × `experts` × `experts`,
/// or None when that overflows.
fn table_values(tables: usize, layers: usize, experts: usize) -> Option<usize> {
    tables
        .checked_mul(layers)?
        .checked_mul(experts)?
        .checked_mul(experts)
}

/// Whether `tables` affinity tables of this shape may be held: fewer than
/// the layers (a table links layer l to l + d of the same token), and at
/// most `max_bytes`.
fn check_tables(
    tables: usize,
    layers: usize,
    experts: usize,
    max_bytes: usize,
) -> std::result::Result<(), String> {
    if tables > 0 && tables >= layers {
        return Err(format!(
            "{tables} affinity tables for {layers} layers (a table links layer l to l + d, d < {layers})"
        ));
    }
    let what = format!("{tables} affinity tables of {layers}x{experts}x{experts}");
    let bytes = table_values(tables, layers, experts).and_then(|n| sizing::bytes_of(n, 4));
    sizing::check_fits(&what, bytes, max_bytes)
}

/// Table values are token counts: a negative or non-finite one would turn
/// the planner's predictions into NaN.
fn check_table_values(values: &[f32]) -> std::result::Result<(), String> {
    match values.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
        Some(i) => Err(format!(
            "affinity table value {i} is {}, not a count",
            values[i]
        )),
        None => Ok(()),
    }
}

/// The planner's direct co-activation tables as an EAMC file holds them:
/// [`tables`](Self::tables) tables of L·E·E token counts in the planner's
/// layout, `[((d - 1) * L + l) * E * E + a * E + b]` for d = 1..=tables.
#[derive(Debug, Clone, PartialEq)]
pub struct AffinityTables {
    tables: usize,
    values: Vec<f32>,
}

impl AffinityTables {
    pub fn tables(&self) -> usize {
        self.tables
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }
}

/// Which entry a full collection gives up for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replacement {
    /// The oldest entry.
    Oldest,
    /// The entry that was a live request's best match least often (the
    /// reference implementation's rule).
    LeastMatched,
    /// The entry most similar to the newcomer: near-duplicates make way, so
    /// the collection stays diverse.
    MostSimilar,
}

impl Replacement {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "oldest" => Ok(Self::Oldest),
            "least-matched" => Ok(Self::LeastMatched),
            "most-similar" => Ok(Self::MostSimilar),
            other => Err(CoreError::InvalidConfig(format!(
                "unknown EAMC replacement {other:?}; use oldest, least-matched or most-similar"
            ))),
        }
    }

    fn code(self) -> u32 {
        match self {
            Self::Oldest => 0,
            Self::LeastMatched => 1,
            Self::MostSimilar => 2,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        [Self::Oldest, Self::LeastMatched, Self::MostSimilar]
            .into_iter()
            .find(|r| r.code() == code)
    }
}

/// The expert activation matrix collection.
#[derive(Debug, Clone)]
pub struct ActivationCollection {
    layers: usize,
    experts: usize,
    capacity: usize,
    len: usize,
    replacement: Replacement,
    /// `cells[(l * E + e) * K + k]`: entry k's count at (l, e).
    cells: Vec<f32>,
    /// `layer_norm2[l * K + k]`: squared norm of entry k's row l.
    layer_norm2: Vec<f32>,
    /// `row_sum[l * K + k]`: tokens of entry k at layer l.
    row_sum: Vec<f32>,
    matched: Vec<u32>,
    inserted: Vec<u64>,
    next_seq: u64,
    /// The planner's tables read with the collection, kept until a planner
    /// takes them so that a load and a save keep them.
    affinity: Option<AffinityTables>,
}

impl ActivationCollection {
    /// An empty collection of `capacity` entries of `layers` × `experts`
    /// counts. The capacity is at most [`MAX_CAPACITY`], and the collection
    /// at most half of this machine's memory: checked before allocating.
    pub fn new(
        capacity: usize,
        layers: usize,
        experts: usize,
        replacement: Replacement,
    ) -> Result<Self> {
        check_shape(capacity, layers, experts, sizing::memory_limit()).map_err(|reason| {
            CoreError::InvalidConfig(format!(
                "{reason} (eamc_capacity sets the capacity; the default is 1000)"
            ))
        })?;
        Self::allocate(capacity, layers, experts, replacement)
    }

    /// The storage of a collection whose shape [`check_shape`] accepted.
    fn allocate(
        capacity: usize,
        layers: usize,
        experts: usize,
        replacement: Replacement,
    ) -> Result<Self> {
        let what = "the EAMC";
        Ok(Self {
            layers,
            experts,
            capacity,
            len: 0,
            replacement,
            cells: sizing::zeroed(layers * experts * capacity, what)?,
            layer_norm2: sizing::zeroed(layers * capacity, what)?,
            row_sum: sizing::zeroed(layers * capacity, what)?,
            matched: sizing::zeroed(capacity, what)?,
            inserted: sizing::zeroed(capacity, what)?,
            next_seq: 0,
            affinity: None,
        })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn replacement(&self) -> Replacement {
        self.replacement
    }

    /// The planner's affinity tables read with the collection from a
    /// version 2 file, until [`take_affinity`](Self::take_affinity).
    pub fn affinity(&self) -> Option<&AffinityTables> {
        self.affinity.as_ref()
    }

    /// Takes the tables read with the collection: a planner built from it
    /// starts from them.
    pub fn take_affinity(&mut self) -> Option<AffinityTables> {
        self.affinity.take()
    }

    /// Entry values of all K entries at (layer, expert); only the first
    /// `len()` are meaningful.
    pub fn cell(&self, layer: usize, expert: usize) -> &[f32] {
        let start = (layer * self.experts + expert) * self.capacity;
        &self.cells[start..start + self.capacity]
    }

    pub fn value(&self, entry: usize, layer: usize, expert: usize) -> f32 {
        self.cells[(layer * self.experts + expert) * self.capacity + entry]
    }

    pub fn layer_norms2(&self, layer: usize) -> &[f32] {
        &self.layer_norm2[layer * self.capacity..(layer + 1) * self.capacity]
    }

    pub fn row_sum(&self, entry: usize, layer: usize) -> f32 {
        self.row_sum[layer * self.capacity + entry]
    }

    /// Entry `entry` as a matrix.
    pub fn entry(&self, entry: usize) -> ActivationMatrix {
        let counts = (0..self.layers * self.experts)
            .map(|cell| self.cells[cell * self.capacity + entry] as u32)
            .collect();
        ActivationMatrix::from_counts(self.layers, self.experts, counts)
            .expect("shape is consistent")
    }

    /// Notes that `entry` was a live request's best match.
    pub fn note_match(&mut self, entry: usize) {
        self.matched[entry] = self.matched[entry].saturating_add(1);
    }

    /// Adds a finished request's matrix; returns the index it took (a
    /// replaced entry's index when full). Empty matrices are not kept.
    pub fn insert(&mut self, eam: &ActivationMatrix) -> Result<Option<usize>> {
        if eam.layers() != self.layers || eam.experts() != self.experts {
            return Err(CoreError::InvalidConfig(format!(
                "an activation matrix of {}x{} does not fit an EAMC of {}x{}",
                eam.layers(),
                eam.experts(),
                self.layers,
                self.experts
            )));
        }
        if eam.is_empty() {
            return Ok(None);
        }
        let index = if self.len < self.capacity {
            self.len += 1;
            self.len - 1
        } else {
            self.victim(eam)
        };
        self.write(index, eam.counts());
        Ok(Some(index))
    }

    fn victim(&self, newcomer: &ActivationMatrix) -> usize {
        let entries = 0..self.len;
        match self.replacement {
            Replacement::Oldest => entries.min_by_key(|&k| self.inserted[k]),
            Replacement::LeastMatched => {
                entries.min_by_key(|&k| (self.matched[k], self.inserted[k]))
            }
            Replacement::MostSimilar => {
                let sims = self.similarities(newcomer);
                entries.max_by(|&a, &b| sims[a].total_cmp(&sims[b]))
            }
        }
        .expect("a full collection has entries")
    }

    /// Cosine similarity of `eam` with every entry over all layers.
    pub fn similarities(&self, eam: &ActivationMatrix) -> Vec<f32> {
        let mut dots = vec![0.0f32; self.capacity];
        for layer in 0..self.layers {
            for (expert, &count) in eam.row(layer).iter().enumerate() {
                if count > 0 {
                    let c = count as f32;
                    for (dot, &v) in dots.iter_mut().zip(self.cell(layer, expert)) {
                        *dot += c * v;
                    }
                }
            }
        }
        let own = eam
            .counts()
            .iter()
            .map(|&c| (c as f32).powi(2))
            .sum::<f32>()
            .sqrt();
        (0..self.capacity)
            .map(|k| {
                let norm = (0..self.layers)
                    .map(|l| self.layer_norm2[l * self.capacity + k])
                    .sum::<f32>()
                    .sqrt();
                if own > 0.0 && norm > 0.0 {
                    dots[k] / (own * norm)
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn write(&mut self, index: usize, counts: &[u32]) {
        for layer in 0..self.layers {
            let row = &counts[layer * self.experts..(layer + 1) * self.experts];
            let mut norm2 = 0.0f32;
            let mut sum = 0.0f32;
            for (expert, &c) in row.iter().enumerate() {
                let v = c as f32;
                self.cells[(layer * self.experts + expert) * self.capacity + index] = v;
                norm2 += v * v;
                sum += v;
            }
            self.layer_norm2[layer * self.capacity + index] = norm2;
            self.row_sum[layer * self.capacity + index] = sum;
        }
        self.matched[index] = 0;
        self.inserted[index] = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
    }

    /// Writes the collection to `path` atomically: a temporary file in the
    /// same directory, synced, renamed over `path`, then the directory
    /// synced. A save killed half-way leaves the old file intact, and its
    /// temporary is removed by the next save.
    /// The tables read with the collection, if any, are written with it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (dir, name) = save_target(path)?;
        write_atomically(&dir, &name, path, &self.to_bytes())
            .map_err(|e| file_error(path, &format!("cannot write: {e}")))
    }

    /// Like [`save`](Self::save), with a planner's `tables` affinity tables
    /// (`values` in the layout of [`AffinityTables`]) in place of any the
    /// collection was read with.
    pub fn save_with_affinity(&self, path: &Path, tables: usize, values: &[f32]) -> Result<()> {
        let (layers, experts) = (self.layers, self.experts);
        if table_values(tables, layers, experts) != Some(values.len()) {
            return Err(CoreError::InvalidConfig(format!(
                "{} values are not {tables} affinity tables of {layers}x{experts}x{experts}",
                values.len()
            )));
        }
        check_tables(tables, layers, experts, usize::MAX)
            .and_then(|()| check_table_values(values))
            .map_err(CoreError::InvalidConfig)?;
        let (dir, name) = save_target(path)?;
        write_atomically(&dir, &name, path, &self.to_bytes_with(tables, values))
            .map_err(|e| file_error(path, &format!("cannot write: {e}")))
    }

    fn to_bytes(&self) -> Vec<u8> {
        match &self.affinity {
            Some(saved) => self.to_bytes_with(saved.tables, &saved.values),
            None => self.to_bytes_with(0, &[]),
        }
    }

    fn to_bytes_with(&self, tables: usize, values: &[f32]) -> Vec<u8> {
        let entry_bytes = self.layers * self.experts * 4 + 12;
        let mut out =
            Vec::with_capacity(HEADER_BYTES + self.len * entry_bytes + values.len() * 4 + 4);
        out.extend_from_slice(MAGIC);
        for v in [
            VERSION,
            self.layers as u32,
            self.experts as u32,
            self.capacity as u32,
            self.len as u32,
            self.replacement.code(),
            tables as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for k in 0..self.len {
            for cell in 0..self.layers * self.experts {
                out.extend_from_slice(&(self.cells[cell * self.capacity + k] as u32).to_le_bytes());
            }
            out.extend_from_slice(&self.matched[k].to_le_bytes());
            out.extend_from_slice(&self.inserted[k].to_le_bytes());
        }
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a collection saved by [`save`](Self::save). A missing,
    /// truncated, corrupt or foreign file is an error naming the file; the
    /// header's sizes are checked against the file's length and the limits
    /// of [`new`](Self::new) before anything is read or allocated.
    pub fn load(path: &Path) -> Result<Self> {
        read_file(path, sizing::memory_limit()).map_err(|reason| file_error(path, &reason))
    }

    /// Parses a whole EAMC file; a collection may take at most `max_bytes`.
    fn from_bytes(bytes: &[u8], max_bytes: usize) -> std::result::Result<Self, String> {
        let header = Header::parse(bytes, bytes.len(), max_bytes)?;
        let (payload, tail) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(payload) != u32::from_le_bytes(tail.try_into().unwrap()) {
            return Err("checksum mismatch: the file is corrupt".into());
        }
        let Header {
            layers,
            experts,
            capacity,
            len,
            replacement,
            header_bytes,
            tables,
        } = header;
        let mut eamc =
            Self::allocate(capacity, layers, experts, replacement).map_err(|e| e.to_string())?;
        let tables_at = eamc.read_entries(payload, header_bytes, len);
        if tables > 0 {
            let values = read_table_values(&payload[tables_at..])?;
            eamc.affinity = Some(AffinityTables { tables, values });
        }
        Ok(eamc)
    }

    /// Reads `len` entries from `payload` at `at` (their size checked by
    /// the header); returns where they end.
    fn read_entries(&mut self, payload: &[u8], mut at: usize, len: usize) -> usize {
        let read_u32 = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
        let cells = self.layers * self.experts;
        let mut counts = vec![0u32; cells];
        for k in 0..len {
            for (i, count) in counts.iter_mut().enumerate() {
                *count = read_u32(at + 4 * i);
            }
            at += cells * 4;
            self.len = k + 1;
            self.write(k, &counts);
            self.matched[k] = read_u32(at);
            self.inserted[k] = u64::from_le_bytes(payload[at + 4..at + 12].try_into().unwrap());
            at += 12;
        }
        self.next_seq = self.inserted[..len]
            .iter()
            .max()
            .map_or(0, |&s| s.saturating_add(1));
        at
    }
}

/// The affinity table values that end a file's payload (their count
/// checked by the header).
fn read_table_values(bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let mut values: Vec<f32> =
        sizing::zeroed(bytes.len() / 4, "the EAMC's affinity tables").map_err(|e| e.to_string())?;
    for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes(b.try_into().unwrap());
    }
    check_table_values(&values).map_err(|reason| {
        format!("{reason}; delete the file to rebuild it from traffic, or use another eamc_path")
    })?;
    Ok(values)
}

/// The fixed-size start of an EAMC file, with its sizes checked.
#[derive(Debug)]
struct Header {
    layers: usize,
    experts: usize,
    capacity: usize,
    len: usize,
    replacement: Replacement,
    /// Where the entries start.
    header_bytes: usize,
    /// Affinity tables after the entries (none in version 1).
    tables: usize,
}

impl Header {
    /// Parses the header at the start of a file of `file_len` bytes and
    /// checks its sizes against that length and the collection's limits
    /// (at most `max_bytes`), so that nothing is sized from a bad header.
    fn parse(start: &[u8], file_len: usize, max_bytes: usize) -> std::result::Result<Self, String> {
        if start.len() < 8 || &start[..8] != MAGIC {
            return Err("not an EAMC file (wrong magic bytes)".into());
        }
        let truncated = || format!("truncated: {file_len} bytes, shorter than the header");
        if start.len() < 12 {
            return Err(truncated());
        }
        let word = |i: usize| u32::from_le_bytes(start[8 + 4 * i..12 + 4 * i].try_into().unwrap());
        let version = word(0);
        let header_bytes = header_bytes(version)?;
        if file_len < header_bytes + 4 || start.len() < header_bytes {
            return Err(truncated());
        }
        let [layers, experts, capacity, len] = [1, 2, 3, 4].map(|i| word(i) as usize);
        let corrupt = |what: String| {
            format!("corrupt or foreign header: {what}; delete the file or use another eamc_path")
        };
        let replacement = Replacement::from_code(word(5))
            .ok_or_else(|| corrupt(format!("unknown replacement rule {}", word(5))))?;
        if len > capacity {
            return Err(corrupt(format!(
                "{len} entries in a capacity of {capacity}"
            )));
        }
        check_shape(capacity, layers, experts, max_bytes).map_err(corrupt)?;
        let tables = if version == VERSION_1 {
            0
        } else {
            word(6) as usize
        };
        check_tables(tables, layers, experts, max_bytes).map_err(corrupt)?;
        // Each part fits max_bytes (len <= capacity, whose footprint does);
        // their sum is checked.
        let entries = len * (layers * experts * 4 + 12);
        let table_bytes = tables * layers * experts * experts * 4;
        let expected = header_bytes
            .checked_add(entries)
            .and_then(|n| n.checked_add(table_bytes))
            .and_then(|n| n.checked_add(4))
            .ok_or_else(|| corrupt(format!("{len} entries and {tables} tables overflow")))?;
        if file_len != expected {
            return Err(format!(
                "truncated or padded: {file_len} bytes where the header promises {expected}"
            ));
        }
        Ok(Self {
            layers,
            experts,
            capacity,
            len,
            replacement,
            header_bytes,
            tables,
        })
    }
}

/// The header's length in a file of `version`, or why the version cannot
/// be read.
fn header_bytes(version: u32) -> std::result::Result<usize, String> {
    match version {
        VERSION_1 => Ok(HEADER_BYTES_V1),
        VERSION => Ok(HEADER_BYTES),
        newer if newer > VERSION => Err(format!(
            "EAMC format version {newer} is newer than this build of moe-offload reads \
             (versions {VERSION_1} to {VERSION}); upgrade moe-offload, or delete the file \
             to rebuild it from traffic"
        )),
        other => Err(format!(
            "EAMC format version {other} does not exist (versions are {VERSION_1} to {VERSION}): \
             the file is corrupt; delete it to rebuild it from traffic"
        )),
    }
}

/// Reads and parses the file at `path`: the header first, so that a file
/// whose header does not match its length is refused before the rest is
/// read.
fn read_file(path: &Path, max_bytes: usize) -> std::result::Result<ActivationCollection, String> {
    let cannot_read = |e: std::io::Error| format!("cannot read: {e}");
    let mut file = File::open(path).map_err(cannot_read)?;
    let meta = file.metadata().map_err(cannot_read)?;
    if !meta.is_file() {
        return Err("not a regular file; eamc_path must name a file".into());
    }
    let file_len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    // The longest header; a shorter one is followed by entries (or the
    // checksum), which a file of the length it promises has.
    let mut bytes = Vec::with_capacity(HEADER_BYTES);
    (&mut file)
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    Header::parse(&bytes, file_len, max_bytes)?;
    // At least the header's length: the parse checked.
    let rest = file_len - bytes.len();
    bytes
        .try_reserve_exact(rest)
        .map_err(|e| format!("cannot allocate {file_len} bytes to read it: {e}"))?;
    // One byte beyond the promised length: a file that grew since is
    // caught by the length check of `from_bytes`.
    file.take((rest + 1) as u64)
        .read_to_end(&mut bytes)
        .map_err(cannot_read)?;
    ActivationCollection::from_bytes(&bytes, max_bytes)
}

/// The directory and file name that `path` names for a save, or an error
/// that says what is wrong with the path.
fn save_target(path: &Path) -> Result<(PathBuf, OsString)> {
    if path.as_os_str().is_empty() {
        return Err(CoreError::EamcFile {
            path: "\"\"".into(),
            reason: "an empty path; name a file such as model.eamc".into(),
        });
    }
    let name = match path.file_name() {
        Some(name) if !path.is_dir() => name.to_os_string(),
        _ => {
            return Err(file_error(
                path,
                &format!(
                    "names a directory, not a file; name a file in it, such as {}",
                    path.join("model.eamc").display()
                ),
            ))
        }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(file_error(
            path,
            &format!(
                "{} is not an existing directory; create it or save elsewhere",
                dir.display()
            ),
        ));
    }
    Ok((dir, name))
}

/// `.NAME.tmp-`: how the temporaries of a target `NAME` start.
fn temporary_prefix(name: &OsStr) -> OsString {
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(".tmp-");
    prefix
}

/// `.NAME.tmp-PID`: where process PID writes a new `NAME` before the rename.
fn temporary_name(name: &OsStr, pid: u32) -> OsString {
    let mut tmp = temporary_prefix(name);
    tmp.push(pid.to_string());
    tmp
}

/// Writes `bytes` to `dir/name` (`path`) through a temporary file.
///
/// Saves into one directory take turns under an advisory lock (flock) on
/// the directory. The kernel drops a killed writer's lock, so while a save
/// holds it no other save is writing: every temporary of this target left
/// in the directory belongs to a writer that is gone, whatever its PID, and
/// is removed. Where the directory cannot be opened or locked (no read
/// permission, no flock on the filesystem), the save goes ahead without
/// that clean-up.
fn write_atomically(dir: &Path, name: &OsStr, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let directory = File::open(dir).ok();
    if directory
        .as_ref()
        .is_some_and(|d| lock_exclusive(d).is_ok())
    {
        remove_stale_temporaries(dir, name);
    }
    let tmp = dir.join(temporary_name(name, std::process::id()));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // The rename itself is durable once the directory is synced. The lock
    // goes with the directory's handle, on every path.
    match directory {
        Some(directory) => directory.sync_all(),
        None => Ok(()),
    }
}

/// Takes an exclusive advisory lock on `file`, waiting for its holder.
fn lock_exclusive(file: &File) -> std::io::Result<()> {
    loop {
        // SAFETY: flock only reads the descriptor, which `file` keeps open
        // for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Removes `.NAME.tmp-PID` files in `dir` (best effort: a temporary that
/// cannot be removed is left for a later save).
fn remove_stale_temporaries(dir: &Path, name: &OsStr) {
    let prefix = temporary_prefix(name).into_vec();
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let is_temporary = file_name
            .as_bytes()
            .strip_prefix(prefix.as_slice())
            .is_some_and(|pid| !pid.is_empty() && pid.iter().all(u8::is_ascii_digit));
        if is_temporary && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn file_error(path: &Path, reason: &str) -> CoreError {
    CoreError::EamcFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eam(rows: &[&[u32]]) -> ActivationMatrix {
        let experts = rows[0].len();
        ActivationMatrix::from_counts(rows.len(), experts, rows.concat()).unwrap()
    }

    #[test]
    fn insert_fills_then_replaces_by_rule() {
        let mut oldest = ActivationCollection::new(2, 1, 3, Replacement::Oldest).unwrap();
        assert_eq!(oldest.insert(&eam(&[&[1, 0, 0]])).unwrap(), Some(0));
        assert_eq!(oldest.insert(&eam(&[&[0, 1, 0]])).unwrap(), Some(1));
        assert_eq!(
            oldest.insert(&eam(&[&[0, 0, 0]])).unwrap(),
            None,
            "empty matrices are not kept"
        );
        assert_eq!(oldest.insert(&eam(&[&[0, 0, 1]])).unwrap(), Some(0));
        assert_eq!(oldest.entry(0), eam(&[&[0, 0, 1]]));

        let mut similar = ActivationCollection::new(2, 1, 3, Replacement::MostSimilar).unwrap();
        similar.insert(&eam(&[&[5, 0, 0]])).unwrap();
        similar.insert(&eam(&[&[0, 5, 1]])).unwrap();
        assert_eq!(similar.insert(&eam(&[&[0, 4, 2]])).unwrap(), Some(1));

        let mut least = ActivationCollection::new(2, 1, 3, Replacement::LeastMatched).unwrap();
        least.insert(&eam(&[&[5, 0, 0]])).unwrap();
        least.insert(&eam(&[&[0, 5, 1]])).unwrap();
        least.note_match(0);
        assert_eq!(least.insert(&eam(&[&[0, 0, 2]])).unwrap(), Some(1));
    }

    #[test]
    fn round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("eamc-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.eamc");
        let mut eamc = ActivationCollection::new(3, 2, 4, Replacement::LeastMatched).unwrap();
        eamc.insert(&eam(&[&[1, 2, 0, 0], &[0, 0, 3, 1]])).unwrap();
        eamc.insert(&eam(&[&[0, 7, 0, 1], &[2, 0, 0, 0]])).unwrap();
        eamc.note_match(1);
        eamc.save(&path).unwrap();
        let back = ActivationCollection::load(&path).unwrap();
        assert_eq!(
            (back.len(), back.capacity(), back.replacement()),
            (2, 3, Replacement::LeastMatched)
        );
        for k in 0..2 {
            assert_eq!(back.entry(k), eamc.entry(k));
        }
        assert_eq!(back.matched[..2], eamc.matched[..2]);

        let bytes = fs::read(&path).unwrap();
        for (what, broken) in [
            ("truncated", bytes[..bytes.len() - 5].to_vec()),
            ("corrupt", {
                let mut b = bytes.clone();
                b[HEADER_BYTES + 3] ^= 0x40;
                b
            }),
            (
                "foreign",
                b"PK\x03\x04 not ours at all, longer than a header".to_vec(),
            ),
        ] {
            fs::write(&path, &broken).unwrap();
            let err = ActivationCollection::load(&path).unwrap_err().to_string();
            assert!(err.contains("a.eamc"), "{what}: {err}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Sets header word `i` (0 = version, 1 layers, 2 experts, 3 capacity,
    /// 4 entries, 5 replacement rule, 6 affinity tables from version 2) and
    /// recomputes the checksum, so that the parser gets past it.
    fn with_header_word(bytes: &[u8], i: usize, value: u32) -> Vec<u8> {
        let mut b = bytes.to_vec();
        b[8 + 4 * i..12 + 4 * i].copy_from_slice(&value.to_le_bytes());
        reseal(&mut b);
        b
    }

    fn reseal(bytes: &mut [u8]) {
        if let Some(n) = bytes.len().checked_sub(4) {
            let crc = crc32fast::hash(&bytes[..n]);
            bytes[n..].copy_from_slice(&crc.to_le_bytes());
        }
    }

    fn sample() -> ActivationCollection {
        let mut eamc = ActivationCollection::new(4, 2, 3, Replacement::Oldest).unwrap();
        eamc.insert(&eam(&[&[1, 0, 2], &[0, 3, 0]])).unwrap();
        eamc.insert(&eam(&[&[0, 5, 0], &[1, 1, 1]])).unwrap();
        eamc
    }

    /// The version 1 file of a version 2 file without tables: the same
    /// words, less the table count.
    fn as_version_1(bytes: &[u8]) -> Vec<u8> {
        assert_eq!(bytes[HEADER_BYTES_V1..HEADER_BYTES], [0; 4], "no tables");
        let mut v1 = [&bytes[..HEADER_BYTES_V1], &bytes[HEADER_BYTES..]].concat();
        v1[8..12].copy_from_slice(&VERSION_1.to_le_bytes());
        reseal(&mut v1);
        v1
    }

    #[test]
    fn affinity_tables_round_trip_and_version_1_files_load_without_them() {
        let eamc = sample();
        // One table of 2 layers x 3 x 3 experts: counts, some fractional.
        let values: Vec<f32> = (0..18).map(|i| i as f32 * 0.5).collect();
        let bytes = eamc.to_bytes_with(1, &values);
        let mut back = ActivationCollection::from_bytes(&bytes, 1 << 20).unwrap();
        assert_eq!(
            back.affinity().map(|a| (a.tables(), a.values())),
            Some((1, &values[..]))
        );
        assert_eq!(back.to_bytes(), bytes, "a load and a save keep the tables");
        assert_eq!(back.take_affinity().unwrap().into_values(), values);
        assert_eq!(back.to_bytes(), eamc.to_bytes(), "taken: saved without");

        let v1 =
            ActivationCollection::from_bytes(&as_version_1(&eamc.to_bytes()), 1 << 20).unwrap();
        assert!(v1.affinity().is_none());
        assert_eq!(
            v1.to_bytes(),
            eamc.to_bytes(),
            "the same collection, saved as version 2"
        );
    }

    #[test]
    fn newer_or_unknown_versions_and_bad_table_values_are_refused_with_the_fix() {
        let bytes = sample().to_bytes_with(1, &[1.0; 18]);
        let newer = ActivationCollection::from_bytes(&with_header_word(&bytes, 0, 3), 1 << 20);
        let err = newer.unwrap_err();
        for says in [
            "version 3 is newer",
            "upgrade moe-offload",
            "delete the file to rebuild it",
        ] {
            assert!(err.contains(says), "{err}");
        }
        let err =
            ActivationCollection::from_bytes(&with_header_word(&bytes, 0, 0), 1 << 20).unwrap_err();
        assert!(err.contains("version 0 does not exist"), "{err}");
        // Table values that are not counts, under a valid checksum.
        for bad in [f32::NAN, f32::INFINITY, -1.0] {
            let mut broken = bytes.clone();
            let last = broken.len() - 8;
            broken[last..last + 4].copy_from_slice(&bad.to_le_bytes());
            reseal(&mut broken);
            let err = ActivationCollection::from_bytes(&broken, 1 << 20).unwrap_err();
            assert!(
                err.contains("value 17") && err.contains("not a count"),
                "{bad}: {err}"
            );
        }
        // Nor are such tables written.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.eamc");
        for (tables, values, says) in [
            (1, vec![1.0; 17], "17 values are not 1 affinity tables"),
            (2, vec![1.0; 36], "2 affinity tables for 2 layers"),
            (1, vec![f32::NAN; 18], "not a count"),
        ] {
            let err = sample()
                .save_with_affinity(&path, tables, &values)
                .unwrap_err();
            assert!(matches!(err, CoreError::InvalidConfig(_)), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
        assert!(!path.exists());
    }

    #[test]
    fn sizes_from_arguments_and_headers_are_checked_before_allocating() {
        // Capacities that used to abort (allocation failure) or panic
        // (capacity overflow) are configuration errors naming the setting.
        for capacity in [10_000_000_000, 1 << 62, usize::MAX] {
            let err = ActivationCollection::new(capacity, 27, 64, Replacement::Oldest).unwrap_err();
            assert!(matches!(err, CoreError::InvalidConfig(_)), "{err}");
            let message = err.to_string();
            assert!(
                message.contains("eamc_capacity") && message.contains("1000000"),
                "{message}"
            );
        }
        let err = ActivationCollection::new(1000, 1 << 20, 1 << 20, Replacement::Oldest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("half of this machine's memory"), "{err}");
        // The largest capacity callers are told about is one that is taken.
        assert_eq!(max_capacity(26, 64), MAX_CAPACITY);
        let most = max_capacity(1 << 12, 1 << 16);
        assert!(0 < most && most < MAX_CAPACITY);
        assert!(
            ActivationCollection::new(most + 1, 1 << 12, 1 << 16, Replacement::Oldest).is_err()
        );
        assert_eq!(max_capacity(1 << 20, 1 << 20), 0);

        // A header with a valid checksum whose sizes are absurd, or larger
        // than the collection may take, or disagree with the file's length.
        let bytes = sample().to_bytes();
        let limit = 1 << 20;
        for (word, value, says) in [
            (3, u32::MAX, "above the limit"),
            (1, 0, "positive capacity"),
            (4, u32::MAX, "entries in a capacity"),
            (1, 1 << 20, "more than the 1048576 bytes"),
            (2, u32::MAX, "more than the 1048576 bytes"),
            (4, 1, "truncated or padded"),
            (5, 7, "replacement rule"),
            (6, u32::MAX, "affinity tables for 2 layers"),
            (6, 1, "truncated or padded"),
        ] {
            let broken = with_header_word(&bytes, word, value);
            let err = ActivationCollection::from_bytes(&broken, limit).unwrap_err();
            assert!(err.contains(says), "word {word} = {value}: {err}");
        }
        // Tables beyond the limit, of a collection that fits it.
        let mut huge_tables = bytes.clone();
        for (word, value) in [(2, 400), (4, 0), (6, 1)] {
            huge_tables = with_header_word(&huge_tables, word, value);
        }
        let err = ActivationCollection::from_bytes(&huge_tables, limit).unwrap_err();
        assert!(
            err.contains("1 affinity tables of 2x400x400") && err.contains("more than the 1048576"),
            "{err}"
        );

        // Loading checks the header against the file's length first.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.eamc");
        fs::write(&path, with_header_word(&bytes, 3, u32::MAX)).unwrap();
        let err = ActivationCollection::load(&path).unwrap_err();
        assert!(matches!(err, CoreError::EamcFile { .. }), "{err}");
        assert!(err.to_string().contains("huge.eamc"), "{err}");
    }

    #[test]
    fn a_save_removes_the_temporaries_of_killed_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.eamc");
        // Left by writers killed mid-save, one of them with this process's
        // own (reused) PID.
        let stale = [
            ".a.eamc.tmp-4194304".to_string(),
            format!(".a.eamc.tmp-{}", std::process::id()),
        ];
        // Not temporaries of this target.
        let others = [".a.eamc.tmp-12.bak", ".b.eamc.tmp-12", "a.eamc.tmp-12"];
        for name in stale.iter().map(String::as_str).chain(others) {
            fs::write(dir.path().join(name), b"half-written").unwrap();
        }
        sample().save(&path).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".a.eamc.tmp-12.bak",
                ".b.eamc.tmp-12",
                "a.eamc",
                "a.eamc.tmp-12"
            ]
        );
        assert_eq!(ActivationCollection::load(&path).unwrap().len(), 2);
    }

    #[test]
    fn a_save_to_a_path_that_names_no_file_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing").join("x.eamc");
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let under_a_file = file.join("x.eamc");
        for (path, says) in [
            (Path::new(""), "an empty path; name a file"),
            (Path::new("."), "names a directory, not a file"),
            (dir.path(), "names a directory, not a file"),
            (missing.as_path(), "is not an existing directory"),
            (under_a_file.as_path(), "is not an existing directory"),
        ] {
            let err = sample().save(path).unwrap_err();
            assert!(matches!(err, CoreError::EamcFile { .. }), "{err}");
            assert!(err.to_string().contains(says), "{path:?}: {err}");
        }
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "nothing is written beside the path");
    }

    /// The parser under random and mutated input: it returns a collection
    /// or its error, and never panics, aborts or sizes anything beyond its
    /// limit (1 MiB here, so a case cannot allocate more).
    mod fuzz {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        const LIMIT: usize = 1 << 20;

        fn parse(bytes: &[u8]) -> std::result::Result<ActivationCollection, String> {
            let parsed = ActivationCollection::from_bytes(bytes, LIMIT);
            match &parsed {
                Ok(eamc) => {
                    assert!(eamc.len() <= eamc.capacity());
                    assert!(
                        footprint(eamc.capacity(), eamc.layers(), eamc.experts()).unwrap() <= LIMIT
                    );
                    if let Some(saved) = eamc.affinity() {
                        assert!(0 < saved.tables() && saved.tables() < eamc.layers());
                        assert!(saved.values().len() * 4 <= LIMIT);
                        assert!(saved.values().iter().all(|v| v.is_finite() && *v >= 0.0));
                    }
                }
                Err(reason) => assert!(!reason.is_empty()),
            }
            parsed
        }

        /// A small random collection, and its random affinity tables
        /// (none, or some of the d < L it may have).
        fn collection() -> impl Strategy<Value = (ActivationCollection, usize, Vec<f32>)> {
            (
                1usize..6,
                1usize..4,
                1usize..5,
                0usize..6,
                any::<u64>(),
                0usize..4,
            )
                .prop_map(|(capacity, layers, experts, inserts, seed, tables)| {
                    let rule = Replacement::from_code((seed % 3) as u32).unwrap();
                    let mut eamc =
                        ActivationCollection::new(capacity, layers, experts, rule).unwrap();
                    let mut x = seed | 1;
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for _ in 0..inserts {
                        let counts = (0..layers * experts).map(|_| (next() % 5) as u32).collect();
                        let m = ActivationMatrix::from_counts(layers, experts, counts).unwrap();
                        eamc.insert(&m).unwrap();
                    }
                    let tables = tables % layers;
                    let values = (0..tables * layers * experts * experts)
                        .map(|_| (next() % 40) as f32 * 0.25)
                        .collect();
                    (eamc, tables, values)
                })
        }

        /// A valid version 2 file of a small random collection.
        fn saved() -> impl Strategy<Value = Vec<u8>> {
            collection().prop_map(|(eamc, tables, values)| eamc.to_bytes_with(tables, &values))
        }

        /// A valid version 1 file (no tables) of a small random collection.
        fn saved_v1() -> impl Strategy<Value = Vec<u8>> {
            collection().prop_map(|(eamc, _, _)| as_version_1(&eamc.to_bytes()))
        }

        /// A valid file of either version.
        fn saved_any() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![saved(), saved_v1()]
        }

        fn extreme() -> impl Strategy<Value = u32> {
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(2),
                Just(u32::MAX),
                Just(u32::MAX - 1),
                Just(1 << 31),
                Just(MAX_CAPACITY as u32),
                Just(MAX_CAPACITY as u32 + 1),
                any::<u32>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn valid_files_round_trip(bytes in saved()) {
                let eamc = parse(&bytes).unwrap();
                prop_assert_eq!(eamc.to_bytes(), bytes);
            }

            #[test]
            fn version_1_files_load_as_the_same_collection_without_tables(
                (eamc, _, _) in collection()
            ) {
                let v2 = eamc.to_bytes();
                let from_v1 = parse(&as_version_1(&v2)).unwrap();
                prop_assert!(from_v1.affinity().is_none());
                prop_assert_eq!(from_v1.to_bytes(), v2);
            }

            #[test]
            fn random_bytes_are_refused(tail in vec(any::<u8>(), 0..160), magic in any::<bool>()) {
                let mut bytes = if magic { MAGIC.to_vec() } else { Vec::new() };
                bytes.extend(tail);
                prop_assert!(parse(&bytes).is_err());
            }

            #[test]
            fn flipped_bits_and_truncations_are_refused(
                bytes in saved_any(),
                flips in vec((any::<prop::sample::Index>(), 0u8..8), 1..4),
                cut in any::<prop::sample::Index>(),
                truncate in any::<bool>(),
            ) {
                let mut broken = bytes.clone();
                if truncate {
                    broken.truncate(cut.index(bytes.len()));
                } else {
                    for (at, bit) in &flips {
                        broken[at.index(bytes.len())] ^= 1 << bit;
                    }
                }
                if broken != bytes {
                    prop_assert!(parse(&broken).is_err());
                }
            }

            #[test]
            fn extreme_header_fields_with_a_valid_checksum_are_safe(
                bytes in saved_any(),
                fields in vec((0usize..7, extreme()), 1..4),
                pad in 0usize..64,
            ) {
                let mut broken = bytes;
                for &(word, value) in &fields {
                    broken = with_header_word(&broken, word, value);
                }
                // Sometimes grow the file, so that a header's larger promise
                // may match its length.
                let n = broken.len() - 4;
                broken.splice(n..n, std::iter::repeat_n(1u8, pad * 4));
                reseal(&mut broken);
                let _ = parse(&broken);
            }
        }
    }
}
