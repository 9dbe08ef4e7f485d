//! Writer and reader together: what is written is read back, and every kind
//! of damage is refused with the file and the expert named.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::layout::ExpertId;

const LAYERS: [(u32, u64); 2] = [(3, 5000), (2, 100)];

fn specs() -> Vec<LayerSpec> {
    LAYERS
        .iter()
        .enumerate()
        .map(|(l, &(experts, blob_bytes))| LayerSpec {
            name: format!("model.layers.{l}.mlp.experts"),
            experts,
            blob_bytes,
            tensors: vec![TensorIndex {
                name: "down_proj".into(),
                dtype: "uint8".into(),
                shape: vec![blob_bytes],
                offset: 0,
            }],
        })
        .collect()
}

/// Expert (l, e)'s bytes: distinct per expert and per position.
fn blob(l: usize, e: usize) -> Vec<u8> {
    (0..LAYERS[l].1 as usize)
        .map(|i| (i * 31 + l * 7 + e * 13) as u8)
        .collect()
}

fn write_store(dir: &Path) -> StoreSummary {
    let mut writer =
        StoreWriter::create(dir, specs(), serde_json::json!({"model": "test"}), false).unwrap();
    fs::write(writer.partial_dir().join("config.json"), b"{}").unwrap();
    writer.add_file("config.json", false).unwrap();
    for (l, &(experts, _)) in LAYERS.iter().enumerate() {
        for e in 0..experts as usize {
            writer.write_expert(l, e, &blob(l, e)).unwrap();
        }
    }
    writer.finish().unwrap()
}

fn store_dir() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    (root, dir)
}

fn read_all(store: &ExpertStore) -> crate::error::Result<Vec<Vec<u8>>> {
    (0..store.layout().num_experts() as ExpertId)
        .map(|id| {
            let mut buf = AlignedBuf::new(store.span(id));
            store.read(id, buf.as_mut_slice())?;
            Ok(buf.as_mut_slice()[..store.layout().bytes(id)].to_vec())
        })
        .collect()
}

fn message(result: crate::error::Result<impl Sized>) -> String {
    match result {
        Err(e @ CoreError::Store { .. }) => e.to_string(),
        Err(other) => panic!("expected a store error, got {other}"),
        Ok(_) => panic!("expected a store error"),
    }
}

/// A 4 KiB aligned buffer, as host slots are (direct I/O needs it).
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[test]
fn what_is_written_is_read_back() {
    let (_root, dir) = store_dir();
    let summary = write_store(&dir);
    assert_eq!(summary.experts, 5);
    assert_eq!(summary.expert_bytes, 3 * 5000 + 2 * 100);
    let store = ExpertStore::open(&dir).unwrap();
    let expected: Vec<_> = (0..3)
        .map(|e| blob(0, e))
        .chain((0..2).map(|e| blob(1, e)))
        .collect();
    assert_eq!(read_all(&store).unwrap(), expected);
    let index = store.index().unwrap();
    assert_eq!(index.meta["model"], "test");
    assert_eq!(index.layers[0].stride, 8192);
    assert!(index.layers[0].blobs.iter().all(|b| b.offset % 4096 == 0));
    assert!(index
        .files
        .iter()
        .any(|f| f.name == "config.json" && f.bytes == 2));
    assert_eq!(
        store.span(0),
        8192,
        "blobs are read whole, padding included"
    );
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(PARTIAL_PREFIX))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the staging directory is gone: {leftovers:?}"
    );
}

#[test]
fn a_flipped_byte_fails_the_checksum_at_read_naming_file_and_expert() {
    let (_root, dir) = store_dir();
    write_store(&dir);
    let path = dir.join(layer_file_name(0));
    let mut bytes = fs::read(&path).unwrap();
    let at = (HEADER_BYTES + 2 * 8192 + 17) as usize; // inside expert 2 of layer 0
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let store = ExpertStore::open(&dir).expect("damage inside a blob shows only when it is read");
    let mut buf = AlignedBuf::new(8192);
    store.read(1, buf.as_mut_slice()).unwrap();
    let text = message(store.read(2, buf.as_mut_slice()));
    assert!(text.contains("layer-000.bin"), "{text}");
    assert!(
        text.contains("checksum mismatch in expert 2 of MoE layer 0"),
        "{text}"
    );
    assert!(text.contains("moe-offload convert"), "{text}");
    assert_eq!(fs::read(&path).unwrap(), bytes, "reading never writes");
}

#[test]
fn truncated_and_missing_files_are_refused_at_open() {
    let (_root, dir) = store_dir();
    write_store(&dir);
    let path = dir.join(layer_file_name(1));
    let full = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(full - 100)
        .unwrap();
    let text = message(ExpertStore::open(&dir));
    assert!(
        text.contains("layer-001.bin") && text.contains("truncated"),
        "{text}"
    );
    fs::remove_file(&path).unwrap();
    let text = message(ExpertStore::open(&dir));
    assert!(
        text.contains("layer-001.bin") && text.contains("missing"),
        "{text}"
    );
}

#[test]
fn a_damaged_or_missing_index_is_refused() {
    let (_root, dir) = store_dir();
    write_store(&dir);
    let index = dir.join(INDEX_FILE);
    let text = fs::read(&index).unwrap();
    fs::write(&index, &text[..text.len() / 2]).unwrap();
    let message_text = message(ExpertStore::open(&dir));
    assert!(
        message_text.contains(INDEX_FILE) && message_text.contains("damaged"),
        "{message_text}"
    );
    fs::remove_file(&index).unwrap();
    let message_text = message(ExpertStore::open(&dir));
    assert!(message_text.contains("half-written"), "{message_text}");
    let empty = tempfile::tempdir().unwrap();
    assert!(message(ExpertStore::open(empty.path())).contains("not a moe-offload expert store"));
}

