"""Prefetch queue throughput: 1 and 4 producer threads pushing copy requests
(a third on demand, the rest prefetches of varying priority, with some
re-planning) while one consumer pops them all, driven inside the core so the
bindings' overhead is not what is measured.

    .venv/bin/python -m pytest benches/bench_queue.py --benchmark-only

Requests per second = `extra_info["requests"]` / the median time (the figure
the README gives).
"""

from __future__ import annotations

import pytest

from moe_offload import _core

REQUESTS = 200_000


@pytest.mark.parametrize("producers", [1, 4])
def test_push_pop(benchmark, producers):
    per_producer = REQUESTS // producers
    benchmark.extra_info["requests"] = producers * per_producer
    delivered = benchmark(_core.exercise_queue, producers, 1, per_producer)
    assert delivered == producers * per_producer
