//! The disk tier: a loading-optimized expert store.
//!
//! A store is a directory:
//!
//! ```text
//! moe-store.json   the index (written last; its presence marks a complete store)
//! layer-000.bin    one file per MoE layer: a 4 KiB header page, then one blob
//! layer-001.bin    per expert at a 4 KiB aligned offset, each blob holding all
//! ...              of the expert's tensors back to back, exactly as a device
//!                  slot holds them (so a blob is copied verbatim)
//! other files      registered by the writer (config, non-expert weights): the
//!                  index records their sizes and CRC-32s
//! ```
//!
//! The index names, per layer, the module, the tensors (names, dtypes,
//! shapes, offsets inside the blob) and, per expert, the blob's file offset
//! and CRC-32; per other file its size, CRC-32 and when it is checked
//! ([`FileCheck`]): every byte the store serves is covered by a checksum.
//! Each blob file's header carries a magic, the format version, the layer
//! and the store's id, so a foreign file or one from another store is
//! refused. Reads ([`ExpertStore`]) use direct I/O where the filesystem
//! supports it; writes ([`StoreWriter`]) go to a staging directory beside
//! the store that is swapped in whole once everything is on disk.

mod commit;
mod index;
mod reader;
mod writer;

pub use index::{BlobIndex, FileCheck, FileEntry, LayerIndex, StoreIndex, TensorIndex};
pub use reader::{ExpertStore, Extent};
pub use writer::{LayerSpec, StoreSummary, StoreWriter};

use crate::error::CoreError;

/// The index file's name inside a store directory.
pub const INDEX_FILE: &str = "moe-store.json";
/// `format` field of every index.
pub const FORMAT: &str = "moe-offload-expert-store";
/// The format version this build reads and writes (2: every file has a
/// checksum).
pub const VERSION: u32 = 2;
/// Bytes before a layer file's first blob.
pub const HEADER_BYTES: u64 = 4096;
/// Prefix of the staging directories that writers before format version 2
/// left inside a store's directory.
pub const PARTIAL_PREFIX: &str = ".partial-";

const MAGIC: [u8; 8] = *b"MOEXSTOR";

/// The blob file of MoE layer `layer`.
pub fn layer_file_name(layer: usize) -> String {
    format!("layer-{layer:03}.bin")
}

/// The first page of a layer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileHeader {
    version: u32,
    layer: u32,
    store_id: u64,
}

impl FileHeader {
    fn encode(&self) -> Vec<u8> {
        let mut page = vec![0u8; HEADER_BYTES as usize];
        page[..8].copy_from_slice(&MAGIC);
        page[8..12].copy_from_slice(&self.version.to_le_bytes());
        page[12..16].copy_from_slice(&self.layer.to_le_bytes());
        page[16..24].copy_from_slice(&self.store_id.to_le_bytes());
        page
    }

    /// The header in `page`, or why it is not one of ours.
    fn decode(page: &[u8]) -> Result<Self, String> {
        if page.len() < 24 || page[..8] != MAGIC {
            return Err("is not a moe-offload blob file (bad magic)".into());
        }
        let word = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().expect("4 bytes"));
        let header = Self {
            version: word(8),
            layer: word(12),
            store_id: u64::from_le_bytes(page[16..24].try_into().expect("8 bytes")),
        };
        if header.version != VERSION {
            return Err(format!(
                "has format version {}, this moe-offload reads version {VERSION}",
                header.version
            ));
        }
        Ok(header)
    }
}

/// A store error about `path`.
fn store_error(path: impl AsRef<std::path::Path>, reason: impl Into<String>) -> CoreError {
    CoreError::Store {
        path: path.as_ref().display().to_string(),
        reason: reason.into(),
    }
}

/// `n` rounded up to a multiple of `align` (a power of two), saturating.
fn align_to(n: u64, align: u64) -> u64 {
    n.div_ceil(align).saturating_mul(align)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_foreign_pages_are_refused() {
        let header = FileHeader {
            version: VERSION,
            layer: 7,
            store_id: 0xdead_beef_1234,
        };
        let page = header.encode();
        assert_eq!(page.len() as u64, HEADER_BYTES);
        assert_eq!(FileHeader::decode(&page), Ok(header));
        assert!(FileHeader::decode(&[0u8; 4096])
            .unwrap_err()
            .contains("magic"));
        let newer = FileHeader {
            version: VERSION + 1,
            ..header
        };
        assert!(FileHeader::decode(&newer.encode())
            .unwrap_err()
            .contains("version"));
    }
}

#[cfg(test)]
mod round_trip_tests;

#[cfg(test)]
mod fuzz_tests;
