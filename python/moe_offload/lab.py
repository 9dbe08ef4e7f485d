"""The policy lab: replay routing traces through the real core (cache,
planner, EAMC, prefetch queue) on a simulated clock and compare policies.

A copy takes `expert_bytes / bandwidth`; each MoE layer computes for a fixed
time; a needed expert that has not arrived stalls the clock. Requests run one
after another; each finished request joins the EAMC, so later requests are
matched against earlier ones, never against themselves. `warmup` requests,
disjoint from the measured ones, fill the EAMC before the replay starts.

With `cpu_expert_us` the CPU is a second executor: the core places each
layer's misses as the live cache does (`cpu_experts`: "auto" where the layer
ends soonest, "always" on the CPU, "never" copied), a CPU-run expert takes
`cpu_expert_us` (its weights read from host memory for one token; the replay
steps one token at a time), one after another while the device path copies
and computes, and is copied to the device in the background when the policy
keeps it.

With `quantize` ("int8", "int4", "fp8") the experts are simulated in that
format: an expert's bytes are those of its quantized blob, computed from the
known model's matrices as `moe_offload.quantization` lays them out, while
the device budget stays `capacity` times the experts' bf16 bytes, so the
cache holds as many more experts as the format is smaller. A layer still
computes for `layer_compute_us` (dequantizing is not charged), and a CPU-run
expert takes `cpu_expert_us` scaled by its bytes (a CPU kernel reading the
quantized bytes as fast as bf16 ones).

With `copy_chunk_bytes` a copy moves in chunks of that many bytes, and an
on-demand copy queued meanwhile starts at the next chunk's boundary instead
of waiting for a whole prefetch copy (the live cache copies whole experts).

A trace holds routing, not hidden states, so the live router lookahead
(`patch(lookahead=D)`) cannot run here. With `lookahead` the replay
simulates one: at each layer the planner is told the token's routing at
the next `lookahead` layers, each id right with probability
`lookahead_accuracy` and otherwise an expert the token does not use there.
It shows what a lookahead of that accuracy would buy; the accuracy a real
model's routers reach is measured live (`stats()["lookahead"]`), not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from moe_offload._core import MoeOffloadError, replay
from moe_offload.quantization import Quantization
from moe_offload.traces import Request, Trace

POLICIES = ("lru", "lfu", "reference", "activation-aware", "oracle")
CPU_EXPERTS = ("auto", "always", "never")


BF16_BYTES = 2


@dataclass(frozen=True)
class ModelShape:
    """Defaults for a known model's traces, matched by routing shape."""

    name: str
    # One expert's weight matrices, [out, in] each, in bf16.
    matrices: tuple[tuple[int, int], ...]

    def expert_bytes(self, scheme: Quantization | None = None) -> int:
        """One expert's bytes: bf16, or its blob quantized with `scheme`."""
        return sum(matrix_bytes(rows, cols, scheme) for rows, cols in self.matrices)


def matrix_bytes(rows: int, cols: int, scheme: Quantization | None) -> int:
    """Bytes of a bf16 [rows, cols] matrix as an expert blob holds it: as it
    is, or quantized (`quantization.ExpertCodec.blob_tensors`: int8/int4
    values packed 32 / bits to an int32 and a bf16 scale per group of a
    row's columns; fp8 a byte a value and a float32 scale per block; the
    blob's 256-byte alignment left out, as for bf16)."""
    if scheme is None:
        return rows * cols * BF16_BYTES
    if scheme.kind == "fp8":
        assert scheme.block is not None
        blocks = math.ceil(rows / scheme.block[0]) * math.ceil(cols / scheme.block[1])
        return rows * cols + blocks * 4
    values = rows * math.ceil(cols * scheme.bits / 32) * 4
    return values + rows * math.ceil(cols / scheme.group_size) * BF16_BYTES


def _gated(hidden: int, intermediate: int) -> tuple[tuple[int, int], ...]:
    """A gated MLP expert's matrices: gate and up [intermediate, hidden], down [hidden, intermediate]."""
    return ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate))


KNOWN_MODELS = {
    (26, 64, 6): ModelShape("DeepSeek-V2-Lite", _gated(2048, 1408)),
    (32, 8, 2): ModelShape("Mixtral-8x7B", _gated(4096, 14336)),
    (48, 128, 8): ModelShape("Qwen3-30B-A3B", _gated(2048, 768)),
}


