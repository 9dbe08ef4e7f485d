"""EAMC search and the live path's tracing cost, for a DeepSeek-V2-Lite-shaped
collection (its 26 MoE layers — the first of its 27 layers is dense —, E=64,
top-6).

    .venv/bin/python -m pytest benches/bench_eamc.py --benchmark-only

`test_layer_update_and_match`: one incremental layer update of a request's
matcher plus a best-match query against K = 1,000 and 10,000 entries (the
timings include the bindings' call overhead, about 1 us).
`test_observe_on_the_forward_path`: what a patched MoE layer spends handing
its routing to the planner thread, which traces, matches and plans while
the layer goes on to fetch its experts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_offload import _core

LAYERS, EXPERTS, TOP_K = 26, 64, 6


def filled_collection(capacity: int, entries: int | None = None) -> _core.ActivationCollection:
    rng = np.random.default_rng(0)
    eamc = _core.ActivationCollection(capacity, LAYERS, EXPERTS)
    for _ in range(capacity if entries is None else entries):
        counts = rng.poisson(1.5, size=LAYERS * EXPERTS).astype(np.uint32)
        eamc.insert(counts.tolist())
    return eamc


def random_tokens(n: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.choice(EXPERTS, TOP_K, replace=False).tolist() for _ in range(n)]


@pytest.mark.parametrize("capacity", [1_000, 10_000])
def test_layer_update_and_match(benchmark, capacity):
    eamc = filled_collection(capacity)
    assert len(eamc) == capacity
    matcher = eamc.matcher()
    tokens = random_tokens(256)
    state = {"step": 0}

    def update_and_match():
        step = state["step"]
        state["step"] = step + 1
        matcher.observe(step % LAYERS, tokens[step % len(tokens)])
        return matcher.best(4)

    best = benchmark(update_and_match)
    assert len(best) == 4


def test_observe_on_the_forward_path(benchmark):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k1000.eamc"
        # One place free: the measured request joins when it ends.
        filled_collection(1_000, entries=999).save(path)
        pool = torch.zeros(64 * 4096, dtype=torch.uint8)
        cache = _core.ExpertCache(
            layers=[(EXPERTS, 4000)] * LAYERS,
            pool_address=pool.data_ptr(),
            pool_owner=pool,
            slot_bytes=4096,
            n_slots=64,
            eamc_path=path,
        )
    assert cache.eamc_len == 999
    cache.begin_requests(1)
    tokens = random_tokens(LAYERS)
    state = {"step": 0}

    def observe():
        layer = state["step"] % LAYERS
        state["step"] += 1
        cache.observe(layer, tokens[layer], TOP_K)

    benchmark(observe)
    cache.end_requests()
    assert cache.eamc_len == 1_000  # the observed request finished and joined
