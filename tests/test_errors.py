"""Bad input fails with an error that names the problem and the fix, and
leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import build, expert_bytes

import moe_offload
from moe_offload import BudgetError, MoeOffloadError, PatchStateError, UnsupportedModelError


def test_a_model_without_moe_blocks_is_refused_by_name():
    config = tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = tf.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM") as info:
        moe_offload.patch(model)
    for family in moe_offload.SUPPORTED_FAMILIES:
        assert family in str(info.value)
    assert isinstance(info.value, MoeOffloadError)


def test_a_budget_below_one_tokens_experts_states_the_minimum():
    model = build("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(BudgetError, match=r"at least \d+ bytes") as info:
        moe_offload.patch(model, device_budget="10KiB")
    message = str(info.value)
    minimum = int(message.split("at least ")[1].split(" bytes")[0])
    # The stated minimum works, one byte less does not.
    with pytest.raises(BudgetError):
        moe_offload.patch(model, device_budget=minimum - 1)
    assert not moe_offload.is_patched(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    offloader = moe_offload.patch(model, device_budget=minimum)
    assert offloader.n_slots == 2
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    moe_offload.unpatch(model)


@pytest.mark.parametrize("budget", ["lots", "-3GiB", "8 parsecs", 1.5, True])
def test_unparseable_budgets_name_the_expected_form(budget):
    with pytest.raises(MoeOffloadError, match="device_budget"):
        moe_offload.patch(build("olmoe"), device_budget=budget)


def test_patching_twice_and_unpatching_a_plain_model_are_errors():
    model = build("olmoe")
    with pytest.raises(PatchStateError, match="not patched"):
        moe_offload.unpatch(model)
    moe_offload.patch(model, device_budget=expert_bytes(model))
    with pytest.raises(PatchStateError, match="already patched"):
        moe_offload.patch(model)
    moe_offload.unpatch(model)
    with pytest.raises(PatchStateError):
        moe_offload.unpatch(model)


def test_unknown_devices_and_policies_are_refused():
    model = build("olmoe")
    with pytest.raises(MoeOffloadError, match="device"):
        moe_offload.patch(model, device="tpu")
    with pytest.raises(MoeOffloadError, match="policy"):
        moe_offload.patch(model, policy="fifo")
    assert not moe_offload.is_patched(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(MoeOffloadError, match="no CUDA device"):
        moe_offload.patch(build("olmoe"), device="cuda")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4096, 4096), ("4096", 4096), ("8GiB", 8 << 30), ("1.5 GB", 1_500_000_000), ("512mib", 512 << 20)],
)
def test_sizes_parse(value, expected):
    assert moe_offload.parse_size(value) == expected


def test_a_failure_half_way_through_patching_leaves_the_model_as_it_was(monkeypatch):
    from moe_offload import offloader as offloading

    model = build("qwen2_moe")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    real_fill = offloading._fill_host_tier

    def fill_then_fail_at_block_two(cache, layer, block):
        if layer == 2:
            raise MoeOffloadError("disk on fire")
        real_fill(cache, layer, block)

    monkeypatch.setattr(offloading, "_fill_host_tier", fill_then_fail_at_block_two)
    with pytest.raises(MoeOffloadError, match="disk on fire"):
        moe_offload.patch(model, device="cpu")
    assert not moe_offload.is_patched(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], value) for name, value in before.items())
