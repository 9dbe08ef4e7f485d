"""The policy lab's building blocks through the bindings: the EAMC file,
cosine matching against a NumPy reference, and trace replay."""

from __future__ import annotations

import numpy as np
import pytest

from moe_offload import MoeOffloadError, _core


def random_eam(rng, layers, experts, tokens, top_k):
    counts = np.zeros((layers, experts), dtype=np.uint32)
    for _ in range(tokens):
        for layer in range(layers):
            counts[layer, rng.choice(experts, top_k, replace=False)] += 1
    return counts


def test_eamc_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(0)
    eamc = _core.ActivationCollection(8, 3, 16, "least-matched")
    entries = [random_eam(rng, 3, 16, 5, 2) for _ in range(5)]
    for e in entries:
        eamc.insert(e.ravel().tolist())
    path = tmp_path / "warm.eamc"
    eamc.save(path)
    back = _core.ActivationCollection.load(path)
    assert len(back) == 5 and back.capacity == 8 and back.shape == (3, 16)
    for i, e in enumerate(entries):
        assert back.entry(i) == e.ravel().tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["warm.eamc"], "no temporary file is left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty"])
def test_a_damaged_eamc_file_is_a_clear_error(tmp_path, damage):
    eamc = _core.ActivationCollection(4, 2, 8)
    eamc.insert([1] * 16)
    path = tmp_path / "x.eamc"
    eamc.save(path)
    data = path.read_bytes()
    broken = {
        "truncate": data[: len(data) // 2],
        "flip": data[:40] + bytes([data[40] ^ 1]) + data[41:],
        "foreign": b"\x89PNG\r\n\x1a\n" + data[8:],
        "empty": b"",
    }[damage]
    path.write_bytes(broken)
    with pytest.raises(MoeOffloadError, match="x.eamc"):
        _core.ActivationCollection.load(path)
    with pytest.raises(MoeOffloadError, match="missing.eamc"):
        _core.ActivationCollection.load(tmp_path / "missing.eamc")


@pytest.mark.parametrize("seed", range(5))
def test_incremental_cosine_agrees_with_numpy(seed):
    rng = np.random.default_rng(seed)
    layers, experts, top_k = int(rng.integers(2, 8)), int(rng.integers(4, 40)), 2
    eamc = _core.ActivationCollection(32, layers, experts)
    entries = np.stack([random_eam(rng, layers, experts, int(rng.integers(1, 20)), top_k) for _ in range(32)])
    for e in entries:
        eamc.insert(e.ravel().tolist())
    matcher = eamc.matcher()
    own = np.zeros((layers, experts))
    for _token in range(3):
        for layer in range(layers):
            ids = rng.choice(experts, top_k, replace=False)
            matcher.observe(layer, ids.tolist())
            own[layer, ids] += 1
            seen = own.sum(axis=1) > 0
            a = own[seen].ravel()
            b = entries[:, seen, :].reshape(32, -1).astype(float)
            want = b @ a / (np.linalg.norm(a) * np.linalg.norm(b, axis=1))
            np.testing.assert_allclose(matcher.similarities(), want, rtol=1e-5, atol=1e-6)
    best = matcher.best(3)
    assert [i for i, _ in best] == list(np.argsort(-want, kind="stable")[:3])


def routing(rng, tokens, layers, experts, top_k):
    ids = np.stack(
        [np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)]) for _ in range(tokens)]
    )
    return np.ascontiguousarray(ids, dtype=np.uint32)


def test_replay_compares_policies_on_one_trace():
    rng = np.random.default_rng(1)
    requests = [routing(rng, 40, 4, 8, 2) for _ in range(6)]
    raw = [(r.shape[0], r.ctypes.data, r.size) for r in requests]
    params = dict(
        layers=4,
        experts=8,
        top_k=2,
        slots=8,
        expert_bytes=1 << 20,
        bandwidth_bytes_per_s=1e10,
        layer_compute_s=1e-4,
    )
    results = {
        p: _core.replay(p, raw, [], **params)
        for p in ("lru", "lfu", "reference", "oracle", "activation-aware")
    }
    accesses = 6 * 40 * 4 * 2
    for name, r in results.items():
        assert r["accesses"] == accesses, name
        assert r["hits"] + r["misses"] == accesses
        assert r["total_s"] >= r["resident_s"] + r["stall_s"] - 1e-9
    assert results["oracle"]["hits"] >= max(r["hits"] for n, r in results.items() if n != "activation-aware")
    assert results["lru"]["prefetch_copies"] == 0
    with pytest.raises(MoeOffloadError, match="expert ids"):
        bad = np.full((1, 4, 2), 9, dtype=np.uint32)
        _core.replay("lru", [(1, bad.ctypes.data, bad.size)], [], **params)
