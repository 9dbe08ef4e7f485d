"""Fuzzing what the Python side reads of a store: the index's `meta` (the
core checks the rest of the index; its fuzzing of the index and the layer
files' headers is in rust/src/tiers/store/fuzz_tests.rs) and the safetensors
header of the non-expert weights. Random and mutated inputs only ever give
a correct result or a `StoreError` naming the file — never another
exception, or memory sized from what the file claims. Each runs a fixed
number of examples."""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import build

import moe_offload
from moe_offload import StoreError
from moe_offload._core import ExpertStore
from moe_offload.checkpoint import read_safetensors_header
from moe_offload.loading import _meta, _stored_non_experts

MEMORY_BOUND = 32 << 20
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    build("mixtral").save_pretrained(root / "checkpoint")
    moe_offload.convert(root / "checkpoint", root / "store")
    return root / "store"


@pytest.fixture
def scratch(store, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    return copy


def metas() -> st.SearchStrategy:
    """The valid meta with fields deleted or replaced by any JSON, or any JSON."""
    keys = st.sampled_from(["dtype", "source", "non_experts", "architectures", "written_by"])
    edits = st.lists(st.tuples(keys, st.one_of(st.just("<delete>"), JSON)), max_size=3)
    source = st.dictionaries(st.sampled_from(["path", "fingerprint"]), JSON, max_size=2)
    return st.one_of(JSON, edits, st.tuples(st.just("source"), source).map(lambda kv: [kv]))


@FUZZ
@given(meta=metas())
def test_any_meta_in_an_index_is_read_or_refused_by_name(store, scratch, meta):
    index_path = scratch / "moe-store.json"
    index = json.loads((store / "moe-store.json").read_text())
    if isinstance(meta, list) and all(isinstance(e, tuple) for e in meta):
        for key, value in meta:
            if value == "<delete>":
                index["meta"].pop(key, None)
            else:
                index["meta"][key] = value
    else:
        index["meta"] = meta
    index_path.write_text(json.dumps(index))
    opened = ExpertStore.open(scratch)  # the core does not look inside meta
    try:
        read = _meta(opened)
    except StoreError as e:
        assert "moe-store.json" in str(e) and "moe-offload convert" in str(e)
        return
    assert isinstance(read["dtype"], str) and isinstance(read["source"]["fingerprint"], str)


def headers(original: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes; the file's own header with its JSON values replaced;
    or with bytes flipped, its length claim included."""
    (length,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8 : 8 + length])
    names = sorted(header)

    def replaced(edits: list[tuple[int, str, object]]) -> bytes:
        changed = json.loads(json.dumps(header))
        for n, key, value in edits:
            entry = changed[names[n % len(names)]]
            if isinstance(entry, dict):
                entry[key] = value
        text = json.dumps(changed).encode()
        return struct.pack("<Q", len(text)) + text + original[8 + length :]

    def flipped(flips: list[tuple[int, int]]) -> bytes:
        data = bytearray(original)
        for at, bits in flips:
            data[at % (8 + length)] ^= bits
        return bytes(data)

    fields = st.sampled_from(["dtype", "shape", "data_offsets"])
    numbers = st.integers(-(2**64), 2**64) | st.just(2**63)
    values = st.one_of(JSON, st.lists(numbers, max_size=3), st.sampled_from(["F32", "BF16", "X9"]))
    return st.one_of(
        st.binary(max_size=400),
        st.lists(st.tuples(st.integers(0, 99), fields, values), min_size=1, max_size=3).map(replaced),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4).map(flipped),
    )


@pytest.fixture(scope="module")
def non_experts(store) -> bytes:
    return (store / "non-experts.safetensors").read_bytes()


@FUZZ
@given(data=st.data())
def test_any_non_expert_weights_header_is_read_or_refused_by_name(scratch, non_experts, data):
    path = scratch / "non-experts.safetensors"
    damaged = data.draw(headers(non_experts))
    path.write_bytes(damaged)
    tracemalloc.start()
    try:
        read_safetensors_header(path)
        list(_stored_non_experts(path, zlib.crc32(non_experts)))
    except StoreError as e:
        assert str(path) in str(e)
    else:
        assert damaged == non_experts, "damage was read without a word"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BOUND + 2 * len(damaged)
