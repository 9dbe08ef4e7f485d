"""CPU expert kernel: one expert's FFN for one token, computed with torch's
CPU kernels straight from host memory, against a plain read of as many bytes
of memory, alternating round by round so both see the same machine and the
same thread count (`torch.get_num_threads()`).

- The expert: DeepSeek-V2-Lite (hidden 2048, intermediate 1408) and
  Mixtral-8x7B (hidden 4096, intermediate 14336) shapes, in float32 and
  bfloat16, laid out as the models hold it (transformers' fused
  `gate_up_proj` [2I, H], then `down_proj` [H, I]) in one contiguous block per
  expert, as the host tier stores it. One `torch.mv` per projection, then
  SiLU(gate) * up: the call form measured fastest in bfloat16 and as fast as
  `F.linear` / `x @ w.T` in float32.
- The plain read: `torch.sum` over the bytes of another expert's block
  (viewed as float32). It reads every byte once, spread over all torch
  threads, and writes a single scalar, so its time is the memory's read
  bandwidth; a copy would also count the writes.

    .venv/bin/python -m pytest benches/bench_cpu_expert.py --benchmark-only

A second benchmark, `test_cpu_expert_by_tokens`, times the same expert for
1 to 64 tokens in the form the live path computes it (`F.linear` on a
[tokens, hidden] input, as transformers' eager experts do), with one thread
and with every torch thread: the CPU's time per expert against the token
count, from which `cpu_experts="auto"` learns, and where copying an expert
to a GPU starts to win (`extra_info`: median microseconds, and the token
count's time against one token's).

Both cycle through enough experts (at least 1 GiB and 8 last-level caches,
at least two experts) that every byte comes from memory, not from a cache;
with a 32 MiB last-level cache, 32 DeepSeek-V2-Lite experts in float32 and
2 Mixtral-8x7B experts (704 MB each), 1.4 GB at most. The plain read runs
half a cycle ahead of the expert, so it never reads a block the expert has
just pulled into the cache. The timed statistic is the expert kernel;
`extra_info` holds the interleaved medians of both in GB/s (bytes of the
expert / time), their ratio and the thread count. The result is checked
once against a float64 reference: a kernel that computes garbage fast
measures nothing.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SHAPES = {"deepseek-v2-lite": (2048, 1408), "mixtral-8x7b": (4096, 14336)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIN_WORKING_SET_BYTES = 1 << 30
INTERLEAVED_ROUNDS = 40
# ||kernel - float64|| / ||float64||, about 10x what the kernel shows: float32
# accumulates in float32 (about 1e-6); bfloat16 rounds gate, up, their product
# and the output to 8 bits of mantissa (about 4e-3). Swapping gate and up, or
# reading a projection transposed, gives 0.5 and more.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
REFERENCE_ROWS = 1024


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (0 where it reports none)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=0)


class Experts:
    """`count` experts of one shape, each one contiguous block of weights."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, count: int) -> None:
        self.hidden, self.intermediate, self.count = hidden, intermediate, count
        self.gate_up_numel = 2 * intermediate * hidden
        self.blocks = torch.empty(count, 3 * intermediate * hidden, dtype=dtype)
        # Every page written (memory never written reads as the kernel's
        # shared zero page, from the cache); scaled so activations stay O(1).
        self.blocks[:, : self.gate_up_numel].uniform_(-(hidden**-0.5), hidden**-0.5)
        self.blocks[:, self.gate_up_numel :].uniform_(-(intermediate**-0.5), intermediate**-0.5)

    def weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`gate_up_proj` [2I, H] and `down_proj` [H, I], views of the block."""
        block = self.blocks[expert % self.count]
        gate_up = block[: self.gate_up_numel].view(2 * self.intermediate, self.hidden)
        down = block[self.gate_up_numel :].view(self.hidden, self.intermediate)
        return gate_up, down

    def raw(self, expert: int) -> torch.Tensor:
        """The block's bytes as float32, for the plain read."""
        return self.blocks[expert % self.count].view(torch.float32)


def expert_bytes(hidden: int, intermediate: int, dtype: torch.dtype) -> int:
    return 3 * hidden * intermediate * torch.finfo(dtype).bits // 8


