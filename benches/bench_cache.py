"""Microbenchmarks of the core's fetch / wait / release protocol (host backend).

.venv/bin/python -m pytest benches/bench_cache.py --benchmark-only
"""

from __future__ import annotations

import torch

from moe_offload import _core

EXPERT_BYTES = 1 << 20


def make_cache(n_experts: int, n_slots: int) -> tuple[_core.ExpertCache, torch.Tensor]:
    """A cache whose every expert is written with data first: a host tier
    never written would be the kernel's shared zero page, which a copy reads
    more than twice as fast as real memory."""
    pool = torch.empty(n_slots * EXPERT_BYTES, dtype=torch.uint8)
    cache = _core.ExpertCache(
        layers=[(n_experts, EXPERT_BYTES)],
        pool_address=pool.data_ptr(),
        pool_owner=pool,
        slot_bytes=EXPERT_BYTES,
        n_slots=n_slots,
    )
    for expert in range(n_experts):
        data = torch.full((EXPERT_BYTES,), expert + 1, dtype=torch.uint8)
        cache.write_expert(0, expert, 0, data.data_ptr(), EXPERT_BYTES)
    return cache, pool


def test_hit_round_trip(benchmark):
    """A cached expert: the protocol's fixed cost per layer."""
    cache, _ = make_cache(8, 8)
    cache.fetch(0, [0, 1])
    cache.wait(0, 0)
    cache.wait(0, 1)
    cache.release(0, [0, 1])
    cache.reset_stats()

    def step():
        cache.fetch(0, [0, 1])
        cache.wait(0, 0)
        cache.wait(0, 1)
        cache.release(0, [0, 1])

    benchmark(step)
    stats = cache.stats()
    assert stats["misses"] == 0 and stats["hits"] > 0


def test_miss_round_trip_1mib(benchmark):
    """Two misses of 1 MiB each: queue, copy worker, memcpy, wake-up."""
    cache, pool = make_cache(64, 2)
    state = {"next": 0}

    def step():
        a = state["next"] % 64
        b = (a + 1) % 64
        state["next"] += 2
        cache.fetch(0, [a, b])
        cache.wait(0, a)
        cache.wait(0, b)
        cache.release(0, [a, b])

    benchmark(step)
    stats = cache.stats()
    assert stats["hits"] == 0 and stats["misses"] > 0
    # The slots hold what was written, not zeros.
    assert pool.count_nonzero().item() == pool.numel()
