"""Copy engine throughput: experts moved into slots by the core's copy
worker, against a plain copy of the same amount of memory, alternating round
by round so both see the same machine.

- CPU (host backend): the worker's memcpy from the host tier into a slot,
  against a plain memcpy (one thread, as a copy worker is).
- GPU: the worker's cuMemcpyHtoDAsync from the pinned host tier, against a
  plain cudaMemcpyAsync from a pinned tensor (torch's non-blocking copy).

    .venv/bin/python -m pytest benches/bench_copy.py --benchmark-only

A round moves four experts of 16 MiB, each a miss, cycling through 32
experts (the plain copy cycles through as much source memory). The timed
statistics are the engine's rounds; `extra_info` holds the interleaved
medians of both in GB/s and their ratio.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from moe_offload import _core

EXPERT_BYTES = 16 << 20
EXPERTS = 32
SLOTS = 4
ROUND_BYTES = SLOTS * EXPERT_BYTES
INTERLEAVED_ROUNDS = 40
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def engine_rounds(device: str) -> tuple[Callable[[], None], _core.ExpertCache]:
    pool = torch.empty(SLOTS * EXPERT_BYTES, dtype=torch.uint8, device=device)
    cache = _core.ExpertCache(
        layers=[(EXPERTS, EXPERT_BYTES)],
        pool_address=pool.data_ptr(),
        pool_owner=pool,
        slot_bytes=EXPERT_BYTES,
        n_slots=SLOTS,
        device="cpu" if device == "cpu" else "cuda:0",
        policy="lru",
    )
    source = torch.ones(EXPERT_BYTES, dtype=torch.uint8)
    for e in range(EXPERTS):
        cache.write_expert(0, e, 0, source.data_ptr(), EXPERT_BYTES)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    state = {"next": 0}

    def round_of_misses() -> None:
        experts = [(state["next"] + i) % EXPERTS for i in range(SLOTS)]
        state["next"] += SLOTS
        cache.fetch(0, experts)
        for e in experts:
            cache.wait(0, e, stream)
        cache.release(0, experts, stream)
        _sync(device)

    return round_of_misses, cache


def plain_rounds(device: str) -> Callable[[], None]:
    source = torch.ones(EXPERTS * EXPERT_BYTES, dtype=torch.uint8, pin_memory=device == "cuda")
    target = torch.empty(ROUND_BYTES, dtype=torch.uint8, device=device)
    state = {"next": 0}

    def plain() -> None:
        start = (state["next"] % (EXPERTS // SLOTS)) * ROUND_BYTES
        state["next"] += 1
        if device == "cpu":
            ctypes.memmove(target.data_ptr(), source.data_ptr() + start, ROUND_BYTES)
        else:
            target.copy_(source[start : start + ROUND_BYTES], non_blocking=True)
            _sync(device)

    return plain


def _seconds(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


@pytest.mark.parametrize("device", DEVICES)
def test_copy_engine_against_a_plain_copy(benchmark, device):
    engine, cache = engine_rounds(device)
    plain = plain_rounds(device)
    engine_s, plain_s = [], []
    for _ in range(INTERLEAVED_ROUNDS):
        engine_s.append(_seconds(engine))
        plain_s.append(_seconds(plain))
    engine_gbps = ROUND_BYTES / statistics.median(engine_s) / 1e9
    plain_gbps = ROUND_BYTES / statistics.median(plain_s) / 1e9
    benchmark.extra_info.update(
        bytes=ROUND_BYTES, engine_gbps=engine_gbps, plain_gbps=plain_gbps, ratio=engine_gbps / plain_gbps
    )
    benchmark(engine)
    assert cache.stats()["hits"] == 0
