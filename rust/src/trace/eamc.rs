//! [`ActivationCollection`] (EAMC): a bounded set of past requests' activation
//! matrices, the representatives of the workload that live requests are
//! matched against. Persisted to a versioned, checksummed file so a restarted
//! process starts warm.
//!
//! Storage is column-major over entries: for each (layer, expert) cell, the
//! values of all K entries are contiguous, so a matcher's per-token update
//! (one cell per routed expert) is a vectorisable sweep over K floats.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::eam::ActivationMatrix;
use crate::error::{CoreError, Result};

const MAGIC: &[u8; 8] = b"MOEEAMC\0";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 * 5 + 4;

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
}

impl ActivationCollection {
    pub fn new(
        capacity: usize,
        layers: usize,
        experts: usize,
        replacement: Replacement,
    ) -> Result<Self> {
        if capacity == 0 || layers == 0 || experts == 0 {
            return Err(CoreError::InvalidConfig(format!(
                "an EAMC needs positive capacity, layers and experts (got {capacity}, {layers}, {experts})"
            )));
        }
        Ok(Self {
            layers,
            experts,
            capacity,
            len: 0,
            replacement,
            cells: vec![0.0; layers * experts * capacity],
            layer_norm2: vec![0.0; layers * capacity],
            row_sum: vec![0.0; layers * capacity],
            matched: vec![0; capacity],
            inserted: vec![0; capacity],
            next_seq: 0,
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
        self.next_seq += 1;
    }

    /// Writes the collection to `path` atomically: a temporary file in the
    /// same directory, synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let written = (|| -> std::io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(file_error(path, &format!("cannot write: {e}")));
        }
        Ok(())
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER_BYTES + self.len * (self.layers * self.experts * 4 + 12) + 4);
        out.extend_from_slice(MAGIC);
        for v in [
            VERSION,
            self.layers as u32,
            self.experts as u32,
            self.capacity as u32,
            self.len as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.replacement.code().to_le_bytes());
        for k in 0..self.len {
            for cell in 0..self.layers * self.experts {
                out.extend_from_slice(&(self.cells[cell * self.capacity + k] as u32).to_le_bytes());
            }
            out.extend_from_slice(&self.matched[k].to_le_bytes());
            out.extend_from_slice(&self.inserted[k].to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a collection saved by [`save`](Self::save). A missing,
    /// truncated, corrupt or foreign file is an error naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(|e| file_error(path, &format!("cannot read: {e}")))?;
        Self::from_bytes(&bytes).map_err(|reason| file_error(path, &reason))
    }

    fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err("not an EAMC file (wrong magic bytes)".into());
        }
        if bytes.len() < HEADER_BYTES + 4 {
            return Err(format!(
                "truncated: {} bytes, shorter than the header",
                bytes.len()
            ));
        }
        let word = |i: usize| u32::from_le_bytes(bytes[8 + 4 * i..12 + 4 * i].try_into().unwrap());
        let (version, layers, experts, capacity, len, rule) = (
            word(0),
            word(1) as usize,
            word(2) as usize,
            word(3) as usize,
            word(4) as usize,
            word(5),
        );
        if version != VERSION {
            return Err(format!(
                "EAMC format version {version}; this build reads version {VERSION}"
            ));
        }
        let entry_bytes = layers
            .checked_mul(experts)
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(12))
            .ok_or("corrupt header (sizes overflow)")?;
        let expected = len
            .checked_mul(entry_bytes)
            .and_then(|n| n.checked_add(HEADER_BYTES + 4))
            .ok_or("corrupt header (sizes overflow)")?;
        if bytes.len() != expected {
            return Err(format!(
                "truncated or padded: {} bytes where the header promises {expected}",
                bytes.len()
            ));
        }
        let (payload, tail) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(payload) != u32::from_le_bytes(tail.try_into().unwrap()) {
            return Err("checksum mismatch: the file is corrupt".into());
        }
        let replacement =
            Replacement::from_code(rule).ok_or("corrupt header (replacement rule)")?;
        if len > capacity {
            return Err(format!(
                "corrupt header: {len} entries in a capacity of {capacity}"
            ));
        }
        let mut eamc =
            Self::new(capacity, layers, experts, replacement).map_err(|e| e.to_string())?;
        let mut at = HEADER_BYTES;
        let read_u32 = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
        for k in 0..len {
            let counts: Vec<u32> = (0..layers * experts)
                .map(|i| read_u32(at + 4 * i))
                .collect();
            at += layers * experts * 4;
            eamc.len = k + 1;
            eamc.write(k, &counts);
            eamc.matched[k] = read_u32(at);
            eamc.inserted[k] = u64::from_le_bytes(payload[at + 4..at + 12].try_into().unwrap());
            at += 12;
        }
        eamc.next_seq = eamc.inserted[..len].iter().max().map_or(0, |&s| s + 1);
        Ok(eamc)
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
}