#[test]
fn a_blob_file_of_another_store_is_refused() {
    let (_root, a) = store_dir();
    let (_root_b, b) = store_dir();
    write_store(&a);
    write_store(&b);
    fs::copy(b.join(layer_file_name(1)), a.join(layer_file_name(1))).unwrap();
    let text = message(ExpertStore::open(&a));
    assert!(text.contains("another store"), "{text}");
}

fn write_experts(writer: &mut StoreWriter) {
    for (l, &(experts, _)) in LAYERS.iter().enumerate() {
        for e in 0..experts as usize {
            writer.write_expert(l, e, &blob(l, e)).unwrap();
        }
    }
}

/// The entries of `dir`, sorted (also used by `commit`'s tests).
pub(super) fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn an_unfinished_writer_leaves_nothing_behind() {
    let (root, dir) = store_dir();
    let mut writer = StoreWriter::create(&dir, specs(), serde_json::Value::Null, false).unwrap();
    writer.write_expert(0, 0, &blob(0, 0)).unwrap();
    assert!(!dir.exists(), "the store appears only when it is complete");
    drop(writer);
    assert_eq!(
        names(root.path()),
        Vec::<String>::new(),
        "staging and lock are removed"
    );
    // One that is not dropped (a crash) leaves a staging directory beside
    // the store, and no store: a directory that existed is left as it was.
    fs::create_dir(&dir).unwrap();
    let writer = StoreWriter::create(&dir, specs(), serde_json::Value::Null, false).unwrap();
    let partial = writer.partial_dir().to_path_buf();
    std::mem::forget(writer);
    assert!(partial.is_dir() && partial.parent() == dir.parent());
    assert_eq!(names(&dir), Vec::<String>::new());
    assert!(message(ExpertStore::open(&dir)).contains("not a moe-offload expert store"));
    // A later writer clears what a dead process left and starts afresh
    // (the lock of the forgotten writer is this process's: free it first).
    fs::remove_file(root.path().join(".store.lock")).unwrap();
    let mut writer = StoreWriter::create(&dir, specs(), serde_json::Value::Null, false).unwrap();
    write_experts(&mut writer);
    writer.finish().unwrap();
    assert_eq!(
        names(root.path()),
        ["store"],
        "leftovers, staging and lock are gone"
    );
    assert_eq!(names(&dir).len(), 3, "index and two layer files");
    assert!(ExpertStore::open(&dir).is_ok());
}

#[test]
fn finishing_with_an_expert_unwritten_is_refused() {
    let (_root, dir) = store_dir();
    let mut writer = StoreWriter::create(&dir, specs(), serde_json::Value::Null, false).unwrap();
    writer.write_expert(0, 0, &blob(0, 0)).unwrap();
    assert!(message(writer.finish()).contains("never written"));
    assert!(!dir.exists());
}

#[test]
fn a_store_is_replaced_only_when_asked() {
    let (root, dir) = store_dir();
    write_store(&dir);
    let text = message(StoreWriter::create(
        &dir,
        specs(),
        serde_json::Value::Null,
        false,
    ));
    assert!(text.contains("overwrite"), "{text}");
    assert!(
        ExpertStore::open(&dir).is_ok(),
        "a refused writer leaves the store alone"
    );
    let mut writer =
        StoreWriter::create(&dir, specs(), serde_json::json!({"model": "new"}), true).unwrap();
    write_experts(&mut writer);
    assert_eq!(
        ExpertStore::open(&dir).unwrap().index().unwrap().meta["model"],
        "test",
        "until the new store is finished, the old one is in place"
    );
    writer.finish().unwrap();
    let store = ExpertStore::open(&dir).unwrap();
    assert_eq!(store.index().unwrap().meta["model"], "new");
    assert!(
        !dir.join("config.json").exists(),
        "files of the old store are removed"
    );
    assert_eq!(names(root.path()), ["store"], "the old store is gone");
}

#[test]
fn a_changed_small_file_is_refused_at_open() {
    let (_root, dir) = store_dir();
    write_store(&dir);
    // Same size, other bytes: only the checksum can tell.
    fs::write(dir.join("config.json"), b"[]").unwrap();
    let text = message(ExpertStore::open(&dir));
    assert!(
        text.contains("config.json") && text.contains("checksum mismatch"),
        "{text}"
    );
}

#[test]
fn a_checkpoint_is_read_in_place_from_extents() {
    let root = tempfile::tempdir().unwrap();
    let shard = root.path().join("shard.bin");
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&shard, &bytes).unwrap();
    // One layer of two 300-byte experts, each gathered from two ranges.
    let extents = vec![
        vec![
            Extent {
                file: 0,
                offset: 10,
                len: 100,
                dst: 0,
            },
            Extent {
                file: 0,
                offset: 500,
                len: 200,
                dst: 100,
            },
        ],
        vec![Extent {
            file: 0,
            offset: 700,
            len: 300,
            dst: 0,
        }],
    ];
    let store = ExpertStore::from_extents(
        root.path(),
        std::slice::from_ref(&shard),
        &[(2, 300)],
        extents.clone(),
    )
    .unwrap();
    let got = read_all(&store).unwrap();
    assert_eq!(got[0], [&bytes[10..110], &bytes[500..700]].concat());
    assert_eq!(got[1], bytes[700..1000].to_vec());
    let mut past_end = extents;
    past_end[1][0].offset = 800;
    let text = message(ExpertStore::from_extents(
        root.path(),
        &[shard],
        &[(2, 300)],
        past_end,
    ));
    assert!(
        text.contains("shard.bin") && text.contains("expert 1 of MoE layer 0"),
        "{text}"
    );
}
