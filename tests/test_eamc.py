"""The EAMC through the bindings: sizes from arguments and files are checked
before anything is allocated (an error, never an abort or a panic), a path
that names no file is refused with the reason, and a save cleans up after a
writer that was killed."""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
import torch

from moe_offload import MoeOffloadError, _core
from moe_offload.cli import main
from moe_offload.traces import Request, Trace, write_trace

TOO_LARGE = [10**10, 2**62]
NOT_A_COUNT = [-1, 2**64]


def make_cache(**planner):
    slot_bytes = 4096
    pool = torch.zeros(4 * slot_bytes, dtype=torch.uint8)
    return _core.ExpertCache(
        layers=[(4, 100), (4, 100)],
        pool_address=pool.data_ptr(),
        pool_owner=pool,
        slot_bytes=slot_bytes,
        n_slots=4,
        **planner,
    )


# Capacities that aborted the process (allocation failure), raised a
# PanicException ("capacity overflow") or a bare OverflowError.
@pytest.mark.parametrize("capacity", TOO_LARGE + NOT_A_COUNT)
def test_an_eamc_capacity_from_an_argument_is_checked_before_allocating(capacity, tmp_path, capsys):
    if capacity in TOO_LARGE:
        with pytest.raises(MoeOffloadError, match="1000000"):
            _core.ActivationCollection(capacity, 27, 64)
    with pytest.raises(MoeOffloadError, match="eamc_capacity"):
        make_cache(eamc_capacity=capacity)
    routing = np.arange(2 * 3 * 2, dtype=np.uint32).reshape(2, 3, 2) % 8
    with pytest.raises(MoeOffloadError, match="eamc_capacity"):
        _core.replay(
            "activation-aware",
            [(2, routing.ctypes.data, routing.size)],
            [],
            layers=3,
            experts=8,
            top_k=2,
            slots=8,
            expert_bytes=4096,
            bandwidth_bytes_per_s=1e10,
            layer_compute_s=1e-4,
            eamc_capacity=capacity,
        )

    # The command says what is wrong in one line.
    trace = tmp_path / "t.jsonl"
    write_trace(trace, Trace(3, 8, 2, "unit", [Request("r0", routing)]))
    code = main(["replay", str(trace), "--expert-bytes", "4096", "--eamc-capacity", str(capacity)])
    err = capsys.readouterr().err
    assert code != 0
    assert re.search("eamc.capacity", err) and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def _with_header_word(data: bytes, word: int, value: int) -> bytes:
    """The file with header word `word` (1 layers, 2 experts, 3 capacity,
    4 entries) set and its checksum recomputed."""
    at = 8 + 4 * word
    body = data[:at] + struct.pack("<I", value) + data[at + 4 : -4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("word", "value"), [(3, 0xFFFFFFFF), (1, 0xFFFFFF), (2, 0xFFFFFFFF), (4, 0xFFFFFFFF)]
)
def test_an_eamc_file_whose_header_claims_too_much_is_a_clear_error(tmp_path, word, value):
    eamc = _core.ActivationCollection(4, 2, 8)
    eamc.insert([1] * 16)
    path = tmp_path / "big.eamc"
    eamc.save(path)
    path.write_bytes(_with_header_word(path.read_bytes(), word, value))
    with pytest.raises(MoeOffloadError, match="big.eamc"):
        _core.ActivationCollection.load(path)
    with pytest.raises(MoeOffloadError, match="big.eamc"):
        make_cache(eamc_path=path)


@pytest.mark.parametrize(
    ("name", "says"),
    [("", "empty path"), (".", "names a directory"), ("missing/x.eamc", "not an existing directory")],
)
def test_saving_to_a_path_that_names_no_file_says_what_is_wrong(tmp_path, monkeypatch, name, says):
    monkeypatch.chdir(tmp_path)
    cache = make_cache()
    with pytest.raises(MoeOffloadError, match=says):
        cache.save_eamc(name)
    eamc = _core.ActivationCollection(4, 2, 8)
    with pytest.raises(MoeOffloadError, match=says):
        eamc.save(name)
    assert list(tmp_path.iterdir()) == []


def test_an_offloader_saves_to_the_path_as_given(tmp_path, monkeypatch):
    from tiny_models import build

    import moe_offload

    monkeypatch.chdir(tmp_path)
    model = build("olmoe")
    offloader = moe_offload.patch(model, device="cpu")
    with pytest.raises(MoeOffloadError, match="empty path"):
        offloader.save_eamc("")
    assert str(offloader.save_eamc("warm.eamc")) == "warm.eamc"
    moe_offload.unpatch(model)
    assert list(tmp_path.iterdir()) == [tmp_path / "warm.eamc"]


def test_a_save_removes_what_a_killed_save_left(tmp_path):
    path = tmp_path / "warm.eamc"
    stale = tmp_path / ".warm.eamc.tmp-4194304"
    stale.write_bytes(b"half of a file")
    make_cache().save_eamc(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm.eamc"]
    assert len(_core.ActivationCollection.load(path)) == 0
