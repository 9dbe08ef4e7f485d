"""`moe-offload bench`: per-token decode latency of one model shape under
every system, one after another in one process, on the same weights and the
same replayed routing:

1. every expert resident on the device (skipped, with a note, when the
   model does not fit),
2. moe-offload with policy `lru` and no prefetching,
3. moe-offload with policy `reference` (the published MoE-Infinity
   implementation's behaviour),
4. moe-offload `activation-aware` (the default), its EAMC warmed on
   requests disjoint from the measured ones, at several device budgets,
   every miss copied (`cpu_experts="never"`),
5. the same at the main budget with misses run on the CPU where the core
   decides (`cpu_experts="auto"`, and any other mode asked for); on a CPU
   device with no slots at all, every expert running from the host tier,
6. accelerate's offload (`device_map` with the experts on the CPU; on a CPU
   device, on disk) — last, since it leaves the model dispatched.

With `--quantize int8 int4` every moe-offload system (2 to 5) also runs with
its experts quantized to each scheme, at the same device budgets (shares of
the unquantized expert bytes, so the slots hold more quantized experts),
beside "resident, SCHEME weights": every expert resident, its weights the
quantized ones dequantized, which the quantized systems' tokens must equal.
The resident model and accelerate keep the unquantized weights.

Each system serves the same warm-up requests first, unmeasured, then the
measured ones: a prefill of the prompt (time to first token) and greedy
decode steps, each timed on its own.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import moe_offload
from moe_offload import provenance
from moe_offload._core import MoeOffloadError
from moe_offload.adapters import find_expert_blocks
from moe_offload.bench import shapes
from moe_offload.bench.quiet import third_party_output_held_back
from moe_offload.bench.router_replay import RouterReplay
from moe_offload.offloader import resolve_device
from moe_offload.preflight import (
    USABLE_SHARE,
    check_device_memory,
    check_host_memory,
    model_bytes,
    require,
)
from moe_offload.quantization import SCHEMES, Quantization
from moe_offload.sizes import format_size
from moe_offload.traces import FORMATS, Trace, read_trace

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# On a CPU device a real shape would take hours: unless told otherwise the
# benchmark scales it down (real expert count, top-k and routing) and runs
# float32, which CPUs compute fastest.
CPU_LAYERS, CPU_HIDDEN = 4, 512
# A CPU's speed drifts while a benchmark runs (other work, clocks): systems
# are measured in interleaved rounds there. On a GPU one round, since each
# round patches the model anew.
CPU_ROUNDS = 3

_log = logging.getLogger("moe_offload.bench")


@dataclass
class Settings:
    model: str = "deepseek-v2-lite"
    trace: list[Path] = field(default_factory=list)
    trace_format: str = "auto"
    device: str = "cpu"
    dtype: str | None = None
    layers: int | None = None
    hidden: int | None = None
    experts: int | None = None
    budget_fraction: float = 0.25
    sweep: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    cpu_experts: list[str] = field(default_factory=lambda: ["auto"])
    requests: int = 4
    warmup_requests: int = 4
    prompt_tokens: int = 16
    new_tokens: int = 32
    seed: int = 0
    rounds: int | None = None
    skip_accelerate: bool = False
    # Schemes ("int8", "int4") the moe-offload systems also run with.
    quantize: list[str] = field(default_factory=list)
    group_size: int | None = None


@dataclass
class Request:
    prompt: torch.Tensor
    routing: np.ndarray | None


@dataclass
class Run:
    """What one system did over the measured requests."""

    tokens: list[list[int]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    bytes_to_device: int = 0
    cpu_experts: int = 0

    def summary(self, resident_median: float | None) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        median = statistics.median(ordered)
        fetches = self.hits + self.misses
        return {
            "median_ms": median * 1e3,
            "p90_ms": _percentile(ordered, 0.90) * 1e3,
            "p99_ms": _percentile(ordered, 0.99) * 1e3,
            "ttft_ms": statistics.median(self.first_token) * 1e3,
            "tokens_per_s": len(ordered) / sum(ordered),
            "bytes_per_token": self.bytes_to_device / len(ordered),
            "hit_rate": self.hits / fetches if fetches else None,
            "cpu_experts_per_token": self.cpu_experts / len(ordered),
            "ratio_to_resident": median / resident_median if resident_median else None,
            "latencies_ms": [x * 1e3 for x in self.latencies],
        }


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Decoder:
    """Greedy decoding with one timed forward pass per token."""

    def __init__(self, model: nn.Module, device: torch.device, replay: RouterReplay | None) -> None:
        self.model = model
        self.device = device
        self.replay = replay
        # transformers renamed the key/value cache argument (and output).
        self.cache_kwarg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def step(self, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        kwargs = {self.cache_kwarg: cache} if cache is not None else {}
        out = self.model(input_ids=ids.to(self.device), use_cache=True, **kwargs)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits[:, -1:].argmax(-1), cache

    def serve(self, requests: list[Request], new_tokens: int, run: Run | None, stats: Any = None) -> None:
        """Serves `requests`; records into `run` when given. `stats` returns
        (hits, misses, bytes to device, experts run on the CPU) so decode
        steps can be told apart."""
        with torch.no_grad():
            for request in requests:
                if self.replay is not None and request.routing is not None:
                    self.replay.start(request.routing)
                _sync(self.device)
                started = time.perf_counter()
                token, cache = self.step(request.prompt, None)
                _sync(self.device)
                tokens = [int(token)]
                if run is not None:
                    run.first_token.append(time.perf_counter() - started)
                before = stats() if stats and run is not None else None
                for _ in range(new_tokens - 1):
                    _sync(self.device)
                    started = time.perf_counter()
                    token, cache = self.step(token, cache)
                    _sync(self.device)
                    if run is not None:
                        run.latencies.append(time.perf_counter() - started)
                    tokens.append(int(token))
                if run is None:
                    continue
                run.tokens.append(tokens)
                if before is not None:
                    after = stats()
                    run.hits += after[0] - before[0]
                    run.misses += after[1] - before[1]
                    run.bytes_to_device += after[2] - before[2]
                    run.cpu_experts += after[3] - before[3]


def _read_trace(settings: Settings, config: Any) -> Trace | None:
    """The routing trace, read and checked against the model shape before
    the model is built."""
    if not settings.trace:
        return None
    trace = read_trace(settings.trace, settings.trace_format)
    layers, experts, top_k = shapes.routing_shape(config, settings.model)
    if trace.num_layers < layers or trace.num_experts > experts or trace.top_k != top_k:
        raise MoeOffloadError(
            f"the trace routes {trace.num_layers} MoE layers over {trace.num_experts} experts, "
            f"top-{trace.top_k}; --model {settings.model} has {layers} MoE layers of {experts} experts, "
            f"top-{top_k}: choose the matching --model (and --layers at most {trace.num_layers})"
        )
    return trace


def _requests(settings: Settings, vocab: int, trace: Trace | None) -> tuple[list[Request], list[Request]]:
    """Warm-up and measured requests: prompts of random tokens and, with a
    trace, the routing of disjoint trace requests long enough to serve."""
    needed = settings.prompt_tokens + settings.new_tokens
    count = settings.warmup_requests + settings.requests
    routings: list[np.ndarray | None] = [None] * count
    if trace is not None:
        long_enough = [r.routing for r in trace.requests if r.tokens >= needed]
        if len(long_enough) < count:
            raise MoeOffloadError(
                f"the trace has {len(long_enough)} requests of at least {needed} tokens; {count} are needed "
                "(lower --requests, --warmup-requests, --prompt-tokens or --new-tokens)"
            )
        routings = list(long_enough[:count])
    generator = torch.Generator().manual_seed(settings.seed)
    made = [
        Request(torch.randint(0, vocab, (1, settings.prompt_tokens), generator=generator), routing)
        for routing in routings
    ]
    return made[: settings.warmup_requests], made[settings.warmup_requests :]


def _expert_bytes(model: nn.Module) -> int:
    return sum(b.num_experts * b.expert_bytes for b in find_expert_blocks(model))


def _fits(model: nn.Module, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.9 * free


def _resident(
    model: nn.Module, device: torch.device, settings: Settings, work: Any, run: Run, scheme: str | None
) -> None:
    """Every expert on the device; with `scheme`, its weights the quantized
    ones dequantized (the unquantized ones put back after)."""
    if scheme is not None:
        dequantize_experts(model, _scheme(settings, scheme))
    try:
        _serve_resident(model, device, settings, work, run)
    finally:
        if scheme is not None:
            work.restore(model)


def _serve_resident(model: nn.Module, device: torch.device, settings: Settings, work: Any, run: Run) -> None:
    model.to(device)
    decoder = Decoder(model, device, work.replay)
    decoder.serve(work.warmup[:1], settings.new_tokens, None)
    decoder.serve(work.measured, settings.new_tokens, run)
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _offloaded(
    model: nn.Module,
    device: torch.device,
    settings: Settings,
    work: Any,
    run: Run,
    policy: str,
    fraction: float,
    cpu_experts: str,
    scheme: str | None = None,
) -> dict[str, Any]:
    # On a CPU device the CPU runs experts from where they lie: no slots.
    no_slots = device.type == "cpu" and cpu_experts != "never"
    # A share of the unquantized expert bytes, whatever the scheme.
    budget = None if no_slots else max(1, int(fraction * work.expert_bytes))
    # The warm-up requests fill the EAMC (and the caches) before measuring.
    offloader = moe_offload.patch(
        model,
        device=device,
        device_budget=budget,
        policy=policy,
        cpu_experts=cpu_experts,
        quantize=scheme,
        group_size=settings.group_size if scheme in SCHEMES else None,
    )
    try:
        decoder = Decoder(model, device, work.replay)
        decoder.serve(work.warmup, settings.new_tokens, None)
        offloader.reset_stats()

        def counters() -> tuple[int, int, int, int]:
            s = offloader.stats()
            return s["hits"], s["misses"], s["bytes_to_device"], s["cpu_experts"]

        decoder.serve(work.measured, settings.new_tokens, run, counters)
        stats = offloader.stats()
    finally:
        moe_offload.unpatch(model)
        if scheme is not None:
            work.restore(model)  # unpatch gave back the dequantized weights
    return {
        "budget_bytes": stats["budget_bytes"],
        "slots": stats["slots"],
        "backend": stats["backend"],
        "cpu_experts": cpu_experts,
        "quantization": stats["quantization"],
        "expert_bytes": stats["expert_bytes"],
    }


def _scheme(settings: Settings, name: str) -> Quantization:
    scheme = Quantization.parse(name, settings.group_size if name in SCHEMES else None)
    assert scheme is not None
    return scheme


def dequantize_experts(model: nn.Module, scheme: Quantization) -> None:
    """Replaces every expert matrix of `model` by its values quantized with
    `scheme` and dequantized: the weights a quantized patch computes with."""
    with torch.no_grad():
        for block in find_expert_blocks(model):
            block.quantize(scheme)
            assert block.codec is not None
            for expert in range(block.num_experts):
                tensors = dict(block.expert_tensors(expert))
                decoded = block.codec.decode(block.codec.encode({s.name: t for s, t in tensors.items()}))
                for spec, tensor in tensors.items():
                    tensor.copy_(decoded[spec.name])


class ExpertSnapshot:
    """A copy of the model's expert parameters, to put back after a
    quantized run: unpatching a quantized patch leaves the dequantized
    values in the model."""

    def __init__(self, model: nn.Module) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        self.saved = {
            names[id(p)]: p.detach().to("cpu", copy=True)
            for block in find_expert_blocks(model)
            for p in block.parameters()
        }

    def restore(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, value in self.saved.items():
                model.get_parameter(name).copy_(value)


def _accelerate(model: nn.Module, device: torch.device, settings: Settings, work: Any) -> tuple[Run, str]:
    """accelerate's offload: experts on the CPU (on disk when the device is
    the CPU), moved to the device for each forward pass."""
    from accelerate import dispatch_model

    target = "cpu" if device.type == "cuda" else "disk"
    experts = {b.name for b in find_expert_blocks(model)}
    device_map: dict[str, str] = {}
    for name, module in model.named_modules():
        if name in experts:
            device_map[name] = target
        elif not any(name.startswith(e + ".") for e in experts) and (
            next(module.parameters(recurse=False), None) is not None
            or next(module.buffers(recurse=False), None) is not None
        ):
            device_map[name] = str(device)
    with tempfile.TemporaryDirectory() as tmp:
        dispatch_model(model, device_map=device_map, main_device=str(device), offload_dir=tmp)
        decoder = Decoder(model, device, work.replay)
        decoder.serve(work.warmup[:1], settings.new_tokens, None)
        run = Run()
        decoder.serve(work.measured, settings.new_tokens, run)
    return run, f"experts offloaded to {target}"


@dataclass
class Workload:
    replay: RouterReplay | None
    warmup: list[Request]
    measured: list[Request]
    expert_bytes: int  # every routed expert, unquantized
    snapshot: ExpertSnapshot | None = None  # with --quantize

    def restore(self, model: nn.Module) -> None:
        """The unquantized expert weights back in `model`."""
        assert self.snapshot is not None
        self.snapshot.restore(model)


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {**provenance.machine(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["pcie_generation"] = _pcie_generation(device)
    return info


def _pcie_generation(device: torch.device) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "pcie.link.gen.current,pcie.link.gen.max"
    index = device.index or 0
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", f"--id={index}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or None


def _command(settings: Settings) -> str:
    return provenance.command(Path(sys.argv[0]).name, {str(p) for p in settings.trace})


def run(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Measures every system; returns the results report."""
    device = torch.device(settings.device)
    config = shapes.config_for(settings.model, settings.layers, settings.hidden, settings.experts)
    trace = _read_trace(settings, config)
    model = shapes.build(config, DTYPES[settings.dtype or "float32"], settings.seed)
    replay = None
    if trace is not None:
        replay = RouterReplay(model)
        replay.check(trace.num_layers, trace.num_experts, trace.top_k)
    warmup, measured = _requests(settings, config.vocab_size, trace)
    work = Workload(replay, warmup, measured, _expert_bytes(model))
    if settings.quantize:
        work.snapshot = ExpertSnapshot(model)
    params = sum(p.numel() for p in model.parameters())
    log(
        f"{settings.model}: {shapes.moe_layers(config, settings.model)} MoE layers, "
        f"{params / 1e9:.2f} B parameters, {format_size(work.expert_bytes)} of experts, {settings.dtype}, "
        f"on {device}; routing {'replayed from the trace' if replay else 'by the random router'}"
    )
    systems: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    started = time.perf_counter()

    # Every system in every round, so that a machine whose speed drifts
    # affects them alike (every other round in reverse order, so a steady
    # drift evens out); each system's latencies are pooled over rounds.
    plan = _plan(settings, device)
    if not _fits(model, device):
        plan = [system for system in plan if system.policy is not None]
        notes.append("resident: skipped, the model does not fit on the device")
    if settings.quantize:
        notes.append(
            f"quantized systems ({', '.join(settings.quantize)}; int8/int4 group size "
            f"{settings.group_size or Quantization(8).group_size}): device budgets are shares of the "
            "unquantized expert bytes; their tokens are compared with the resident model holding the "
            "dequantized weights (resident, SCHEME weights), and that one's with the resident model"
        )
    runs = {system.name: Run() for system in plan}
    details: dict[str, dict[str, Any]] = {}
    with third_party_output_held_back() as held:
        for round_ in range(settings.rounds):
            for system in plan if round_ % 2 == 0 else reversed(plan):
                name, policy, fraction, mode, scheme = (
                    system.name, system.policy, system.fraction, system.cpu_experts, system.scheme
                )  # fmt: skip
                log(f"round {round_ + 1}/{settings.rounds}: {name} ...")
                if policy is None:
                    _resident(model, device, settings, work, runs[name], scheme)
                    details[name] = {"quantization": scheme}
                else:
                    extra = _offloaded(
                        model, device, settings, work, runs[name], policy, fraction, mode, scheme
                    )
                    details[name] = dict(extra, policy=policy, budget_fraction=fraction)
        if not settings.skip_accelerate:
            # Last, and in one round: it leaves the model dispatched, and it is
            # many times slower than the others, far beyond any drift.
            log("accelerate ...")
            runs["accelerate"], note = _accelerate(model, device, settings, work)
            details["accelerate"] = {"note": note}
        else:
            notes.append("accelerate: skipped on request")
    _report_held_back(held, log)
    resident = runs.get("resident")
    base = statistics.median(resident.latencies) if resident else None
    for name, result in runs.items():
        systems[name] = dict(result.summary(base), **details.get(name, {}))

    _check_tokens(systems, runs, {s.name: s for s in plan})
    return {
        "command": _command(settings),
        "commit": provenance.commit(),
        "version": moe_offload.__version__,
        "machine": machine(device),
        "settings": dict(asdict(settings), trace=[provenance.shown_path(p) for p in settings.trace]),
        "model": {
            "shape": settings.model,
            "moe_layers": shapes.moe_layers(config, settings.model),
            "parameters": params,
            "expert_bytes": work.expert_bytes,
            "hidden": config.hidden_size,
        },
        "systems": systems,
        "default_system": f"activation-aware {settings.budget_fraction:.0%}",
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }


@dataclass(frozen=True)
class System:
    """One system of the plan: `policy` None is the resident model."""

    name: str
    policy: str | None
    fraction: float
    cpu_experts: str
    scheme: str | None = None


def _plan(settings: Settings, device: torch.device) -> list[System]:
    """Every system measured in each round: the resident model, the
    moe-offload systems, and those again with each --quantize scheme."""
    fractions = sorted({*settings.sweep, settings.budget_fraction})
    main = settings.budget_fraction
    offloaded = [System("lru", "lru", main, "never"), System("reference", "reference", main, "never")]
    offloaded += [System(f"activation-aware {f:.0%}", "activation-aware", f, "never") for f in fractions]
    for mode in settings.cpu_experts:
        where = "no slots" if device.type == "cpu" else f"{main:.0%}"
        offloaded.append(System(f"activation-aware {where}, CPU {mode}", "activation-aware", main, mode))
    plan = [System("resident", None, 1.0, "never"), *offloaded]
    for scheme in settings.quantize:
        plan.append(System(f"resident, {scheme} weights", None, 1.0, "never", scheme))
        plan += [
            System(f"{s.name}, {scheme}", s.policy, s.fraction, s.cpu_experts, scheme) for s in offloaded
        ]
    return plan


def _check_tokens(systems: dict[str, dict[str, Any]], runs: dict[str, Run], plan: dict[str, System]) -> None:
    """Whether each system generated its reference's tokens: the resident
    model's (else lru's, when it did not fit); for a quantized system, the
    resident model's with the same dequantized weights (else its scheme's
    lru). Every round of a system serves the same requests: its tokens repeat."""
    for name, result in runs.items():
        system = plan.get(name)
        if system is None or system.scheme is None or system.policy is None:
            candidates = [("resident", "resident"), ("lru", "lru")]
        else:
            candidates = [
                (f"resident, {system.scheme} weights", "dequantized_resident"),
                (f"lru, {system.scheme}", "quantized_lru"),
            ]
        reference, key = next((c for c in candidates if c[0] in runs), candidates[-1])
        systems[name][f"same_tokens_as_{key}"] = result.tokens == runs[reference].tokens[: len(result.tokens)]


