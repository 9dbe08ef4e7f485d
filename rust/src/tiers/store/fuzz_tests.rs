//! Property tests: whatever an index or a layer file's header holds —
//! random bytes, a valid one mutated, hostile numbers and names — opening
//! the store and reading from it end in a store error or in correct bytes,
//! never in a panic, an overflow, a hang or an allocation sized by the
//! file's claims. Each property runs a fixed number of cases (a few seconds
//! in all).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;
use crate::layout::ExpertId;

const CASES: u32 = 150;

/// A small valid store, written once; each case works on a copy.
fn base_store() -> &'static Path {
    static BASE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = BASE.get_or_init(|| {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("store");
        let layers = [(3u32, 5000u64), (2, 100)];
        let specs = layers
            .iter()
            .enumerate()
            .map(|(l, &(experts, blob_bytes))| LayerSpec {
                name: format!("model.layers.{l}.mlp.experts"),
                experts,
                blob_bytes,
                tensors: vec![TensorIndex {
                    name: "w".into(),
                    dtype: "uint8".into(),
                    shape: vec![blob_bytes],
                    offset: 0,
                }],
            })
            .collect();
        let mut writer =
            StoreWriter::create(&dir, specs, serde_json::json!({"dtype": "float32"}), false)
                .unwrap();
        fs::write(writer.partial_dir().join("config.json"), br#"{"a": 1}"#).unwrap();
        writer.add_file("config.json", false).unwrap();
        fs::write(writer.partial_dir().join("weights"), [7u8; 300]).unwrap();
        writer.add_file("weights", true).unwrap();
        for (l, &(experts, bytes)) in layers.iter().enumerate() {
            for e in 0..experts as usize {
                writer
                    .write_expert(l, e, &vec![(l * 10 + e) as u8; bytes as usize])
                    .unwrap();
            }
        }
        writer.finish().unwrap();
        (root, dir)
    });
    dir
}

/// A copy of the base store with `index` (bytes) and, when given, a
/// replacement first page for layer-000.bin.
fn damaged_copy(index: &[u8], header: Option<&[u8]>) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(base_store()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    fs::write(copy.path().join(INDEX_FILE), index).unwrap();
    if let Some(page) = header {
        let path = copy.path().join(layer_file_name(0));
        let mut bytes = fs::read(&path).unwrap();
        bytes[..page.len()].copy_from_slice(page);
        fs::write(&path, bytes).unwrap();
    }
    copy
}

/// Opens the store in `dir` and, if that succeeds, reads every expert: a
/// store error is fine, anything else fails the property.
fn open_and_read(dir: &Path) -> std::result::Result<(), TestCaseError> {
    let store = match ExpertStore::open(dir) {
        Ok(store) => store,
        Err(CoreError::Store { .. }) => return Ok(()),
        Err(other) => return Err(TestCaseError::fail(format!("not a store error: {other}"))),
    };
    // Bounded by the files' real sizes, which open checked.
    let total: u64 = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    prop_assert!(store.max_span() as u64 <= total);
    let mut buf = vec![0u8; store.max_span() + 4096];
    let start = buf.as_ptr().align_offset(4096);
    for id in 0..store.layout().num_experts() as ExpertId {
        let span = store.span(id);
        match store.read(id, &mut buf[start..start + span]) {
            Ok(()) | Err(CoreError::Store { .. }) => {}
            Err(other) => return Err(TestCaseError::fail(format!("read: {other}"))),
        }
    }
    Ok(())
}

fn base_index() -> StoreIndex {
    serde_json::from_slice(&fs::read(base_store().join(INDEX_FILE)).unwrap()).unwrap()
}

/// Numbers an attacker would pick, and some ordinary ones.
fn any_number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(u64::MAX - 4095),
        Just(1u64 << 63),
        Just(HEADER_BYTES),
        0u64..100_000,
        any::<u64>(),
    ]
}

fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("layer-000.bin".to_string()),
        Just("layer-001.bin".to_string()),
        Just("config.json".to_string()),
        Just(INDEX_FILE.to_string()),
        Just("../store/layer-000.bin".to_string()),
        Just("/etc/hostname".to_string()),
        Just(String::new()),
        Just(".".to_string()),
        "[a-z.\\-/]{0,12}",
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    BlobOffset(usize, usize, u64),
    BlobBytes(usize, u64),
    Stride(usize, u64),
    LayerFile(usize, String),
    FileName(usize, String),
    FileBytes(usize, u64),
    FileCrc(usize, Option<u32>),
    FileCheck(usize, FileCheck),
    DropBlob(usize),
    DropLayer(usize),
    DropFile(usize),
    StoreId(u64),
}

