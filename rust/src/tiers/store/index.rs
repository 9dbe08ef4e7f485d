//! The store's index, `moe-store.json`: what every blob holds and where.

use serde::{Deserialize, Serialize};

/// The whole index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreIndex {
    /// Always [`FORMAT`](super::FORMAT): tells a store index from other JSON.
    pub format: String,
    pub version: u32,
    /// Random, written into every blob file's header as well.
    pub store_id: u64,
    /// One entry per MoE layer, in the model's execution order.
    pub layers: Vec<LayerIndex>,
    /// Every file of the store but the index: its size, and how its bytes
    /// are checked.
    pub files: Vec<FileEntry>,
    /// The caller's description of the model (configuration, dtype, source
    /// checkpoint); the core stores it without looking inside.
    pub meta: serde_json::Value,
}

/// One MoE layer: its experts' blobs share a tensor layout and a size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerIndex {
    /// The experts' module in the model (e.g. `model.layers.3.mlp.experts`).
    pub name: String,
    /// The blob file, relative to the store directory.
    pub file: String,
    /// Meaningful bytes of one blob (the checksum covers exactly these).
    pub blob_bytes: u64,
    /// Distance between consecutive blobs: `blob_bytes` rounded up to 4 KiB.
    pub stride: u64,
    pub tensors: Vec<TensorIndex>,
    /// One entry per expert, in expert order.
    pub blobs: Vec<BlobIndex>,
}

/// One tensor of every expert of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorIndex {
    pub name: String,
    /// A torch dtype name without the `torch.` prefix, e.g. `bfloat16`.
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Byte offset inside the blob.
    pub offset: u64,
}

/// Where one expert's blob starts in its layer file, and its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobIndex {
    pub offset: u64,
    pub crc32: u32,
}

/// A file of the store, the size it must have and how its bytes are checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    /// CRC-32 of the whole file (for [`FileCheck::Open`] and
    /// [`FileCheck::Reader`]; a layer file's blobs carry their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
    pub check: FileCheck,
}

/// When a file's bytes are verified, so that every byte the store serves is
/// covered by a checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileCheck {
    /// A layer file: its header is checked at open, each blob's CRC-32 when
    /// the blob is read.
    Blobs,
    /// A small file (config, tokenizer): its CRC-32 is checked at open.
    Open,
    /// A large file read by the caller (the non-expert weights): the caller
    /// checks its CRC-32 over the bytes as it reads them.
    Reader,
}
