"""The policy lab's building blocks through the bindings: the EAMC file,
cosine matching against a NumPy reference, and trace replay."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_offload import MoeOffloadError, _core, cli, lab
from moe_offload.quantization import ExpertCodec, Quantization
from moe_offload.traces import Request, Trace, read_trace, write_trace


def random_eam(rng, layers, experts, tokens, top_k):
    counts = np.zeros((layers, experts), dtype=np.uint32)
    for _ in range(tokens):
        for layer in range(layers):
            counts[layer, rng.choice(experts, top_k, replace=False)] += 1
    return counts


def test_eamc_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(0)
    eamc = _core.ActivationCollection(8, 3, 16, "least-matched")
    entries = [random_eam(rng, 3, 16, 5, 2) for _ in range(5)]
    for e in entries:
        eamc.insert(e.ravel().tolist())
    path = tmp_path / "warm.eamc"
    eamc.save(path)
    back = _core.ActivationCollection.load(path)
    assert len(back) == 5 and back.capacity == 8 and back.shape == (3, 16)
    for i, e in enumerate(entries):
        assert back.entry(i) == e.ravel().tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["warm.eamc"], "no temporary file is left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign", "empty"])
def test_a_damaged_eamc_file_is_a_clear_error(tmp_path, damage):
    eamc = _core.ActivationCollection(4, 2, 8)
    eamc.insert([1] * 16)
    path = tmp_path / "x.eamc"
    eamc.save(path)
    data = path.read_bytes()
    broken = {
        "truncate": data[: len(data) // 2],
        "flip": data[:40] + bytes([data[40] ^ 1]) + data[41:],
        "foreign": b"\x89PNG\r\n\x1a\n" + data[8:],
        "empty": b"",
    }[damage]
    path.write_bytes(broken)
    with pytest.raises(MoeOffloadError, match="x.eamc"):
        _core.ActivationCollection.load(path)
    with pytest.raises(MoeOffloadError, match="missing.eamc"):
        _core.ActivationCollection.load(tmp_path / "missing.eamc")


@pytest.mark.parametrize("seed", range(5))
def test_incremental_cosine_agrees_with_numpy(seed):
    rng = np.random.default_rng(seed)
    layers, experts, top_k = int(rng.integers(2, 8)), int(rng.integers(4, 40)), 2
    eamc = _core.ActivationCollection(32, layers, experts)
    entries = np.stack([random_eam(rng, layers, experts, int(rng.integers(1, 20)), top_k) for _ in range(32)])
    for e in entries:
        eamc.insert(e.ravel().tolist())
    matcher = eamc.matcher()
    own = np.zeros((layers, experts))
    for _token in range(3):
        for layer in range(layers):
            ids = rng.choice(experts, top_k, replace=False)
            matcher.observe(layer, ids.tolist())
            own[layer, ids] += 1
            seen = own.sum(axis=1) > 0
            a = own[seen].ravel()
            b = entries[:, seen, :].reshape(32, -1).astype(float)
            want = b @ a / (np.linalg.norm(a) * np.linalg.norm(b, axis=1))
            np.testing.assert_allclose(matcher.similarities(), want, rtol=1e-5, atol=1e-6)
    best = matcher.best(3)
    assert [i for i, _ in best] == list(np.argsort(-want, kind="stable")[:3])


def routing(rng, tokens, layers, experts, top_k):
    ids = np.stack(
        [np.stack([rng.choice(experts, top_k, replace=False) for _ in range(layers)]) for _ in range(tokens)]
    )
    return np.ascontiguousarray(ids, dtype=np.uint32)


def test_replay_compares_policies_on_one_trace():
    rng = np.random.default_rng(1)
    requests = [routing(rng, 40, 4, 8, 2) for _ in range(6)]
    raw = [(r.shape[0], r.ctypes.data, r.size) for r in requests]
    params = dict(
        layers=4,
        experts=8,
        top_k=2,
        slots=8,
        expert_bytes=1 << 20,
        bandwidth_bytes_per_s=1e10,
        layer_compute_s=1e-4,
    )
    results = {
        p: _core.replay(p, raw, [], **params)
        for p in ("lru", "lfu", "reference", "oracle", "activation-aware")
    }
    accesses = 6 * 40 * 4 * 2
    for name, r in results.items():
        assert r["accesses"] == accesses, name
        assert r["hits"] + r["misses"] == accesses
        assert r["total_s"] >= r["resident_s"] + r["stall_s"] - 1e-9
    assert results["oracle"]["hits"] >= max(r["hits"] for n, r in results.items() if n != "activation-aware")
    assert results["lru"]["prefetch_copies"] == 0
    with pytest.raises(MoeOffloadError, match="expert id 9 is not below 8"):
        bad = np.full((1, 4, 2), 9, dtype=np.uint32)
        _core.replay("lru", [(1, bad.ctypes.data, bad.size)], [], **params)


TRACES = os.environ.get("MOE_OFFLOAD_TRACES")
needs_traces = pytest.mark.skipif(
    not TRACES, reason="set MOE_OFFLOAD_TRACES to the directory holding the recorded routing traces"
)


def deepseek_trace(limit):
    return read_trace(Path(TRACES) / "deepseek-v2-lite" / "puffin_prompts_0001-1000", limit=limit)


@needs_traces
@pytest.mark.parametrize(
    "capacity, lru, belady", [(0.10, 0.261, 0.489), (0.25, 0.443, 0.711), (0.50, 0.698, 0.884)]
)
def test_the_replay_reproduces_the_published_demand_fetch_hit_rates(capacity, lru, belady):
    """The traces' README measured LRU and Belady hit rates on the first 150
    prompts; the replay through the core must agree within 0.01."""
    report = lab.run(deepseek_trace(150), ["lru", "oracle"], lab.LabParams(capacity=capacity))
    assert report["params"]["slots"] == round(capacity * 1664)
    assert report["policies"]["lru"]["hit_rate"] == pytest.approx(lru, abs=0.01)
    assert report["policies"]["oracle"]["hit_rate"] == pytest.approx(belady, abs=0.01)


@needs_traces
def test_activation_aware_beats_lru_and_the_reference_on_real_routing():
    report = lab.run(
        deepseek_trace(350),
        ["lru", "reference", "activation-aware"],
        lab.LabParams(capacity=0.25, warmup=200),
    )
    ours = report["policies"].pop("activation-aware")
    assert report["trace"]["warmup_requests"] == 200 and report["trace"]["requests"] == 150
    for name, other in report["policies"].items():
        assert ours["hit_rate"] > other["hit_rate"], name
        assert ours["stall_ms_per_token"] < other["stall_ms_per_token"], name


@needs_traces
def test_the_cpu_halves_activation_awares_time_on_real_routing():
    """The target for CPU-computed misses: at 25% cached, a CPU that runs an expert
    in 173 us (half a 346 us copy) at least halves activation-aware's time per token."""
    trace, params = deepseek_trace(350), lab.LabParams(capacity=0.25, warmup=200)
    copy = lab.run(trace, ["activation-aware"], params)["policies"]["activation-aware"]
    with_cpu = lab.LabParams(capacity=0.25, warmup=200, cpu_expert_us=173.0)
    cpu = lab.run(trace, ["activation-aware"], with_cpu)["policies"]["activation-aware"]
    assert cpu["cpu_experts_per_token"] > 0
    assert cpu["ms_per_token"] <= 0.5 * copy["ms_per_token"], (cpu, copy)