fn any_edit() -> impl Strategy<Value = Edit> {
    let check = prop_oneof![
        Just(FileCheck::Blobs),
        Just(FileCheck::Open),
        Just(FileCheck::Reader)
    ];
    prop_oneof![
        (0..3usize, 0..4usize, any_number()).prop_map(|(l, e, n)| Edit::BlobOffset(l, e, n)),
        (0..3usize, any_number()).prop_map(|(l, n)| Edit::BlobBytes(l, n)),
        (0..3usize, any_number()).prop_map(|(l, n)| Edit::Stride(l, n)),
        (0..3usize, any_name()).prop_map(|(l, n)| Edit::LayerFile(l, n)),
        (0..5usize, any_name()).prop_map(|(f, n)| Edit::FileName(f, n)),
        (0..5usize, any_number()).prop_map(|(f, n)| Edit::FileBytes(f, n)),
        (0..5usize, any::<Option<u32>>()).prop_map(|(f, c)| Edit::FileCrc(f, c)),
        (0..5usize, check).prop_map(|(f, c)| Edit::FileCheck(f, c)),
        (0..3usize).prop_map(Edit::DropBlob),
        (0..3usize).prop_map(Edit::DropLayer),
        (0..5usize).prop_map(Edit::DropFile),
        any::<u64>().prop_map(Edit::StoreId),
    ]
}

fn apply(index: &mut StoreIndex, edit: Edit) {
    let layers = index.layers.len();
    let files = index.files.len();
    match edit {
        Edit::BlobOffset(l, e, n) if l < layers => {
            if let Some(blob) = index.layers[l].blobs.get_mut(e) {
                blob.offset = n;
            }
        }
        Edit::BlobBytes(l, n) if l < layers => index.layers[l].blob_bytes = n,
        Edit::Stride(l, n) if l < layers => index.layers[l].stride = n,
        Edit::LayerFile(l, name) if l < layers => index.layers[l].file = name,
        Edit::FileName(f, name) if f < files => index.files[f].name = name,
        Edit::FileBytes(f, n) if f < files => index.files[f].bytes = n,
        Edit::FileCrc(f, c) if f < files => index.files[f].crc32 = c,
        Edit::FileCheck(f, c) if f < files => index.files[f].check = c,
        Edit::DropBlob(l) if l < layers => {
            index.layers[l].blobs.pop();
        }
        Edit::DropLayer(l) if l < layers => {
            index.layers.remove(l);
        }
        Edit::DropFile(f) if f < files => {
            index.files.remove(f);
        }
        Edit::StoreId(id) => index.store_id = id,
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_as_the_index_are_a_store_error(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let dir = damaged_copy(&bytes, None);
        let opened = ExpertStore::open(dir.path());
        prop_assert!(matches!(opened, Err(CoreError::Store { .. })), "{:?}", opened.err());
    }

    #[test]
    fn a_mutated_index_text_opens_correctly_or_is_a_store_error(
        cuts in proptest::collection::vec((any::<prop::sample::Index>(), 0..4u8, any::<u8>()), 1..6)
    ) {
        let mut text = fs::read(base_store().join(INDEX_FILE)).unwrap();
        for (at, kind, byte) in cuts {
            let at = at.index(text.len());
            match kind {
                0 => text[at] ^= byte | 1,
                1 => { text.remove(at); }
                2 => text.insert(at, byte),
                // A digit: the kind of change that still parses.
                _ => if text[at].is_ascii_digit() { text[at] = b'0' + byte % 10 },
            }
        }
        let dir = damaged_copy(&text, None);
        open_and_read(dir.path())?;
    }

    #[test]
    fn hostile_numbers_and_names_in_a_well_formed_index_are_a_store_error(
        edits in proptest::collection::vec(any_edit(), 1..5)
    ) {
        let mut index = base_index();
        for edit in edits {
            apply(&mut index, edit);
        }
        let dir = damaged_copy(&serde_json::to_vec(&index).unwrap(), None);
        open_and_read(dir.path())?;
    }

    #[test]
    fn hostile_blob_geometry_is_a_store_error(
        l in 0..2usize,
        e in 0..2usize,
        offset in prop::option::of(prop_oneof![
            Just(u64::MAX - 4095),
            any::<u64>().prop_map(|n| n & !4095),
            (1u64..8).prop_map(|k| k * 4096),
        ]),
        blob_bytes in prop::option::of(any_number()),
        stride in prop::option::of(any_number()),
    ) {
        let mut index = base_index();
        let layer = &mut index.layers[l];
        if let Some(offset) = offset {
            layer.blobs[e].offset = offset;
        }
        layer.blob_bytes = blob_bytes.unwrap_or(layer.blob_bytes);
        layer.stride = stride.unwrap_or(layer.stride);
        let dir = damaged_copy(&serde_json::to_vec(&index).unwrap(), None);
        open_and_read(dir.path())?;
    }

    #[test]
    fn a_damaged_layer_file_header_is_a_store_error(
        page in proptest::collection::vec(any::<u8>(), 24..64),
        keep_magic in any::<bool>(),
    ) {
        let mut page = page;
        if keep_magic {
            page[..8].copy_from_slice(b"MOEXSTOR");
        }
        let index = fs::read(base_store().join(INDEX_FILE)).unwrap();
        let dir = damaged_copy(&index, Some(&page));
        let opened = ExpertStore::open(dir.path());
        prop_assert!(matches!(opened, Err(CoreError::Store { .. })), "{:?}", opened.err());
        prop_assert!(FileHeader::decode(&page).is_err() || keep_magic);
    }
}

#[test]
fn the_base_store_opens_and_reads() {
    open_and_read(base_store()).unwrap();
    assert!(ExpertStore::open(base_store()).is_ok());
}
