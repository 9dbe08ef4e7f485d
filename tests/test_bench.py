"""`moe-offload bench` in a tiny configuration: every system runs on the same
weights and replayed routing, produces the same tokens, and the report is
complete."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_offload
from moe_offload import MoeOffloadError, cli, preflight
from moe_offload.bench import e2e, report, shapes
from moe_offload.bench.quiet import third_party_output_held_back
from moe_offload.bench.router_replay import BatchRouterReplay, RouterReplay
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


def test_batch_router_replay_follows_each_request_through_packed_passes(tmp_path):
    config = shapes.config_for("mixtral-8x7b", layers=2, hidden=64)
    model = shapes.build(config, torch.float32)
    first, second = random_trace(tmp_path / "t.jsonl", requests=2, tokens=4)
    passes = [[("a", 3), ("b", 2)], [("b", 1), ("a", 1)], None]
    layout: list = []
    replay = BatchRouterReplay(model, [first, second], lambda: layout[0])
    seen: list[torch.Tensor] = []
    replay.blocks[1].module.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    with torch.no_grad():
        for packed in passes:
            layout[:] = [packed]
            model(torch.arange(1, 1 + (sum(n for _, n in packed) if packed else 3))[None])
    # Keys take trace requests in order of first appearance.
    assert seen[0].tolist() == np.concatenate([first[0:3, 1], second[0:2, 1]]).tolist()
    assert seen[1].tolist() == np.concatenate([second[2:3, 1], first[3:4, 1]]).tolist()
    assert replay.forced_passes == 2  # the third pass was not the batch's: the router routed it
    layout[:] = [[("a", 1)]]
    with pytest.raises(MoeOffloadError, match="'a' outgrew its replayed trace request of 4 tokens"):
        with torch.no_grad():
            model(torch.tensor([[1]]))
    layout[:] = [[("c", 2)]]
    with pytest.raises(MoeOffloadError, match="the batch layout gives 2 token rows; the pass has 3"):
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))


def test_the_serving_bench_replays_routing_through_the_server(tmp_path):
    """benches/serve.py end to end on a tiny shape with a trace: the server
    forced the routing of every pass, and each client got every token."""
    bench = Path(__file__).resolve().parent.parent / "benches" / "serve.py"
    random_trace(tmp_path / "t.jsonl", requests=3, tokens=12, layers=2, experts=8, top_k=2)
    command = [
        sys.executable,
        str(bench),
        "--layers",
        "2",
        "--hidden",
        "64",
        "--trace",
        str(tmp_path / "t.jsonl"),
    ]
    command += ["--clients", "1", "2", "--requests-per-client", "1", "--rounds", "1"]
    command += ["--prompt-tokens", "4", "--new-tokens", "6", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    # The start-up check's pass, then 1 request alone and 2 clients, twice (warm-up, measured):
    # 6 passes (1 prefill, 5 decode) a request, 2 clients' requests sharing passes when aligned.
    assert 1 + 4 * 6 <= report["replayed_passes"] <= 1 + 6 * 6
    assert report["routing"].startswith("replayed from t.jsonl")
    assert all(f["every_request_full_length"] for f in report["clients"].values())


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
        "activation-aware no slots, CPU auto",
        "accelerate",
    ]
    for name, figures in systems.items():
        assert FIGURES <= figures.keys(), name
        assert figures["same_tokens_as_resident"] is True, (
            f"{name} generated other tokens than the resident model"
        )
        # Two requests, five timed decode steps each, in two rounds (accelerate: one).
        assert len(figures["latencies_ms"]) == (1 if name == "accelerate" else 2) * 2 * 5
    # LRU at a quarter of the experts misses some and moves bytes; with every
    # expert cached nothing misses and nothing moves while measuring.
    assert 0 < systems["lru"]["hit_rate"] < 1 and systems["lru"]["bytes_per_token"] > 0
    assert systems["activation-aware 100%"]["hit_rate"] == 1.0
    assert systems["activation-aware 100%"]["bytes_per_token"] == 0
    assert systems["activation-aware 25%"]["budget_fraction"] == 0.25
    # On a CPU device the CPU runs every expert from the host tier: no copy.
    cpu = systems["activation-aware no slots, CPU auto"]
    assert (cpu["slots"], cpu["bytes_per_token"], cpu["cpu_experts"]) == (0, 0, "auto")
    assert cpu["cpu_experts_per_token"] > 0 and systems["lru"]["cpu_experts_per_token"] == 0
    assert report["machine"]["cpu"] and report["model"]["moe_layers"] == 2
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in systems)
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| activation-aware 25% |" in result.stdout
    # accelerate's own warning is held back while measuring, and counted.
    assert "Some parameters are on the meta device" not in result.stderr
    assert "from other libraries while measuring held back" in result.stderr


@pytest.mark.parametrize("script", ["e2e.py", "store.py", "serve.py"])
def test_the_benchmark_scripts_start(script):
    """The benchmark scripts run outside the default suite; this catches a
    broken import or argument parser in them before someone needs them."""
    bench = Path(__file__).resolve().parent.parent / "benches" / script
    command = [sys.executable, str(bench), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def _bench(argv):
    return e2e.main(cli._parser().parse_args(["bench", *argv]))


PREFLIGHT = {
    "no CUDA device": (["--device", "cuda"], "torch sees no CUDA device"),
    "accelerate missing": (
        [],
        'accelerate (one of the systems compared); install them with: pip install "moe-offload[bench]"',
    ),
    "matplotlib missing for --out": (["--skip-accelerate", "--out", "OUT"], "matplotlib (the latency plot"),
    "too little memory": (
        ["--skip-accelerate"],
        "memory; this machine has 1.00 MiB available: shrink it with --layers N, --hidden H or --experts E",
    ),
    "a trace of another shape": (["--skip-accelerate", "--trace", "TRACE"], "choose the matching --model"),
    "too little device memory": (
        ["--skip-accelerate", "--device", "cuda:0"],
        "free there: lower --sweep and --budget-fraction, or shrink it",
    ),
}


@pytest.mark.parametrize("argv, message", PREFLIGHT.values(), ids=PREFLIGHT.keys())
def test_the_bench_checks_what_it_needs_before_building_the_model(argv, message, monkeypatch, tmp_path):
    """A device that is not there, a missing optional package, a model too big
    for the machine, a trace of another shape: each is a clear error before
    the model is built (the probes are faked; nothing big is ever built)."""

    def build(*args, **kwargs):
        raise AssertionError("the model was built before the checks")

    monkeypatch.setattr(shapes, "build", build)
    if "device memory" in message or "free there" in message:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 << 20, 1 << 30))
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "accelerate" in message:
        monkeypatch.setitem(sys.modules, "accelerate", None)
    if "matplotlib" in message:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    if "memory; this machine has" in message:
        monkeypatch.setattr(preflight, "available_host_memory", lambda: 1 << 20)
    random_trace(tmp_path / "t.jsonl", layers=2, experts=8, top_k=2)
    argv = [{"OUT": str(tmp_path / "out"), "TRACE": str(tmp_path / "t.jsonl")}.get(a, a) for a in argv]
    with pytest.raises(MoeOffloadError) as raised:
        _bench(["--model", "deepseek-v2-lite", "--layers", "2", "--hidden", "64", *argv])
    assert message in str(raised.value)


def test_a_failed_plot_writes_no_part_of_the_report(monkeypatch, tmp_path):
    def plot(report, path):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "plot", plot)
    with pytest.raises(ImportError):
        report.write_report({"unused": True}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_other_libraries_warnings_are_held_back_and_ours_kept(caplog):
    ours = Path(moe_offload.__file__).parent / "offloader.py"
    with pytest.warns(UserWarning, match="our warning"):
        with third_party_output_held_back() as held:
            logging.getLogger("accelerate.big_modeling").warning("their log record")
            logging.getLogger("moe_offload.offloader").warning("our log record")
            warnings.warn("their warning", UserWarning, stacklevel=1)
            warnings.warn_explicit("our warning", UserWarning, str(ours), 1)
    assert held == ["accelerate.big_modeling: their log record", "UserWarning: their warning"]
    assert "our log record" in caplog.text and "their log record" not in caplog.text


def test_a_scaled_hidden_size_builds_a_model_that_runs():
    """Scaling the hidden size scales the attention heads: they must divide
    it (and leave an even head size where it is derived). Checked on the
    meta device: shapes only, nothing allocated."""
    for name in shapes.SHAPES:
        for hidden in (8, 24, 72, 200, 328, 440, 704, 1000):
            config = shapes.config_for(name, layers=1, hidden=hidden)
            config.vocab_size = 64
            with torch.device("meta"):
                model = shapes.tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                with torch.no_grad():
                    model(torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(MoeOffloadError, match="--hidden 12"):
            shapes.config_for(name, hidden=12)


def test_the_bench_runs_every_moe_offload_system_quantized_at_the_same_budget(tmp_path):
    random_trace(tmp_path / "t.jsonl")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "moe_offload.cli", "bench", "--model", "mixtral-8x7b",
        "--layers", "2", "--hidden", "64", "--trace", str(tmp_path / "t.jsonl"),
        "--requests", "2", "--warmup-requests", "1", "--prompt-tokens", "4", "--new-tokens", "6",
        "--sweep", "--cpu-experts", "--rounds", "2", "--quantize", "int4", "--group-size", "16",
        "--skip-accelerate", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    systems = json.loads((out / "results.json").read_text())["systems"]
    assert list(systems) == [
        "resident",
        "lru",
        "reference",
        "activation-aware 25%",
        "resident, int4 weights",
        "lru, int4",
        "reference, int4",
        "activation-aware 25%, int4",
    ]
    # Quantizing may change the tokens: the dequantized resident run is compared, not checked.
    dequantized = systems.pop("resident, int4 weights")
    assert dequantized["quantization"] == "int4" and "same_tokens_as_resident" in dequantized
    for name, figures in systems.items():
        if name.endswith(", int4"):
            assert figures["quantization"] == "int4"
            assert figures["same_tokens_as_dequantized_resident"] is True, name
            plain = systems[name.removesuffix(", int4")]
            # The same budget holds more than 3x the experts, each under 0.3x the bytes.
            assert figures["budget_bytes"] == plain["budget_bytes"]
            assert figures["slots"] >= 3 * plain["slots"]
            assert figures["expert_bytes"] <= 0.3 * plain["expert_bytes"]
            assert figures["bytes_per_token"] < plain["bytes_per_token"]
        else:
            # The unquantized weights are back after each quantized system (two rounds).
            assert figures["same_tokens_as_resident"] is True, name
            assert figures["quantization"] is None
    assert "| lru, int4 |" in (out / "results.md").read_text()


def test_a_quantized_runs_weights_are_put_back():
    from moe_offload.quantization import Quantization

    config = shapes.config_for("deepseek-v2-lite", layers=1, hidden=64, experts=8)
    model = shapes.build(config, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = e2e.ExpertSnapshot(model)
    e2e.dequantize_experts(model, Quantization(4, 16))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".experts." in n for n in changed), changed
    snapshot.restore(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(MoeOffloadError, match="--group-size 64 needs --quantize int8 or int4"):
        _bench(["--group-size", "64"])


def test_the_quantization_accuracy_benchmark_reports_every_figure(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benches" / "quantization.py"
    command = [sys.executable, str(script), "--families", "deepseek_v2", "--shapes"]
    command += ["--sequences", "2", "--tokens", "8", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["commit"] and report["machine"]["cores"] >= 1 and len(report["load_average"]["before"]) == 3
    assert "wikitext-2" in report["caveat"] and "--tokens 8" in report["command"]
    [(name, model)] = report["models"].items()
    assert name == "deepseek_v2" and model["positions"] == 16 and model["vocabulary"] == 96
    int8, int4 = model["schemes"]["int8"], model["schemes"]["int4"]
    for figures in (int8, int4):
        # The tiny DeepSeek-V2 has one dense layer, then two MoE layers.
        assert [x["layer"] for x in figures["weight_error"]["per_layer"]] == [
            "model.layers.1.mlp.experts",
            "model.layers.2.mlp.experts",
        ]
        assert 0 <= figures["top1_agreement"] <= 1 and 0 <= figures["mean_kl"] <= figures["max_kl"]
    # int4 has 16x coarser steps than int8: about 16x the error, in a smaller blob.
    assert 0 < 8 * int8["weight_error"]["mean"] < int4["weight_error"]["mean"] < 0.2
    assert int4["bytes_ratio"] < int8["bytes_ratio"] < 1
    assert int8["mean_kl"] <= int4["mean_kl"]
    assert "| deepseek_v2 | int4 |" in (tmp_path / "results.md").read_text()