@dataclass(frozen=True)
class LabParams:
    capacity: float = 0.25
    bandwidth_gbps: float = 50.0
    layer_compute_us: float = 300.0
    expert_bytes: int | None = None
    warmup: int = 0
    # One expert's CPU time for one token; None: no CPU, every miss is copied.
    cpu_expert_us: float | None = None
    cpu_experts: str = "auto"
    # "int8", "int4" or "fp8": experts simulated quantized; None: bf16 (or `expert_bytes`).
    quantize: str | None = None
    group_size: int | None = None
    # Copies split into chunks of this many bytes, between which an on-demand
    # copy may start ahead of a prefetch; None: whole copies, as the live cache.
    copy_chunk_bytes: int | None = None
    # A simulated router lookahead: the next `lookahead` layers' routing of
    # each token told to the planner, each id right with `lookahead_accuracy`.
    lookahead: int | None = None
    lookahead_accuracy: float = 1.0


@dataclass(frozen=True)
class ExpertSize:
    """The size of one simulated expert and of one unit of `capacity`."""

    nbytes: int  # one expert as the replay copies it
    unquantized: int  # the same expert in bf16: `capacity` is a share of these bytes
    source: str


def expert_size(trace: Trace, params: LabParams) -> ExpertSize:
    """The expert size to simulate, and where it came from."""
    scheme = Quantization.parse(params.quantize, params.group_size)
    check_sizing(params.expert_bytes, params.quantize)
    if params.expert_bytes is not None:
        return ExpertSize(params.expert_bytes, params.expert_bytes, "given")
    known = KNOWN_MODELS.get((trace.num_layers, trace.num_experts, trace.top_k))
    if known is None:
        raise MoeOffloadError(
            f"no default expert size for a {trace.num_layers}-layer, {trace.num_experts}-expert, "
            f"top-{trace.top_k} trace; pass --expert-bytes"
            + (" (the quantized expert's bytes) and leave --quantize out" if scheme else "")
        )
    bf16 = known.expert_bytes()
    if scheme is None:
        return ExpertSize(bf16, bf16, f"{known.name} (bf16)")
    if scheme.kind == "fp8":
        assert scheme.block is not None
        source = f"{known.name} (fp8, blocks of {scheme.block[0]} x {scheme.block[1]})"
    else:
        source = f"{known.name} ({scheme.name}, group {scheme.group_size})"
    return ExpertSize(known.expert_bytes(scheme), bf16, source)


def check_sizing(expert_bytes: int | None, quantize: str | None) -> None:
    """A given expert size and a quantization do not go together: the
    quantized size is computed from a known model's matrices."""
    if expert_bytes is not None and quantize is not None:
        raise MoeOffloadError(
            f"--quantize {quantize} sizes a known model's experts from their matrices; with "
            "--expert-bytes give the quantized expert's bytes instead, and leave --quantize out"
        )


