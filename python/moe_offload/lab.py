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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np

from moe_offload._core import MoeOffloadError, replay
from moe_offload.traces import Request, Trace

POLICIES = ("lru", "lfu", "reference", "activation-aware", "oracle")
CPU_EXPERTS = ("auto", "always", "never")


@dataclass(frozen=True)
class ModelShape:
    """Defaults for a known model's traces, matched by routing shape."""

    name: str
    expert_bytes: int


# Expert bytes in bf16: three (hidden x moe_intermediate) matrices.
KNOWN_MODELS = {
    (26, 64, 6): ModelShape("DeepSeek-V2-Lite", 3 * 2048 * 1408 * 2),
    (32, 8, 2): ModelShape("Mixtral-8x7B", 3 * 4096 * 14336 * 2),
    (48, 128, 8): ModelShape("Qwen3-30B-A3B", 3 * 2048 * 768 * 2),
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


def expert_bytes_for(trace: Trace, given: int | None) -> tuple[int, str]:
    """The expert size to simulate, and where it came from."""
    if given is not None:
        return given, "given"
    known = KNOWN_MODELS.get((trace.num_layers, trace.num_experts, trace.top_k))
    if known is None:
        raise MoeOffloadError(
            f"no default expert size for a {trace.num_layers}-layer, {trace.num_experts}-expert, "
            f"top-{trace.top_k} trace; pass --expert-bytes"
        )
    return known.expert_bytes, f"{known.name} (bf16)"


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
    nbytes, nbytes_from = expert_bytes_for(trace, params.expert_bytes)
    total_experts = trace.num_layers * trace.num_experts
    slots = max(int(round(params.capacity * total_experts)), trace.top_k)
    common = dict(
        layers=trace.num_layers,
        experts=trace.num_experts,
        top_k=trace.top_k,
        slots=slots,
        expert_bytes=nbytes,
        bandwidth_bytes_per_s=params.bandwidth_gbps * 1e9,
        layer_compute_s=params.layer_compute_us * 1e-6,
        cpu_expert_s=None if params.cpu_expert_us is None else params.cpu_expert_us * 1e-6,
        cpu_experts=params.cpu_experts,
        **planner,
    )
    results = {}
    for p in policies:
        # A Python callback even without `progress`: running one lets Ctrl-C stop a long replay.
        on_request = partial(progress, p) if progress is not None else _no_progress
        figures = replay(p, _raw(measured), _raw(warmup), progress=on_request, **common)
        results[p] = summarize(figures, cpu=params.cpu_expert_us is not None)
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
            expert_bytes_from=nbytes_from,
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


def summarize(r: dict[str, Any], cpu: bool = False) -> dict[str, float | None]:
    """The lab's figures from one replay's counters; None (JSON null, "–" in
    the table) where a figure does not apply.

    CPU experts per token: misses run on the CPU per token; None for a
    replay without the CPU (`cpu` false).

    Prefetch precision: prefetched experts that were used (in time or late)
    per prefetch copy. Prefetch recall: of the fetches that the cache did not
    serve by keeping an expert it already had (prefetch hits + misses), the
    share that a prefetch served in time. Both are None for a replay without
    prefetch copies (every policy but activation-aware)."""
    prefetched = r["prefetch_copies"] > 0
    used = r["prefetch_hits"] + r["prefetch_late"]
    not_retained = r["prefetch_hits"] + r["misses"]
    tokens = r["tokens"]
    return {
        "hit_rate": _ratio(r["hits"], r["accesses"]),
        "prefetch_precision": _ratio(used, r["prefetch_copies"]) if prefetched else None,
        "prefetch_recall": _ratio(r["prefetch_hits"], not_retained) if prefetched else None,
        "stall_ms_per_token": _ratio(r["stall_s"] * 1e3, tokens),
        "bytes_per_token": _ratio(r["bytes_moved"], tokens),
        "ms_per_token": _ratio(r["total_s"] * 1e3, tokens),
        "slowdown_vs_resident": _ratio(r["total_s"], r["resident_s"]),
        "cpu_experts_per_token": _ratio(r["cpu_experts"], tokens) if cpu else None,
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


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table, one row per policy (with a column of
    CPU experts per token when the replay had the CPU)."""
    cpu = any(f["cpu_experts_per_token"] is not None for f in report["policies"].values())
    columns = (*COLUMNS, CPU_COLUMN) if cpu else COLUMNS
    lines = [
        "| policy | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, figures in report["policies"].items():
        cells = []
        for key, _, fmt in columns:
            value = figures[key]
            if value is None:
                cells.append("–")
                continue
            cells.append(fmt.format(value / 1e6 if key == "bytes_per_token" else value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
