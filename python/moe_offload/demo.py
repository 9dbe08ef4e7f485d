"""The demo: a small Mixtral-style model with random weights, generated with
and without offloading, same tokens, their speed, and what the cache did."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_offload._core import MoeOffloadError
from moe_offload.offloader import patch, unpatch
from moe_offload.preflight import check_host_memory, model_bytes
from moe_offload.sizes import format_size

PROMPT_TOKENS = 16
ATTENTION_HEADS = 8


def check_arguments(
    layers: int, experts: int, hidden: int, tokens: int, budget_fraction: float, runs: int
) -> None:
    """Refuses sizes the model cannot have, before anything is built."""
    if layers < 1:
        raise MoeOffloadError(f"--layers {layers}: the model needs at least 1 layer")
    if experts < 2:
        raise MoeOffloadError(f"--experts {experts}: each token is routed to 2 experts; use at least 2")
    # Every head's size (hidden / heads) must be whole and even (rotary embedding).
    if hidden < 2 * ATTENTION_HEADS or hidden % (2 * ATTENTION_HEADS):
        raise MoeOffloadError(
            f"--hidden {hidden}: use a positive multiple of {2 * ATTENTION_HEADS}, e.g. 256"
        )
    if tokens < 1:
        raise MoeOffloadError(f"--tokens {tokens}: generate at least 1 token")
    if runs < 1:
        raise MoeOffloadError(f"--runs {runs}: time at least 1 run")
    if not 0 < budget_fraction <= 1:
        raise MoeOffloadError(f"--budget-fraction {budget_fraction}: use a share of the experts in (0, 1]")


def demo_config(layers: int, experts: int, hidden: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=ATTENTION_HEADS,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )


def build_model(layers: int, experts: int, hidden: int, seed: int) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(demo_config(layers, experts, hidden)).eval()


def _generate(model: MixtralForCausalLM, prompt: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out, time.perf_counter() - started


def timed_generations(
    models: dict[str, MixtralForCausalLM],
    prompt: torch.Tensor,
    tokens: int,
    runs: int,
    after_warmup: Callable[[], None] = lambda: None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Each model's output and the seconds of its `runs` timed generations.
    A first, untimed generation warms each model up (a cold run pays for
    first-touch allocations and, offloaded, an empty cache); the timed runs
    alternate between the models, in turn first, so that a machine whose
    speed drifts affects both alike."""
    outputs = {name: _generate(model, prompt, tokens)[0] for name, model in models.items()}
    after_warmup()
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for run in range(runs):
        order = list(models) if run % 2 == 0 else list(reversed(models))
        for name in order:
            seconds[name].append(_generate(models[name], prompt, tokens)[1])
    return outputs, seconds


def _speed(tokens: int, seconds: list[float]) -> tuple[float, float, float]:
    """Median, slowest and fastest tokens/s."""
    rates = [tokens / s for s in seconds]
    return statistics.median(rates), min(rates), max(rates)


def run(
    layers: int,
    experts: int,
    hidden: int,
    tokens: int,
    budget_fraction: float,
    seed: int,
    runs: int = 5,
) -> int:
    check_arguments(layers, experts, hidden, tokens, budget_fraction, runs)
    total, expert_bytes = model_bytes(demo_config(layers, experts, hidden), torch.float32)
    budget = int(expert_bytes * budget_fraction)
    check_host_memory(
        2 * total + budget,
        f"the demo model ({layers} layers x {experts} experts, hidden {hidden}; two copies)",
        "shrink it with --layers N, --experts E or --hidden H",
    )
    print(
        f"model: Mixtral-style, {layers} layers x {experts} experts (top-2), hidden {hidden}, "
        f"{format_size(expert_bytes)} of experts; built twice from seed {seed}, one copy patched"
    )
    plain = build_model(layers, experts, hidden, seed)
    offloaded = build_model(layers, experts, hidden, seed)
    prompt = torch.randint(
        0, plain.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed)
    )
    # Every miss copied into a slot, as on a GPU: the demo shows the cache at
    # work (on a CPU, patch's default runs the experts in place instead).
    offloader = patch(offloaded, device="cpu", device_budget=budget, cpu_experts="never")
    try:
        print(f"patched: {offloader}; budget {format_size(budget)} = {budget_fraction:.0%} of the experts")
        outputs, seconds = timed_generations(
            {"unpatched": plain, "patched": offloaded}, prompt, tokens, runs, offloader.reset_stats
        )
        stats = offloader.stats()
    finally:
        unpatch(offloaded)

    same = torch.equal(outputs["unpatched"], outputs["patched"])
    print(f"\ngenerated {tokens} tokens: {outputs['patched'][0, PROMPT_TOKENS:].tolist()}")
    print(f"same tokens as the unpatched model: {'yes' if same else 'NO'}")
    _print_speeds(tokens, runs, seconds, budget_fraction)
    _print_stats(stats, runs)
    return 0 if same else 1


def _print_speeds(tokens: int, runs: int, seconds: dict[str, list[float]], budget_fraction: float) -> None:
    plain, lo_plain, hi_plain = _speed(tokens, seconds["unpatched"])
    patched, lo_patched, hi_patched = _speed(tokens, seconds["patched"])
    print(
        f"\nspeed, tokens/s: median of {runs} timed generation{'s' if runs > 1 else ''} of {tokens} tokens "
        f"each (slowest-fastest), after one warm-up generation"
    )
    print(f"  unpatched, every expert in memory:      {plain:8.1f}  ({lo_plain:.1f}-{hi_plain:.1f})")
    label = f"patched, {budget_fraction:.0%} of the experts in slots:"
    print(f"  {label:<39} {patched:8.1f}  ({lo_patched:.1f}-{hi_patched:.1f})")
    print(f"  {'patched / unpatched:':<39} {patched / plain:8.2f}x")


def _print_stats(stats: dict[str, Any], runs: int) -> None:
    print(f"\ncache statistics over the {runs} timed generation{'s' if runs > 1 else ''}:")
    for key in (
        "hits",
        "misses",
        "hit_rate",
        "evictions",
        "bytes_to_device",
        "peak_resident_bytes",
        "budget_bytes",
    ):
        value = stats[key]
        shown = f"{value:.3f}" if isinstance(value, float) else f"{value:,}"
        print(f"  {key:<20} {shown}")
    print(f"  {'stall_seconds':<20} {stats['stall_seconds']:.4f}")
