"""`moe-offload bench` in a tiny configuration: every system runs on the same
weights and replayed routing, produces the same tokens, and the report is
complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_offload import MoeOffloadError
from moe_offload.bench import shapes
from moe_offload.bench.router_replay import RouterReplay
from moe_offload.traces import Request, Trace, write_trace

FIGURES = {"median_ms", "p90_ms", "p99_ms", "ttft_ms", "tokens_per_s", "bytes_per_token", "hit_rate"}


def random_trace(path, requests=3, tokens=12, layers=2, experts=8, top_k=2):
    rng = np.random.default_rng(0)
    routing = [
        np.stack([[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)])
        for _ in range(requests)
    ]
    write_trace(
        path, Trace(layers, experts, top_k, "test", [Request(f"r{i}", r) for i, r in enumerate(routing)])
    )
    return routing


def test_router_replay_forces_the_traced_experts(tmp_path):
    config = shapes.config_for("mixtral-8x7b", layers=2, hidden=64)
    model = shapes.build(config, torch.float32)
    [routing] = random_trace(tmp_path / "t.jsonl", requests=1, tokens=5)
    replay = RouterReplay(model)
    seen: list[torch.Tensor] = []
    replay.blocks[1].module.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    replay.start(routing)
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        cache_arg = "cache" if "cache" in out else "past_key_values"
        model(torch.tensor([[4]]), use_cache=True, **{cache_arg: cache})
    assert [s.tolist() for s in seen] == [routing[:3, 1].tolist(), routing[3:4, 1].tolist()]
    with pytest.raises(MoeOffloadError, match="tokens"):
        with torch.no_grad():
            model(torch.tensor([[5, 6]]), use_cache=True, **{cache_arg: cache})
    replay.remove()
    with pytest.raises(MoeOffloadError, match="MoE layers"):
        RouterReplay(model).check(layers=1, experts=8, top_k=2)


def test_the_bench_command_writes_a_complete_report(tmp_path):
    random_trace(tmp_path / "t.jsonl")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "moe_offload.cli", "bench", "--model", "mixtral-8x7b",
        "--layers", "2", "--hidden", "64", "--trace", str(tmp_path / "t.jsonl"),
        "--requests", "2", "--warmup-requests", "1", "--prompt-tokens", "4", "--new-tokens", "6",
        "--sweep", "0.5", "1.0", "--rounds", "2", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "results.json").read_text())
    systems = report["systems"]
    assert list(systems) == [
        "resident",
        "lru",
        "reference",
        "activation-aware 25%",
        "activation-aware 50%",
        "activation-aware 100%",
        "accelerate",
    ]
    for name, figures in systems.items():
        assert FIGURES <= figures.keys(), name
        assert figures["same_tokens_as_resident"] is True, (
            f"{name} generated other tokens than the resident model"
        )
        # Two requests, five timed decode steps each, in two rounds (accelerate: one).
        assert len(figures["latencies_ms"]) == (1 if name == "accelerate" else 2) * 2 * 5
    assert systems["lru"]["hit_rate"] is not None and systems["lru"]["bytes_per_token"] > 0
    assert systems["activation-aware 25%"]["budget_fraction"] == 0.25
    assert report["machine"]["cpu"] and report["model"]["moe_layers"] == 2
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in systems)
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| activation-aware 25% |" in result.stdout


@pytest.mark.parametrize("script", ["e2e.py", "store.py"])
def test_the_benchmark_scripts_start(script):
    """The benchmark scripts run outside the default suite; this catches a
    broken import or argument parser in them before someone needs them."""
    bench = Path(__file__).resolve().parent.parent / "benches" / script
    command = [sys.executable, str(bench), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