def test_the_replay_command_prints_the_report(tmp_path):
    rng = np.random.default_rng(5)
    requests = [Request(f"r{i}", routing(rng, 30, 4, 8, 2)) for i in range(5)]
    path = tmp_path / "t.jsonl"
    write_trace(path, Trace(4, 8, 2, "synthetic", requests))
    command = [sys.executable, "-m", "moe_offload.cli", "replay", str(path), "--expert-bytes", "1000000"]
    result = subprocess.run(
        [*command, "--json", "--warmup", "1", "--policy", "lru", "oracle", "activation-aware"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["policies"]) == ["lru", "oracle", "activation-aware"]
    for figures in report["policies"].values():
        assert set(figures) == {
            "hit_rate",
            "prefetch_precision",
            "prefetch_recall",
            "stall_ms_per_token",
            "bytes_per_token",
            "ms_per_token",
            "slowdown_vs_resident",
            "cpu_experts_per_token",
            "prefetch_copies_per_token",
            "prefetch_in_time_per_token",
            "prefetch_late_per_token",
            "prefetch_wasted_per_token",
            "predictor_precision",
            "expert_bytes",
            "slots",
            "quantization",
        }
        assert figures["slowdown_vs_resident"] >= 1.0
        assert figures["cpu_experts_per_token"] is None, "no CPU without --cpu-expert-us"
    assert report["trace"]["requests"] == 4 and report["trace"]["warmup_requests"] == 1
    assert report["params"]["slots"] == 8
    # Where the result came from: the command (trace paths outside the working
    # directory shortened), the commit, the machine.
    run = report["run"]
    assert run["command"].startswith("moe-offload replay .../") and "--json" in run["command"]
    assert str(tmp_path) not in run["command"]
    assert "commit" in run and run["machine"]["cpu"] and run["machine"]["cores"] >= 1

    # Prefetch figures do not apply to a policy that does not prefetch.
    assert report["policies"]["lru"]["prefetch_precision"] is None
    assert report["policies"]["lru"]["prefetch_recall"] is None

    table = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "| activation-aware |" in table.stdout and "| oracle |" in table.stdout
    lru = next(line for line in table.stdout.splitlines() if line.startswith("| lru |"))
    assert lru.split(" | ")[2:4] == ["–", "–"], lru
    assert f"next_token_reuse {lab.next_token_reuse(requests):.3f}" in table.stdout
    # Not a terminal: one plain progress line per policy.
    assert [line.split(" done")[0] for line in table.stderr.splitlines()] == [
        f"replay: {p}" for p in lab.POLICIES
    ]
    # An EAMC far beyond memory is refused before the core sizes it (it aborted the process).
    bad = subprocess.run(
        [*command, "--eamc-capacity", "10000000000"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.startswith("moe-offload: --eamc-capacity "), bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr


def test_next_token_reuse_counts_experts_the_previous_token_used():
    # Two tokens, one layer, top-2: token 1 reuses one of token 0's experts.
    r = Request("a", np.array([[[0, 1]], [[1, 2]]], dtype=np.uint32))
    assert lab.next_token_reuse([r]) == 0.5
    assert lab.next_token_reuse([Request("b", r.routing[:1])]) == 0.0


HEADER = {"format": "moe-offload-trace", "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 1}


def _native(path: Path, experts: str = "[[[1], [2]], [[3], [0]]]", **header: object) -> Path:
    fields = {k: v for k, v in (HEADER | header).items() if v is not None}
    path.write_text(json.dumps(fields) + "\n" + '{"request": "a", "experts": ' + experts + "}\n")
    return path


def _good(directory: Path) -> Path:
    return _native(directory / "t.jsonl")


def _binary(path: Path) -> Path:
    path.write_bytes(bytes(range(128, 256)) * 16)
    return path


def _not_gzip(path: Path) -> Path:
    path.write_bytes(b"plain text, not gzip\n")
    return path


def _directories(path: Path) -> Path:
    (path / "a").mkdir(parents=True)
    (path / "b").mkdir()
    return path


# (what to replay, extra arguments, what the one-line message says)
BAD_REPLAYS = {
    "endless line": (lambda d: Path("/dev/zero"), ["--format", "moe-beyond"], "/dev/zero:1: line longer"),
    "binary file": (lambda d: _binary(d / "t.jsonl"), [], "t.jsonl:1: not UTF-8 text"),
    "not gzip": (lambda d: _not_gzip(d / "t.jsonl.gz"), [], "t.jsonl.gz:1: cannot read it"),
    "id >= 2**63": (lambda d: _native(d / "t.jsonl", "[[[9223372036854775808]], [[0]]]"), [], "t.jsonl:2: "),
    "experts null": (lambda d: _native(d / "t.jsonl", "null"), [], "t.jsonl:2: 'experts' must be"),
    "no num_layers": (lambda d: _native(d / "t.jsonl", num_layers=None), [], "'num_layers' must be"),
    "num_experts 2**64": (lambda d: _native(d / "t.jsonl", num_experts=2**64), [], "'num_experts' must be"),
    "id 1.7": (lambda d: _native(d / "t.jsonl", "[[[1.7]], [[0]]]"), [], "expert id 1.7 is not an integer"),
    "directories": (lambda d: _directories(d / "dirs"), [], "no trace files found in "),
    "expert bytes -1": (_good, ["--expert-bytes", "-1"], "--expert-bytes -1 must"),
    "compute nan": (_good, ["--layer-compute-us", "nan"], "--layer-compute-us nan"),
    "compute inf": (_good, ["--layer-compute-us", "inf"], "--layer-compute-us inf"),
    "bandwidth 0": (_good, ["--bandwidth-gbps", "0"], "--bandwidth-gbps 0.0 must"),
    "capacity 2": (_good, ["--capacity", "2"], "--capacity 2.0 must be"),
    "limit 0": (_good, ["--limit", "0"], "--limit 0 must be"),
    "warmup -1": (_good, ["--warmup", "-1"], "--warmup -1 must be"),
    "cpu nan": (_good, ["--cpu-expert-us", "nan"], "--cpu-expert-us nan must be a number of microseconds"),
    "cpu inf": (_good, ["--cpu-expert-us", "inf"], "--cpu-expert-us inf must be"),
    "cpu 0": (_good, ["--cpu-expert-us", "0"], "--cpu-expert-us 0.0 must be"),
    "cpu -5": (_good, ["--cpu-expert-us", "-5"], "--cpu-expert-us -5.0 must be"),
    "cpu mode alone": (_good, ["--cpu-experts", "always"], "--cpu-experts always needs --cpu-expert-us"),
    "group size alone": (_good, ["--group-size", "64"], "--group-size 64 needs --quantize int8 or int4"),
    "group size fp8": (_good, ["--quantize", "fp8", "--group-size", "64"], "--group-size 64 needs"),
    "group size 0": (_good, ["--quantize", "int4", "--group-size", "0"], "--group-size 0 must be a number"),
    "quantize a given size": (_good, ["--quantize", "int4"], "--expert-bytes give the quantized"),
    "lookahead 0": (_good, ["--lookahead", "0"], "--lookahead 0 must be a number of layers"),
    "lookahead past the layers": (_good, ["--lookahead", "4000"], "a simulated lookahead of 4000 layers"),
    "accuracy 1.5": (_good, ["--lookahead", "1", "--lookahead-accuracy", "1.5"], "accuracy 1.5 must"),
    "accuracy nan": (_good, ["--lookahead", "1", "--lookahead-accuracy", "nan"], "accuracy nan must"),
    "accuracy alone": (_good, ["--lookahead-accuracy", "0.5"], "--lookahead-accuracy 0.5 needs --lookahead"),
}


@pytest.mark.parametrize("case", BAD_REPLAYS.values(), ids=BAD_REPLAYS.keys())
def test_bad_replay_input_is_a_one_line_message_and_status_2(tmp_path, capsys, case):
    target, extra, message = case
    path = target(tmp_path)
    if not path.exists():
        pytest.skip(f"needs {path}")
    code = cli.main(["replay", str(path), "--expert-bytes", "1000", *extra])
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), err
    assert err.startswith("moe-offload: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err and "PosixPath" not in err, err


def test_every_replay_option_says_what_it_does_and_its_default():
    commands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    replay = commands.choices["replay"]
    options = [a for a in replay._actions if a.option_strings and a.dest not in ("help", "verbose")]
    assert len(options) == 18
    for action in options:
        assert action.help and "(default: " in action.help, action.option_strings
    text = replay.format_help()
    assert "(default: 0.25)" in text and "(default: 1000)" in text and "(default: auto)" in text


def test_a_replay_reports_each_request_and_stops_when_the_callback_raises():
    rng = np.random.default_rng(3)
    trace = Trace(4, 8, 2, "synthetic", [Request(f"r{i}", routing(rng, 10, 4, 8, 2)) for i in range(4)])
    params = lab.LabParams(expert_bytes=1000)
    seen: list[tuple[str, int]] = []
    lab.run(trace, ["lru", "oracle"], params, progress=lambda policy, done: seen.append((policy, done)))
    assert seen == [(p, done) for p in ("lru", "oracle") for done in (1, 2, 3, 4)]

    def interrupt(policy: str, done: int) -> None:
        seen.append((policy, done))
        raise KeyboardInterrupt

    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        lab.run(trace, ["activation-aware", "lru"], params, progress=interrupt)
    assert seen == [("activation-aware", 1)], "Ctrl-C stops the replay at the next request"


def test_the_cpu_as_a_second_executor_cuts_the_stall(tmp_path):
    rng = np.random.default_rng(7)
    trace = Trace(4, 16, 2, "synthetic", [Request(f"r{i}", routing(rng, 40, 4, 16, 2)) for i in range(4)])
    # A copy takes 1 ms, a layer computes for 0.3 ms, the CPU runs an expert in 0.2 ms.
    base = dict(capacity=0.25, bandwidth_gbps=1.0, layer_compute_us=300.0, expert_bytes=10**6)
    copy = lab.run(trace, ["lru", "oracle"], lab.LabParams(**base))
    cpu = lab.run(trace, ["lru", "oracle"], lab.LabParams(**base, cpu_expert_us=200.0))
    assert cpu["params"]["cpu_expert_us"] == 200.0 and cpu["params"]["cpu_experts"] == "auto"
    for name, figures in cpu["policies"].items():
        assert figures["cpu_experts_per_token"] > 0, name
        assert figures["stall_ms_per_token"] < copy["policies"][name]["stall_ms_per_token"] / 2, name
        assert copy["policies"][name]["cpu_experts_per_token"] is None
    # A CPU at 0.9 ms: auto copies one of two misses (1.3 ms to copy and compute it, against
    # 1.8 ms for both on the CPU); always runs every miss there, so its only copies are the
    # background copies of CPU-run experts.
    slow = {mode: lab.LabParams(**base, cpu_expert_us=900.0, cpu_experts=mode) for mode in ("auto", "always")}
    auto, always = (lab.run(trace, ["lru"], slow[mode])["policies"]["lru"] for mode in ("auto", "always"))
    assert always["cpu_experts_per_token"] > auto["cpu_experts_per_token"] > 0
    assert 0 < always["bytes_per_token"] <= always["cpu_experts_per_token"] * 10**6
    with pytest.raises(MoeOffloadError, match='cpu_experts = "sometimes"'):
        lab.run(trace, ["lru"], lab.LabParams(**base, cpu_expert_us=200.0, cpu_experts="sometimes"))

    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    command = [sys.executable, "-m", "moe_offload.cli", "replay", str(path), "--expert-bytes", "1000000"]
    command += ["--bandwidth-gbps", "1", "--policy", "lru", "activation-aware", "--cpu-expert-us", "200"]
    result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "--cpu-expert-us 200" in report["run"]["command"]
    for figures in report["policies"].values():
        assert figures["cpu_experts_per_token"] > 0
    table = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "CPU 200 us per expert (auto)" in table.stdout and "| CPU experts/token |" in table.stdout


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("shape", lab.KNOWN_MODELS.values(), ids=lambda m: m.name)
def test_the_labs_quantized_expert_is_the_blob_the_codec_lays_out(shape, name):
    scheme = Quantization.parse(name, None if name == "fp8" else 64)
    tensors = [(f"w{i}", matrix, torch.bfloat16) for i, matrix in enumerate(shape.matrices)]
    codec = ExpertCodec(tensors, False, scheme)
    blob = sum(int(np.prod(s)) * dtype.itemsize for _, s, dtype in codec.blob_tensors())
    assert shape.expert_bytes(scheme) == blob
    assert shape.expert_bytes() == sum(int(np.prod(m)) * 2 for m in shape.matrices)
    assert blob <= (0.3 if name == "int4" else 0.55) * shape.expert_bytes()


def test_a_quantized_replay_fills_the_bf16_budget_with_more_experts(tmp_path):
    """DeepSeek-V2-Lite's routing shape, synthetic routing: at 10% of the bf16
    bytes int4 holds more than 3x the experts bf16 does, copies quantized
    experts, and misses less; the CPU's time per expert shrinks with its bytes."""
    rng = np.random.default_rng(11)
    trace = Trace(26, 64, 6, "synthetic", [Request(f"r{i}", routing(rng, 6, 26, 64, 6)) for i in range(3)])
    base = dict(capacity=0.1, cpu_expert_us=173.0)
    bf16 = lab.run(trace, ["lru"], lab.LabParams(**base))
    int4 = lab.run(trace, ["lru"], lab.LabParams(**base, quantize="int4"))
    b, q = bf16["policies"]["lru"], int4["policies"]["lru"]
    shape = lab.KNOWN_MODELS[(26, 64, 6)]
    assert (b["slots"], b["expert_bytes"], b["quantization"]) == (166, shape.expert_bytes(), None)
    assert q["expert_bytes"] == shape.expert_bytes(Quantization(4, 128)) and q["quantization"] == "int4"
    assert q["slots"] == 166 * shape.expert_bytes() // q["expert_bytes"] >= 3 * b["slots"]
    assert q["hit_rate"] > b["hit_rate"]
    assert int4["params"]["budget_bytes"] == bf16["params"]["budget_bytes"] == 166 * shape.expert_bytes()
    ratio = q["expert_bytes"] / b["expert_bytes"]
    assert int4["params"]["cpu_expert_us_simulated"] == pytest.approx(173.0 * ratio)
    assert bf16["params"]["cpu_expert_us_simulated"] == 173.0
    # A budget of more than every quantized expert holds them all: nothing misses after the first use.
    everything = lab.run(trace, ["lru"], lab.LabParams(capacity=0.5, quantize="int4"))
    assert everything["params"]["slots"] == 26 * 64
    with pytest.raises(MoeOffloadError, match="no default expert size .* leave --quantize out"):
        small = Trace(4, 8, 2, "synthetic", [Request("r", routing(rng, 3, 4, 8, 2))])
        lab.run(small, ["lru"], lab.LabParams(quantize="int8"))

    path = tmp_path / "t.jsonl"
    write_trace(path, trace)
    command = [sys.executable, "-m", "moe_offload.cli", "replay", str(path), "--policy", "lru"]
    command += ["--capacity", "0.1", "--quantize", "int8", "--group-size", "64", "--cpu-expert-us", "173"]
    table = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    int8 = shape.expert_bytes(Quantization(8, 64))
    slots = 166 * shape.expert_bytes() // int8
    assert f"cache: {slots} of 1664 experts (int8, in the budget of 10% of the bf16 experts)" in table.stdout
    assert f"expert {int8 / 1e6:.1f} MB (DeepSeek-V2-Lite (int8, group 64))" in table.stdout
    assert f"{173 * int8 / shape.expert_bytes():.0f} us per int8 one" in table.stdout


@needs_traces
def test_int4_holds_three_times_the_experts_and_cuts_the_time_on_real_routing():
    """The acceptance for quantized experts in the lab: at the same budget
    (25% of the bf16 experts), int4 holds at least 3x as many experts as
    bf16, hits more and takes less time per token."""
    trace = deepseek_trace(350)
    bf16, int4 = (
        lab.run(trace, ["activation-aware"], lab.LabParams(capacity=0.25, warmup=200, quantize=q))
        for q in (None, "int4")
    )
    b, q = bf16["policies"]["activation-aware"], int4["policies"]["activation-aware"]
    assert q["slots"] >= 3 * b["slots"] == 3 * 416
    assert q["hit_rate"] > b["hit_rate"] and q["ms_per_token"] < b["ms_per_token"]
    assert q["bytes_per_token"] < b["bytes_per_token"]


def routed_paths(rng, requests, tokens, layers=6, experts=16, top_k=2, paths=4):
    """Requests whose tokens each follow one of `paths` fixed routes through
    the layers: a token's experts at one layer give away those at every
    later layer, so a co-activation predictor can be exact."""
    out = []
    for i in range(requests):
        path = rng.integers(0, paths, size=tokens)
        ids = np.empty((tokens, layers, top_k), dtype=np.uint32)
        for layer in range(layers):
            for k in range(top_k):
                ids[:, layer, k] = (path * top_k + k + layer * 3) % experts
        out.append(Request(f"r{i}", ids))
    return out


# Copies (52 us) faster than a layer computes (30 us x 2): prefetches can land in time.
PATHS_PARAMS = dict(capacity=0.25, expert_bytes=1 << 20, bandwidth_gbps=20.0, layer_compute_us=30.0, warmup=3)


def test_the_lab_reports_prefetches_per_token_and_the_predictors_precision_per_distance():
    trace = Trace(6, 16, 2, "paths", routed_paths(np.random.default_rng(0), 8, 40))
    report = lab.run(trace, ["lru", "activation-aware"], lab.LabParams(**PATHS_PARAMS))
    lru, ours = report["policies"]["lru"], report["policies"]["activation-aware"]
    for key in ("copies", "in_time", "late", "wasted"):
        assert lru[f"prefetch_{key}_per_token"] is None, "LRU makes no prefetch"
    assert lru["predictor_precision"] == [None] * 4, "LRU predicts nothing"
    # Every route is learned from the warm-up: the tables name the right experts 1..4 layers ahead.
    assert ours["predictor_precision"] == [1.0] * 4
    copies = ours["prefetch_copies_per_token"]
    assert copies > 0 and ours["prefetch_in_time_per_token"] > 0
    used = ours["prefetch_in_time_per_token"] + ours["prefetch_late_per_token"]
    assert used + ours["prefetch_wasted_per_token"] <= copies + 1e-9
    assert used / copies == pytest.approx(ours["prefetch_precision"])

    # The same figures from the core's own counters.
    raw = _core.replay(
        "activation-aware",
        [(r.tokens, r.routing.ctypes.data, r.routing.size) for r in trace.requests[:-3]],
        [(r.tokens, r.routing.ctypes.data, r.routing.size) for r in trace.requests[-3:]],
        layers=6,
        experts=16,
        top_k=2,
        slots=report["params"]["slots"],
        expert_bytes=1 << 20,
        bandwidth_bytes_per_s=20e9,
        layer_compute_s=30e-6,
    )
    tokens = raw["tokens"]
    assert copies == pytest.approx(raw["prefetch_copies"] / tokens)
    assert ours["prefetch_late_per_token"] == pytest.approx(raw["prefetch_late"] / tokens)
    assert ours["prefetch_wasted_per_token"] == pytest.approx(raw["prefetch_wasted"] / tokens)
    assert len(raw["predicted"]) == len(raw["predicted_used"]) == 4

    # The table shows them in a second table, only for the policy that prefetched.
    text = lab.table(report)
    assert "| policy | prefetches/token | in time | late | wasted | precision l+1 |" in text
    assert text.count("| activation-aware |") == 2 and text.count("| lru |") == 1
    assert "| activation-aware | " + f"{copies:.2f} |" in text


def test_the_predictors_precision_falls_on_routing_it_cannot_learn():
    rng = np.random.default_rng(3)
    requests = [Request(f"r{i}", routing(rng, 40, 6, 16, 2)) for i in range(8)]
    report = lab.run(Trace(6, 16, 2, "random", requests), ["activation-aware"], lab.LabParams(**PATHS_PARAMS))
    precision = report["policies"]["activation-aware"]["predictor_precision"]
    # Independent uniform routing: about top_k / experts = 0.125 of any guess is right.
    assert all(p is not None and p < 0.3 for p in precision), precision


def test_chunked_copies_reach_the_core_and_a_whole_expert_chunk_changes_nothing():
    trace = Trace(6, 16, 2, "paths", routed_paths(np.random.default_rng(0), 8, 40))

    def aware(chunk):
        params = lab.LabParams(**PATHS_PARAMS, copy_chunk_bytes=chunk)
        report = lab.run(trace, ["activation-aware"], params)
        assert report["params"]["copy_chunk_bytes"] == chunk
        return report["policies"]["activation-aware"]

    whole = aware(None)
    assert aware(1 << 20) == whole, "one chunk per expert is a whole copy"
    assert aware(1 << 16) != whole, "on-demand copies get between 64 KiB chunks"


def test_replay_takes_copy_chunk_bytes_and_refuses_a_chunk_of_nothing(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    write_trace(path, Trace(6, 16, 2, "paths", routed_paths(np.random.default_rng(0), 8, 40)))
    base = ["replay", str(path), "--expert-bytes", str(1 << 20), "--bandwidth-gbps", "20"]
    base += ["--layer-compute-us", "30", "--warmup", "3", "--capacity", "0.25"]
    base += ["--policy", "activation-aware"]
    assert cli.main([*base, "--copy-chunk-bytes", "65536", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["copy_chunk_bytes"] == 65536
    params = lab.LabParams(**PATHS_PARAMS, copy_chunk_bytes=65536)
    direct = lab.run(read_trace(path), ["activation-aware"], params)["policies"]["activation-aware"]
    assert report["policies"]["activation-aware"] == direct
    assert cli.main([*base, "--copy-chunk-bytes", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("moe-offload: --copy-chunk-bytes 0 must be a byte count"), err
    assert err.count("\n") == 1, err


def test_a_simulated_lookahead_reaches_the_replay_and_is_repeatable(tmp_path, capsys):
    """On routing drawn at random, which history cannot predict, the
    planner's top-k one and two layers ahead are as right as the simulated
    lookahead, and hits follow."""
    rng = np.random.default_rng(3)
    path = tmp_path / "t.jsonl"
    requests = [Request(f"r{i}", routing(rng, 40, 6, 16, 2)) for i in range(8)]
    write_trace(path, Trace(6, 16, 2, "random", requests))
    base = ["replay", str(path), "--expert-bytes", str(1 << 20), "--bandwidth-gbps", "20"]
    base += ["--layer-compute-us", "30", "--warmup", "3", "--capacity", "0.25"]
    base += ["--policy", "activation-aware", "--json"]

    def aware(*options: str) -> tuple[dict, dict]:
        assert cli.main([*base, *options]) == 0
        report = json.loads(capsys.readouterr().out)
        return report["params"], report["policies"]["activation-aware"]

    params, exact = aware("--lookahead", "2")
    assert (params["lookahead"], params["lookahead_accuracy"]) == (2, 1.0)
    _, history = aware()
    _, noisy = aware("--lookahead", "2", "--lookahead-accuracy", "0.5")
    assert exact["predictor_precision"][:2] == [1.0, 1.0]
    assert all(0.35 < p < 0.65 for p in noisy["predictor_precision"][:2]), noisy["predictor_precision"]
    assert all(p < 0.3 for p in history["predictor_precision"]), history["predictor_precision"]
    assert exact["hit_rate"] > max(noisy["hit_rate"], history["hit_rate"]) + 0.02
    assert aware("--lookahead", "2", "--lookahead-accuracy", "0.5")[1] == noisy, "seeded"


V15 = Path(__file__).resolve().parents[1] / "benches" / "results" / "lab"


@needs_traces
def test_the_prefetch_figures_at_25_percent_match_the_published_run():
    """The committed 25% run (150 prompts measured, the other 849 as warm-up):
    the replay at this tree gives its activation-aware figures within 0.005."""
    published = json.loads((V15 / "deepseek-v2-lite-cap0.25-v15.json").read_text())
    report = lab.run(deepseek_trace(None), ["activation-aware"], lab.LabParams(capacity=0.25, warmup=849))
    ours, theirs = report["policies"]["activation-aware"], published["policies"]["activation-aware"]
    for key in ("hit_rate", "prefetch_precision", "prefetch_recall"):
        assert ours[key] == pytest.approx(theirs[key], abs=0.005), key


@needs_traces
def test_the_simulated_lookahead_figures_at_25_percent_match_the_published_run():
    """The committed run with a simulated lookahead (4 layers, 80% of the ids
    right): the replay at this tree gives its activation-aware figures."""
    published = json.loads((V15 / "deepseek-v2-lite-cap0.25-v15-lookahead4-acc0.8.json").read_text())
    params = lab.LabParams(capacity=0.25, warmup=849, lookahead=4, lookahead_accuracy=0.8)
    report = lab.run(deepseek_trace(None), ["activation-aware"], params)
    ours, theirs = report["policies"]["activation-aware"], published["policies"]["activation-aware"]
    for key in ("hit_rate", "prefetch_precision", "prefetch_recall", "stall_ms_per_token"):
        assert ours[key] == pytest.approx(theirs[key], rel=0.01), key
    assert ours["predictor_precision"] == pytest.approx([0.8] * 4, abs=0.01)