def slots_for(trace: Trace, capacity: float, size: ExpertSize) -> int:
    """Device slots at the budget of `capacity` of the experts' unquantized
    bytes (round(capacity x experts) unquantized experts): quantized experts
    fill it with as many more slots as they are smaller, up to every expert."""
    total = trace.num_layers * trace.num_experts
    budget = int(round(capacity * total)) * size.unquantized
    return max(min(budget // size.nbytes, total), trace.top_k)


def _raw(requests: list[Request]) -> list[tuple[int, int, int]]:
    """(tokens, address, length) of each request's routing for the core; the
    arrays stay alive in `requests` for the whole call."""
    for r in requests:
        r.routing = np.ascontiguousarray(r.routing, dtype=np.uint32)
    return [(r.tokens, r.routing.ctypes.data, r.routing.size) for r in requests]


def run(
    trace: Trace,
    policies: list[str],
    params: LabParams,
    measured: list[Request] | None = None,
    warmup: list[Request] | None = None,
    progress: Callable[[str, int], object] | None = None,
    **planner: Any,
) -> dict[str, Any]:
    """Replays `measured` (default: every request but the warm-up ones) under
    each policy; `warmup` requests (default: the last `params.warmup` of the
    trace) only fill the EAMC. `progress(policy, done)` is called after each
    measured request; an exception it raises stops the replay. Returns the
    report `moe-offload replay --json` prints."""
    for p in policies:
        if p not in POLICIES:
            raise MoeOffloadError(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    if warmup is None:
        cut = len(trace.requests) - params.warmup
        if params.warmup < 0 or cut < 1:
            raise MoeOffloadError(
                f"--warmup {params.warmup} leaves no request to measure in a trace of {len(trace.requests)}"
            )
        warmup = trace.requests[cut:]
        measured = trace.requests[:cut] if measured is None else measured
    measured = trace.requests if measured is None else measured
    size = expert_size(trace, params)
    nbytes = size.nbytes
    total_experts = trace.num_layers * trace.num_experts
    slots = slots_for(trace, params.capacity, size)
    # A CPU reads a smaller expert in proportionally less time.
    cpu_us = None if params.cpu_expert_us is None else params.cpu_expert_us * nbytes / size.unquantized
    common = dict(
        layers=trace.num_layers,
        experts=trace.num_experts,
        top_k=trace.top_k,
        slots=slots,
        expert_bytes=nbytes,
        bandwidth_bytes_per_s=params.bandwidth_gbps * 1e9,
        layer_compute_s=params.layer_compute_us * 1e-6,
        cpu_expert_s=None if cpu_us is None else cpu_us * 1e-6,
        cpu_experts=params.cpu_experts,
        copy_chunk_bytes=params.copy_chunk_bytes,
        lookahead=params.lookahead,
        lookahead_accuracy=params.lookahead_accuracy,
        **planner,
    )
    results = {}
    for p in policies:
        # A Python callback even without `progress`: running one lets Ctrl-C stop a long replay.
        on_request = partial(progress, p) if progress is not None else _no_progress
        figures = replay(p, _raw(measured), _raw(warmup), progress=on_request, **common)
        results[p] = summarize(figures, cpu=params.cpu_expert_us is not None)
        results[p].update(expert_bytes=nbytes, slots=slots, quantization=params.quantize)
    return {
        "policies": results,
        "trace": {
            "source": trace.source,
            "requests": len(measured),
            "tokens": sum(r.tokens for r in measured),
            "warmup_requests": len(warmup),
            "layers": trace.num_layers,
            "experts": trace.num_experts,
            "top_k": trace.top_k,
            "next_token_reuse": next_token_reuse(measured),
        },
        "params": dict(
            asdict(params),
            slots=slots,
            total_experts=total_experts,
            expert_bytes=nbytes,
            expert_bytes_from=size.source,
            unquantized_expert_bytes=size.unquantized,
            budget_bytes=int(round(params.capacity * total_experts)) * size.unquantized,
            cpu_expert_us_simulated=cpu_us,
            planner=planner,
        ),
    }


def _no_progress(done: int) -> None:
    """Nothing to report; the interpreter handles pending signals meanwhile."""


def next_token_reuse(requests: list[Request]) -> float:
    """Of each token's routings (after a request's first token), the share
    that go to an expert the previous token used at the same layer: how much
    a cache gains from keeping what the last token used."""
    reused = total = 0
    for r in requests:
        now, before = r.routing[1:, :, :, None], r.routing[:-1, :, None, :]
        reused += int((now == before).any(axis=-1).sum())
        total += now.shape[0] * now.shape[1] * now.shape[2]
    return reused / total if total else 0.0


def summarize(r: dict[str, Any], cpu: bool = False) -> dict[str, Any]:
    """The lab's figures from one replay's counters; None (JSON null, "–" in
    the table) where a figure does not apply.

    CPU experts per token: misses run on the CPU per token; None for a
    replay without the CPU (`cpu` false).

    Prefetch precision: prefetched experts that were used (in time or late)
    per prefetch copy. Prefetch recall: of the fetches that the cache did not
    serve by keeping an expert it already had (prefetch hits + misses), the
    share that a prefetch served in time. Both are None for a replay without
    prefetch copies (every policy but activation-aware).

    Per token, for a policy that prefetches: prefetch copies, and of the
    prefetched experts those needed after they arrived (in time), needed
    while still queued or in flight (late), and evicted unused (wasted).
    Predictor precision, per look-ahead distance d = 1, 2, ...: of the
    planner's top-k experts for layer l + d, planned at layer l, the share
    the token used there (None where the policy does not predict)."""
    prefetched = r["prefetch_copies"] > 0
    used = r["prefetch_hits"] + r["prefetch_late"]
    not_retained = r["prefetch_hits"] + r["misses"]
    tokens = r["tokens"]

    def per_token(count: int) -> float | None:
        return _ratio(count, tokens) if prefetched else None

    return {
        "hit_rate": _ratio(r["hits"], r["accesses"]),
        "prefetch_precision": _ratio(used, r["prefetch_copies"]) if prefetched else None,
        "prefetch_recall": _ratio(r["prefetch_hits"], not_retained) if prefetched else None,
        "stall_ms_per_token": _ratio(r["stall_s"] * 1e3, tokens),
        "bytes_per_token": _ratio(r["bytes_moved"], tokens),
        "ms_per_token": _ratio(r["total_s"] * 1e3, tokens),
        "slowdown_vs_resident": _ratio(r["total_s"], r["resident_s"]),
        "cpu_experts_per_token": _ratio(r["cpu_experts"], tokens) if cpu else None,
        "prefetch_copies_per_token": per_token(r["prefetch_copies"]),
        "prefetch_in_time_per_token": per_token(r["prefetch_hits"]),
        "prefetch_late_per_token": per_token(r["prefetch_late"]),
        "prefetch_wasted_per_token": per_token(r["prefetch_wasted"]),
        "predictor_precision": [
            _ratio(hit, made) for hit, made in zip(r["predicted_used"], r["predicted"], strict=True)
        ],
    }


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


COLUMNS = (
    ("hit_rate", "hit rate", "{:.3f}"),
    ("prefetch_precision", "prefetch precision", "{:.3f}"),
    ("prefetch_recall", "prefetch recall", "{:.3f}"),
    ("stall_ms_per_token", "stall ms/token", "{:.2f}"),
    ("bytes_per_token", "MB/token", "{:.1f}"),
    ("ms_per_token", "ms/token", "{:.2f}"),
    ("slowdown_vs_resident", "× resident", "{:.2f}"),
)
CPU_COLUMN = ("cpu_experts_per_token", "CPU experts/token", "{:.2f}")


PREFETCH_COLUMNS = (
    ("prefetch_copies_per_token", "prefetches/token", "{:.2f}"),
    ("prefetch_in_time_per_token", "in time", "{:.2f}"),
    ("prefetch_late_per_token", "late", "{:.2f}"),
    ("prefetch_wasted_per_token", "wasted", "{:.2f}"),
)


def table(report: dict[str, Any]) -> str:
    """The report as Markdown: a table with one row per policy (with a
    column of CPU experts per token when the replay had the CPU), then, when
    a policy prefetched or predicted, a second one with its prefetches per
    token and its predictor's precision per look-ahead distance."""
    policies = report["policies"]
    cpu = any(f["cpu_experts_per_token"] is not None for f in policies.values())
    columns = (*COLUMNS, CPU_COLUMN) if cpu else COLUMNS
    lines = _rows(policies, columns, lambda key, value: value / 1e6 if key == "bytes_per_token" else value)
    predicting = {
        name: f
        for name, f in policies.items()
        if f["prefetch_copies_per_token"] is not None or any(p is not None for p in f["predictor_precision"])
    }
    if not predicting:
        return "\n".join(lines)
    distances = max(len(f["predictor_precision"]) for f in predicting.values())
    precision = tuple((d, f"precision l+{d + 1}", "{:.3f}") for d in range(distances))
    second = _rows(predicting, (*PREFETCH_COLUMNS, *precision), lambda _, value: value)
    return "\n".join([*lines, "", *second])


def _rows(
    policies: dict[str, dict[str, Any]],
    columns: tuple[tuple[Any, str, str], ...],
    scale: Callable[[Any, float], float],
) -> list[str]:
    """A Markdown table of `columns` (key, title, format), one row per
    policy; an int key indexes the predictor's precision per distance."""
    lines = [
        "| policy | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, figures in policies.items():
        cells = []
        for key, _, fmt in columns:
            value = _cell(figures, key)
            cells.append("–" if value is None else fmt.format(scale(key, value)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _cell(figures: dict[str, Any], key: str | int) -> float | None:
    if isinstance(key, int):
        precision = figures["predictor_precision"]
        return precision[key] if key < len(precision) else None
    return figures[key]
