"""The Rust cache through its Python bindings: the fetch / wait / release
protocol, its errors, and that long calls release the GIL."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moe_offload import BudgetError, MoeOffloadError, _core


def make_cache(layers=((4, 1000),), n_slots=2, slot_bytes=4096, **kwargs):
    pool = torch.zeros(n_slots * slot_bytes, dtype=torch.uint8)
    cache = _core.ExpertCache(
        layers=list(layers),
        pool_address=pool.data_ptr(),
        pool_owner=pool,
        slot_bytes=slot_bytes,
        n_slots=n_slots,
        **kwargs,
    )
    return cache, pool


def fill(cache, layer, expert, nbytes, value):
    data = torch.full((nbytes,), value, dtype=torch.uint8)
    cache.write_expert(layer, expert, 0, data.data_ptr(), nbytes)


def test_fetched_experts_land_in_their_slots():
    cache, pool = make_cache()
    assert cache.backend == "host"
    for e in range(4):
        fill(cache, 0, e, 1000, e + 1)
    slots = cache.fetch(0, [2, 3])
    for expert, slot in zip([2, 3], slots, strict=True):
        cache.wait(0, expert)
        assert torch.all(pool[slot * 4096 : slot * 4096 + 1000] == expert + 1)
    cache.release(0, [2, 3])
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["bytes_to_device"]) == (0, 2, 2000)
    cache.fetch(0, [3])
    cache.wait(0, 3)
    cache.release(0, [3])
    assert cache.stats()["hits"] == 1
    assert cache.stats()["layer_hit_rates"] == [1 / 3]


def test_read_back_gives_what_was_written():
    cache, _ = make_cache()
    data = torch.arange(1000, dtype=torch.int32).view(torch.uint8)[:1000].clone()
    cache.write_expert(0, 1, 0, data.data_ptr(), 1000)
    out = torch.empty(600, dtype=torch.uint8)
    cache.read_expert(0, 1, 400, out.data_ptr(), 600)
    assert torch.equal(out, data[400:])


def test_protocol_errors_are_reported():
    cache, _ = make_cache()
    with pytest.raises(MoeOffloadError, match="not fetched"):
        cache.wait(0, 1)
    with pytest.raises(MoeOffloadError, match="not fetched"):
        cache.release(0, [1])
    with pytest.raises(MoeOffloadError, match="unknown expert 9"):
        cache.fetch(0, [9])
    with pytest.raises(MoeOffloadError, match="twice"):
        cache.fetch(0, [1, 1])
    with pytest.raises(MoeOffloadError, match="outside expert"):
        cache.write_expert(0, 0, 900, 0, 200)
    with pytest.raises(BudgetError, match="2 free"):
        cache.fetch(0, [0, 1, 2])
    cache.fetch(0, [0])
    with pytest.raises(MoeOffloadError, match="cached on the device"):
        fill(cache, 0, 0, 10, 1)


def test_invalid_configurations_are_refused():
    with pytest.raises(MoeOffloadError, match="largest expert"):
        make_cache(layers=[(2, 5000)], slot_bytes=4096)
    with pytest.raises(MoeOffloadError, match="device"):
        make_cache(device="tpu:0")
    with pytest.raises(MoeOffloadError, match="policy"):
        make_cache(policy="nope")


def test_long_core_calls_release_the_gil():
    """While one thread is inside a long core call (copying 256 MiB into the
    host tier), another thread keeps running Python: their time windows overlap."""
    size = 256 << 20
    cache, _ = make_cache(layers=[(1, size)], n_slots=1, slot_bytes=size)
    source = torch.ones(size, dtype=torch.uint8)
    call_windows: list[tuple[float, float]] = []
    ticks: list[float] = []
    done = threading.Event()

    def writer():
        for _ in range(3):
            start = time.perf_counter()
            cache.write_expert(0, 0, 0, source.data_ptr(), size)
            call_windows.append((start, time.perf_counter()))
        done.set()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())

    threads = [threading.Thread(target=writer), threading.Thread(target=ticker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    inside = [t for t in ticks for (a, b) in call_windows if a < t < b]
    assert len(inside) > 100, f"only {len(inside)} Python steps ran during {call_windows}"


def test_the_cuda_driver_status_is_reported_without_failing():
    ok, message = _core.cuda_driver_status()
    assert isinstance(ok, bool)
    # Either the driver loaded, or the message says which library was missing.
    assert ("loaded" in message) if ok else ("libcuda.so.1" in message)
    if torch.cuda.is_available():
        assert ok, message
