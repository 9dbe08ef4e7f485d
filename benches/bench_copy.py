"""Copy engine throughput: experts moved into slots by the core's copy
worker, against a plain copy of the same bytes in the same run.

- CPU (host backend): the worker's memcpy from the host tier into a slot,
  against a plain memcpy of the same bytes between two host buffers (one
  thread, as a copy worker is).
- GPU: the worker's cuMemcpyHtoDAsync from the pinned host tier, against a
  plain cudaMemcpyAsync from a pinned tensor (torch's non-blocking copy).

    .venv/bin/python -m pytest benches/bench_copy.py --benchmark-only

Each round moves `extra_info["bytes"]`: four experts of 16 MiB, every one a
miss; throughput = bytes / mean time.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from moe_offload import _core

EXPERT_BYTES = 16 << 20
EXPERTS = 32
SLOTS = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_copy_engine(benchmark, device):
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

    def round_of_misses():
        experts = [(state["next"] + i) % EXPERTS for i in range(SLOTS)]
        state["next"] += SLOTS
        cache.fetch(0, experts)
        for e in experts:
            cache.wait(0, e, stream)
        cache.release(0, experts, stream)
        _sync(device)

    benchmark.extra_info["bytes"] = SLOTS * EXPERT_BYTES
    benchmark(round_of_misses)
    assert cache.stats()["hits"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_plain_copy(benchmark, device):
    # Cycling through as much source memory as the engine's host tier holds,
    # so both copy from memory that is not in any cache.
    source = torch.ones(EXPERTS * EXPERT_BYTES, dtype=torch.uint8, pin_memory=device == "cuda")
    target = torch.empty(SLOTS * EXPERT_BYTES, dtype=torch.uint8, device=device)
    chunk = SLOTS * EXPERT_BYTES
    state = {"next": 0}

    def plain():
        start = (state["next"] % (EXPERTS // SLOTS)) * chunk
        state["next"] += 1
        if device == "cpu":
            ctypes.memmove(target.data_ptr(), source.data_ptr() + start, chunk)
        else:
            target.copy_(source[start : start + chunk], non_blocking=True)
            _sync(device)

    benchmark.extra_info["bytes"] = SLOTS * EXPERT_BYTES
    benchmark(plain)
