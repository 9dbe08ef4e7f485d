"""The demo: a small Mixtral-style model with random weights, generated with
and without offloading, same tokens, and what the cache did."""

from __future__ import annotations

import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moe_offload.offloader import patch, unpatch
from moe_offload.sizes import format_size


def build_model(layers: int, experts: int, hidden: int, seed: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config).eval()


def _generate(model: MixtralForCausalLM, prompt: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out, time.perf_counter() - started


def run(layers: int, experts: int, hidden: int, tokens: int, budget_fraction: float, seed: int) -> int:
    model = build_model(layers, experts, hidden, seed)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    budget = int(expert_bytes * budget_fraction)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
    print(
        f"model: Mixtral-style, {layers} layers x {experts} experts (top-2), hidden {hidden}, "
        f"{format_size(expert_bytes)} of experts"
    )

    reference, plain_seconds = _generate(model, prompt, tokens)
    offloader = patch(model, device="cpu", device_budget=budget)
    print(f"patched: {offloader}; budget {format_size(budget)} = {budget_fraction:.0%} of the experts")
    offloaded, patched_seconds = _generate(model, prompt, tokens)
    stats = offloader.stats()
    unpatch(model)

    same = torch.equal(reference, offloaded)
    print(f"\ngenerated {tokens} tokens: {offloaded[0, prompt.shape[1] :].tolist()}")
    print(f"same tokens as the unpatched model: {'yes' if same else 'NO'}")
    print(f"unpatched: {tokens / plain_seconds:8.1f} tokens/s")
    print(
        f"patched:   {tokens / patched_seconds:8.1f} tokens/s (all experts resident vs {budget_fraction:.0%})"
    )
    print("\ncache statistics:")
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
    return 0 if same else 1