def _report_held_back(held: list[str], log: Any) -> None:
    """Other libraries' warnings while measuring: each at INFO on the
    `moe_offload` logger (shown with --verbose), and a count in the output."""
    for message in held:
        _log.info("held back while measuring: %s", message)
    if held and not _log.isEnabledFor(logging.INFO):
        log(f"({len(held)} warning(s) from other libraries while measuring held back; --verbose shows them)")


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """--trace and --format: the recorded routing a benchmark replays."""
    parser.add_argument(
        "--trace",
        nargs="+",
        type=Path,
        default=[],
        metavar="TRACE",
        help="routing trace files or directories to replay (default: none, the random router routes)",
    )
    parser.add_argument(
        "--format",
        dest="trace_format",
        choices=FORMATS,
        default="auto",
        help="trace format (default: auto, told from the files)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument(
        "--model", choices=list(shapes.SHAPES), default=d.model, help=f"model shape (default: {d.model})"
    )
    add_trace_arguments(parser)
    parser.add_argument(
        "--device", default=d.device, help=f"where the model runs: cpu, cuda or cuda:N (default: {d.device})"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=d.dtype,
        help="weights' dtype (default: float32 on a CPU, else bfloat16)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        metavar="N",
        help=f"MoE layers, to scale the model down (default: {CPU_LAYERS} on a CPU, else the model's)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        metavar="H",
        help=f"hidden size, a multiple of 8; widths scale along "
        f"(default: {CPU_HIDDEN} on a CPU, else the model's)",
    )
    parser.add_argument(
        "--experts", type=int, metavar="E", help="routed experts per layer (default: the model's)"
    )
    parser.add_argument(
        "--budget-fraction",
        type=float,
        default=d.budget_fraction,
        metavar="F",
        help=f"device budget of lru and reference, a share of the expert bytes "
        f"(default: {d.budget_fraction})",
    )
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=d.sweep,
        metavar="F",
        help=f"device budgets of activation-aware, shares of the expert bytes "
        f"(default: {' '.join(map(str, d.sweep))}, and --budget-fraction)",
    )
    parser.add_argument(
        "--cpu-experts",
        nargs="*",
        choices=["auto", "always"],
        default=d.cpu_experts,
        metavar="MODE",
        help="modes beside copying every miss (never) measured with activation-aware at --budget-fraction: "
        "auto, always; on a CPU device with no slots at all "
        f"(default: {' '.join(d.cpu_experts)}; none: copying only)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=d.requests,
        metavar="N",
        help=f"measured requests (default: {d.requests})",
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=d.warmup_requests,
        metavar="N",
        help=f"requests each system serves first, unmeasured (default: {d.warmup_requests})",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=d.prompt_tokens,
        metavar="N",
        help=f"prompt length of every request (default: {d.prompt_tokens})",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=d.new_tokens,
        metavar="N",
        help=f"tokens generated per request, at least 2 (default: {d.new_tokens})",
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of the weights and prompts (default: {d.seed})"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help=f"measure every system this many times, interleaved (default: {CPU_ROUNDS} on a CPU, else 1)",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=[*SCHEMES, "fp8"],
        default=d.quantize,
        metavar="SCHEME",
        help="also run every moe-offload system with its experts quantized (int8, int4, fp8; as "
        "`convert --quantize`) at the same device budgets, beside the resident model holding the "
        "dequantized weights (default: none)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        metavar="N",
        help="input features per int8/int4 quantization scale (default: 128; needs --quantize)",
    )
    parser.add_argument(
        "--skip-accelerate",
        action="store_true",
        help="leave accelerate's offload out (default: measure it; needs the bench extra)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write results.json, results.md and latency.png here (default: print the table only)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings of the command line, defaults filled in for the device,
    every number checked."""
    settings = Settings(**{k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__})
    on_cpu = settings.device.partition(":")[0] == "cpu"
    if on_cpu and settings.layers is None and settings.hidden is None:
        settings.layers, settings.hidden = CPU_LAYERS, CPU_HIDDEN
    if settings.dtype is None:
        settings.dtype = "float32" if on_cpu else "bfloat16"
    if settings.rounds is None:
        settings.rounds = CPU_ROUNDS if on_cpu else 1
    if min(settings.requests, settings.prompt_tokens, settings.rounds) < 1 or settings.new_tokens < 2:
        raise MoeOffloadError(
            "--requests, --prompt-tokens and --rounds must be at least 1, --new-tokens at least 2"
        )
    if settings.group_size is not None and not set(settings.quantize) & set(SCHEMES):
        raise MoeOffloadError(f"--group-size {settings.group_size} needs --quantize int8 or int4")
    if settings.group_size is not None and not 1 <= settings.group_size <= 1 << 20:
        raise MoeOffloadError(f"--group-size {settings.group_size} must be in 1..{1 << 20}, e.g. 128")
    if settings.warmup_requests < 0:
        raise MoeOffloadError(f"--warmup-requests {settings.warmup_requests} must not be negative")
    for fraction in [settings.budget_fraction, *settings.sweep]:
        if not 0 < fraction <= 1:
            raise MoeOffloadError(
                f"device budget {fraction} (--budget-fraction, --sweep) must be a share of the experts "
                "in (0, 1]"
            )
    return settings


def preflight(settings: Settings, out: Path | None) -> None:
    """Everything that can be known before the model is built: the device,
    the optional packages, where the report goes, and whether the model at
    this shape fits the machine."""
    device = resolve_device(settings.device, option="--device")
    packages = {} if settings.skip_accelerate else {"accelerate": "one of the systems compared"}
    if out is not None:
        packages["matplotlib"] = "the latency plot of --out"
    require(packages, "bench")
    if out is not None:
        _check_writable(out)
    _check_fits(settings, device)


def _check_fits(settings: Settings, device: torch.device) -> None:
    """The model at this shape fits the host memory, the device memory and,
    for accelerate's disk offload, the temporary directory."""
    config = shapes.config_for(settings.model, settings.layers, settings.hidden, settings.experts)
    total, experts = model_bytes(config, DTYPES[settings.dtype or "float32"])
    largest = max([settings.budget_fraction, *settings.sweep])
    shape = (
        f"{settings.model} at {shapes.moe_layers(config, settings.model)} MoE layers, "
        f"hidden {config.hidden_size}, {settings.dtype}"
    )
    shrink = "shrink it with --layers N, --hidden H or --experts E"
    # The model is built in host memory; on a CPU the device slots are host
    # memory too; on CUDA the pinned host tier is allocated whole while the
    # model still holds its experts. --quantize keeps a copy of the experts.
    host = total + int(experts * (1.0 if device.type == "cuda" else largest))
    host += experts if settings.quantize else 0
    check_host_memory(host, shape, shrink)
    device_need = total - experts + int(experts * largest)
    check_device_memory(
        device,
        device_need,
        f"{shape} with {largest:.0%} of its experts in slots",
        f"lower --sweep and --budget-fraction, or {shrink}",
    )
    if device.type == "cpu" and not settings.skip_accelerate:
        free = shutil.disk_usage(tempfile.gettempdir()).free
        if experts > USABLE_SHARE * free:
            raise MoeOffloadError(
                f"accelerate offloads the experts of {shape} to disk: {format_size(experts)}, but "
                f"{tempfile.gettempdir()} has {format_size(free)} free: set TMPDIR to a larger disk, "
                f"pass --skip-accelerate, or {shrink}"
            )


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeOffloadError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise MoeOffloadError(f"--out {out}: the directory is not writable")


def main(args: argparse.Namespace) -> int:
    from moe_offload.bench.report import markdown, write_report

    settings = settings_from(args)
    preflight(settings, args.out)
    report = run(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(markdown(report))
    if args.out is not None:
        write_report(report, args.out)
        print(f"\nwrote {args.out}/results.json, results.md, latency.png", file=sys.stderr)
    return 0