def expert_ffn(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.mv(gate_up, x).chunk(2)
    return torch.mv(down, F.silu(gate) * up)


def _mv_float64(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Row blocks, so a Mixtral-8x7B projection is never held whole in float64.
    return torch.cat([rows.double() @ x for rows in weight.split(REFERENCE_ROWS)])


def reference_ffn(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = _mv_float64(gate_up, x.double()).chunk(2)
    return _mv_float64(down, F.silu(gate) * up)


def experts_to_cycle(expert_bytes: int, disabled: bool) -> int:
    if disabled:
        return 1
    working_set = max(MIN_WORKING_SET_BYTES, 8 * last_level_cache_bytes())
    return max(2, math.ceil(working_set / expert_bytes))


def _seconds(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_expert_against_a_plain_read(benchmark, shape, dtype_name):
    hidden, intermediate = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    size = expert_bytes(hidden, intermediate, dtype)
    experts = Experts(hidden, intermediate, dtype, experts_to_cycle(size, benchmark.disabled))
    x = torch.randn(hidden).to(dtype)

    gate_up, down = experts.weights(0)
    expected = reference_ffn(gate_up, down, x)
    error = (expert_ffn(gate_up, down, x).double() - expected).norm() / expected.norm()
    assert error <= TOLERANCE[dtype], f"{shape} {dtype_name}: relative error {error:.2e}"

    turn = {"expert": 0, "read": experts.count // 2}

    def one_expert() -> None:
        expert_ffn(*experts.weights(turn["expert"]), x)
        turn["expert"] += 1

    def plain_read() -> None:
        torch.sum(experts.raw(turn["read"]))
        turn["read"] += 1

    rounds = 1 if benchmark.disabled else INTERLEAVED_ROUNDS
    expert_s, read_s = [], []
    for _ in range(rounds):
        expert_s.append(_seconds(one_expert))
        read_s.append(_seconds(plain_read))
    expert_gbps = size / statistics.median(expert_s) / 1e9
    read_gbps = size / statistics.median(read_s) / 1e9
    benchmark.extra_info.update(
        shape=shape,
        hidden=hidden,
        intermediate=intermediate,
        dtype=dtype_name,
        threads=torch.get_num_threads(),
        call="torch.mv",
        expert_bytes=size,
        experts_cycled=experts.count,
        expert_gbps=expert_gbps,
        read_gbps=read_gbps,
        ratio=expert_gbps / read_gbps,
    )
    benchmark(one_expert)


TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_ROUNDS = 15


def expert_ffn_rows(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The expert as the live path runs it: rows of tokens through F.linear."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


@pytest.mark.parametrize("threads", ["one", "all"])
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_cpu_expert_by_tokens(benchmark, dtype_name, tokens, threads):
    hidden, intermediate = SHAPES["deepseek-v2-lite"]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    size = expert_bytes(hidden, intermediate, dtype)
    experts = Experts(hidden, intermediate, dtype, experts_to_cycle(size, benchmark.disabled))
    x = torch.randn(tokens, hidden).to(dtype)
    gate_up, down = experts.weights(0)
    expected = torch.stack([reference_ffn(gate_up, down, row) for row in x[:2]])
    error = (expert_ffn_rows(gate_up, down, x[:2]).double() - expected).norm() / expected.norm()
    assert error <= TOLERANCE[dtype], f"{dtype_name}: relative error {error:.2e}"

    turn = {"expert": 0}

    def one_expert() -> None:
        expert_ffn_rows(*experts.weights(turn["expert"]), x)
        turn["expert"] += 1

    every_thread = torch.get_num_threads()
    torch.set_num_threads(1 if threads == "one" else every_thread)
    try:
        rounds = 1 if benchmark.disabled else TOKEN_ROUNDS
        seconds = statistics.median(_seconds(one_expert) for _ in range(rounds))
        benchmark.extra_info.update(
            shape="deepseek-v2-lite",
            dtype=dtype_name,
            tokens=tokens,
            threads=torch.get_num_threads(),
            call="F.linear",
            expert_bytes=size,
            median_us=seconds * 1e6,
        )
        benchmark(one_expert)
    finally:
        torch.set_num_threads(every_thread)
