"""EAMC search: one incremental layer update plus a best-match query, for a
DeepSeek-V2-Lite-shaped collection (L=27, E=64, top-6), K = 1,000 and 10,000.

    .venv/bin/python -m pytest benches/bench_eamc.py --benchmark-only

The timings include the Python call overhead of the bindings (~1 us per call).
"""

from __future__ import annotations

import numpy as np
import pytest

from moe_offload import _core

LAYERS, EXPERTS, TOP_K = 27, 64, 6


def filled_collection(capacity: int) -> _core.ActivationCollection:
    rng = np.random.default_rng(0)
    eamc = _core.ActivationCollection(capacity, LAYERS, EXPERTS)
    for _ in range(capacity):
        counts = rng.poisson(1.5, size=LAYERS * EXPERTS).astype(np.uint32)
        eamc.insert(counts.tolist())
    return eamc


@pytest.mark.parametrize("capacity", [1_000, 10_000])
def test_layer_update_and_match(benchmark, capacity):
    eamc = filled_collection(capacity)
    assert len(eamc) == capacity
    matcher = eamc.matcher()
    rng = np.random.default_rng(1)
    tokens = [rng.choice(EXPERTS, TOP_K, replace=False).tolist() for _ in range(256)]
    state = {"step": 0}

    def update_and_match():
        step = state["step"]
        state["step"] = step + 1
        matcher.observe(step % LAYERS, tokens[step % len(tokens)])
        return matcher.best(4)

    best = benchmark(update_and_match)
    assert len(best) == 4
