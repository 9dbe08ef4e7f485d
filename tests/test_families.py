"""Every supported family: patched generation gives the same tokens and
logits as the unpatched model, within a budget of about a quarter of the
experts, whether misses are copied or run on the CPU, and unpatching gives
the exact parameters back."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ENCODER_DECODER, FAMILIES, build, expert_bytes, greedy, prompt

import moe_offload

NEW_TOKENS = 16


def generate(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    return greedy(model, inputs, NEW_TOKENS)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("cpu_experts", ["never", "auto", "always"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_generates_what_the_plain_model_generates(family, device, cpu_experts):
    model = build(family).to(device)
    inputs = {name: tensor.to(device) for name, tensor in prompt(family).items()}
    plain_tokens, plain_logits = generate(model, inputs)
    if family not in ENCODER_DECODER:
        # Same expert arithmetic on both sides: transformers' eager experts.
        model.set_experts_implementation("eager")
    eager_tokens, eager_logits = generate(model, inputs)
    before = snapshot(model)
    budget = int(0.25 * expert_bytes(model))

    offloader = moe_offload.patch(model, device=device, device_budget=budget, cpu_experts=cpu_experts)
    tokens, logits = generate(model, inputs)
    stats = offloader.stats()
    moe_offload.unpatch(model)

    assert stats["backend"] == ("cuda" if device == "cuda" else "host")
    assert tokens.shape[-1] >= NEW_TOKENS
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(tokens, eager_tokens)
    # On CUDA, experts run on the CPU compute in another order of float
    # operations than the GPU's kernels: the logits agree to rounding.
    tolerance = 1e-4 if device == "cuda" and stats["cpu_experts"] else 1e-5
    assert (logits - plain_logits).abs().max().item() <= tolerance
    if device == "cpu" or not stats["cpu_experts"]:
        assert torch.equal(logits, eager_logits), "same arithmetic must give bit-identical logits"
    if cpu_experts == "never":
        assert stats["cpu_experts"] == 0
    elif cpu_experts == "always" or device == "cpu":
        # Every miss runs on the CPU (but one whose background copy or
        # prefetch is already on its way): no copy on demand.
        assert stats["cpu_experts"] > 0
        assert stats["copies"] <= stats["background_copies"] + stats["prefetch_copies"]
    # Unpatched, the model runs its own experts implementation again.
    _, restored_logits = generate(model, inputs)
    assert torch.equal(restored_logits, eager_logits)
    assert stats["misses"] > 0
    assert 0 < stats["peak_resident_bytes"] <= stats["budget_bytes"] == budget
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_budget_is_respected_and_unpatch_restores_the_exact_parameters():
    model = build("mixtral", seed=3)
    params_before = dict(model.named_parameters())
    values_before = snapshot(model)
    budget = int(0.25 * expert_bytes(model))
    offloader = moe_offload.patch(model, device="cpu", device_budget=budget, cpu_experts="never")

    # While patched, expert weights hold no memory in the model itself: the
    # module sees data-less placeholders, and the original parameter objects
    # (kept for unpatch) have released their storage.
    assert model.model.layers[0].mlp.experts.gate_up_proj.is_meta
    experts = [p for name, p in params_before.items() if ".experts." in name]
    assert experts and all(p.untyped_storage().nbytes() == 0 for p in experts)
    generate(model, prompt("mixtral", seed=5))
    stats = offloader.stats()
    assert stats["misses"] > 0
    assert stats["evictions"] > 0, "a quarter of the experts cannot hold the working set"
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    assert stats["bytes_to_device"] >= stats["misses"] * offloader.blocks[0].expert_bytes

    offloader.reset_stats()
    assert offloader.stats()["hits"] == offloader.stats()["misses"] == 0

    moe_offload.unpatch(model)
    assert not moe_offload.is_patched(model)
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    for name, param in params_after.items():
        assert param is params_before[name], f"{name} is a new parameter object"
        assert torch.equal(param, values_before[name]), f"{name} changed"
        assert param.device.type == "cpu"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_on_a_cpu_device_no_expert_byte_is_copied_and_no_budget_is_needed(family):
    """Fused experts run in place with the model's own implementation (here
    transformers' default), so the logits are bit-identical to the plain
    model's."""
    model = build(family)
    inputs = prompt(family)
    plain_tokens, plain_logits = generate(model, inputs)
    offloader = moe_offload.patch(model, device="cpu")
    tokens, logits = generate(model, inputs)
    stats = offloader.stats()
    moe_offload.unpatch(model)
    assert (offloader.n_slots, stats["bytes_to_device"], stats["copies"]) == (0, 0, 0)
    assert stats["cpu_experts"] == stats["misses"] > 0 and stats["cpu_seconds"] > 0
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(logits, plain_logits)


def test_every_family_is_found_with_its_layers_and_top_k():
    expected = {
        "mixtral": (3, 8, 2),
        "qwen2_moe": (3, 8, 2),
        "qwen3_moe": (3, 8, 2),
        "deepseek_v2": (2, 8, 2),  # layer 0 is dense
        "deepseek_v3": (2, 8, 2),
        "olmoe": (3, 8, 2),
        "gpt_oss": (3, 8, 2),
        "switch_transformers": (2, 8, 1),  # one sparse encoder + one sparse decoder block
        "nllb_moe": (4, 4, 2),
    }
    from moe_offload.adapters import find_expert_blocks

    for family, (layers, experts, top_k) in expected.items():
        blocks = find_expert_blocks(build(family))
        assert len(blocks) == layers, family
        assert {b.num_experts for b in blocks} == {experts}, family
        assert {b.top_k for b in blocks} == {top_k}, family
        assert all("shared" not in b.name for b in blocks), family


def test_generation_with_a_batch_and_a_roomy_budget():
    model = build("qwen2_moe", seed=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (3, 10), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.set_experts_implementation("eager")
    plain, plain_logits = generate(model, inputs)
    offloader = moe_offload.patch(model, device_budget=expert_bytes(model) * 2)
    tokens, logits = generate(model, inputs)
    stats = offloader.stats()
    moe_offload.unpatch(model)
    assert torch.equal(tokens, plain) and torch.equal(logits, plain_logits)
    # A budget that holds every expert loads them all at patch time.
    assert stats["evictions"] == 0 and stats["misses"] == 0 and stats["hits"] > 0
