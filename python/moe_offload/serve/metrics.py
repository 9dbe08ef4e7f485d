"""Serving counters and latency histograms, written in Prometheus' text format."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from typing import Any

PREFIX = "moe_offload"
# Seconds; wide enough for a CPU-served 8x7B model and a tiny test model.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The offloader's counters exported, as (stats key, help).
OFFLOADER_COUNTERS = (
    ("hits", "expert fetches found on the device"),
    ("misses", "expert fetches not found on the device"),
    ("stall_seconds", "seconds the model waited for experts"),
    ("bytes_to_device", "expert bytes copied to the device"),
    ("cpu_experts", "misses computed on the CPU instead of copied"),
)


class Histogram:
    """A cumulative histogram over fixed buckets (not thread-safe: observed on
    the server's event loop only)."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.total}", f"{name}_count {running}"]
        return out


class Metrics:
    """What the server counts; `render` adds the live gauges and the offloader's stats."""

    def __init__(self) -> None:
        self.requests = 0  # admitted
        self.finished = 0
        self.cancelled = 0  # by the client leaving, a stop string, or shutdown
        self.failed = 0
        self.rejected_queue_full = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()

    def render(
        self,
        running: int,
        queued: int,
        offloader_stats: Callable[[], dict[str, Any]] | None,
        eamc_size: Callable[[], int] = lambda: 0,
    ) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            full = f"{PREFIX}_{name}"
            lines.extend([f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {value}"])

        metric("requests_running", "gauge", "requests in the running batch", running)
        metric("requests_queued", "gauge", "requests waiting for a place in the batch", queued)
        metric("requests_total", "counter", "requests admitted", self.requests)
        metric("requests_finished_total", "counter", "requests that ran to the end", self.finished)
        metric("requests_cancelled_total", "counter", "requests cancelled before their end", self.cancelled)
        metric("requests_failed_total", "counter", "requests that failed in the engine", self.failed)
        metric("requests_rejected_total", "counter", "requests refused with 429", self.rejected_queue_full)
        metric("prompt_tokens_total", "counter", "prompt tokens admitted", self.prompt_tokens)
        metric("generation_tokens_total", "counter", "tokens generated", self.generated_tokens)
        for name, histogram, help_text in (
            ("time_to_first_token_seconds", self.ttft, "seconds from admission to the first token"),
            ("inter_token_latency_seconds", self.itl, "seconds between a request's tokens"),
        ):
            full = f"{PREFIX}_{name}"
            lines.extend([f"# HELP {full} {help_text}", f"# TYPE {full} histogram", *histogram.lines(full)])
        if offloader_stats is not None:
            stats = offloader_stats()
            for key, help_text in OFFLOADER_COUNTERS:
                metric(f"offload_{key}_total", "counter", help_text, stats[key])
            metric("offload_hit_rate", "gauge", "hits / (hits + misses)", stats["hit_rate"])
            metric("eamc_requests", "gauge", "requests whose activation matrix the EAMC holds", eamc_size())
            if stats.get("lookahead") is not None:
                lines.extend(_lookahead_lines(stats["lookahead"]))
        return "\n".join(lines) + "\n"


def _lookahead_lines(lookahead: dict[str, Any]) -> list[str]:
    """The router lookahead's precision and recall, one gauge each per
    look-ahead distance (a distance nothing was scored at yet is left out)."""
    lines: list[str] = []
    for key, help_text in (
        ("precision", "share of the experts the router lookahead predicted that the layer used"),
        ("recall", "share of the experts a layer used that the router lookahead predicted"),
    ):
        full = f"{PREFIX}_lookahead_{key}"
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} gauge"]
        for distance, value in enumerate(lookahead[key], start=1):
            if value is not None:
                lines.append(f'{full}{{distance="{distance}"}} {value}')
    return lines
