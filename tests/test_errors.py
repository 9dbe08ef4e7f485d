"""Bad input fails with an error that names the problem and the fix, and
leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build, expert_bytes

import moe_offload
from moe_offload import (
    BudgetError,
    DeviceError,
    MoeOffloadError,
    PatchStateError,
    UnsupportedModelError,
)


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
        moe_offload.patch(model, device_budget="10KiB", cpu_experts="never")
    message = str(info.value)
    assert "cpu_experts='auto'" in message
    minimum = int(message.split("at least ")[1].split(" bytes")[0])
    # The stated minimum works, one byte less does not.
    with pytest.raises(BudgetError):
        moe_offload.patch(model, device_budget=minimum - 1, cpu_experts="never")
    assert not moe_offload.is_patched(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    offloader = moe_offload.patch(model, device_budget=minimum, cpu_experts="never")
    assert offloader.n_slots == 2
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    moe_offload.unpatch(model)


def test_misses_that_do_not_fit_run_on_the_cpu_with_any_budget():
    model = build("mixtral")
    with torch.no_grad():
        plain = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    for budget in ("10KiB", 0):
        offloader = moe_offload.patch(model, device_budget=budget)
        with torch.no_grad():
            tokens = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
        assert offloader.n_slots == 0 and offloader.stats()["cpu_experts"] > 0
        moe_offload.unpatch(model)
        assert torch.equal(tokens, plain)


def test_an_unknown_cpu_experts_mode_names_the_choices():
    with pytest.raises(MoeOffloadError, match="cpu_experts='sometimes'.*'auto'.*'never'.*'always'"):
        moe_offload.patch(build("olmoe"), cpu_experts="sometimes")


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


def test_a_device_this_machine_lacks_is_a_device_error_from_patch_and_from_pretrained(monkeypatch, tmp_path):
    model = build("olmoe")
    missing = str(tmp_path / "no-such-checkpoint")  # the device is checked first
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for load in (
        lambda: moe_offload.patch(model, device="cuda"),
        lambda: moe_offload.from_pretrained(missing, device="cuda:0"),
    ):
        with pytest.raises(DeviceError, match="no CUDA device.*device='cpu'"):
            load()
    for device in ("tpu", "mps"):
        with pytest.raises(DeviceError, match="use 'cpu' or 'cuda"):
            moe_offload.from_pretrained(missing, device=device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="cuda:3.*does not exist.*cuda:0 to cuda:0"):
        moe_offload.patch(model, device="cuda:3")
    assert not moe_offload.is_patched(model)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("device_budget", 10**30),
        ("device_budget", "99999999999TiB"),
        ("device_budget", "9" * 5000),
        ("eamc_capacity", -1),
        ("eamc_capacity", 0),
        ("eamc_capacity", 2**64),
        ("eamc_capacity", 1_000_001),
        ("eamc_capacity", 2.5),
        ("prefetch_depth", -1),
        ("prefetch_depth", 2**64),
        ("copy_workers", -1),
        ("copy_workers", 0),
        ("copy_workers", 2**40),
        ("copy_workers", True),
        ("show_progress", "yes"),
        ("eamc_path", 3),
    ],
)
def test_out_of_range_arguments_of_patch_name_the_argument(argument, value):
    model = build("olmoe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(MoeOffloadError, match=argument):
        moe_offload.patch(model, **{argument: value})
    assert not moe_offload.is_patched(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_an_eamc_larger_than_half_of_memory_names_eamc_capacity(monkeypatch):
    from moe_offload import offloader as offloading

    # What the core allows for 3 layers x 8 experts in 1 MiB (132 bytes an entry).
    monkeypatch.setattr(offloading, "max_eamc_capacity", lambda layers, experts: (1 << 20) // 132)
    model = build("olmoe")
    with pytest.raises(MoeOffloadError, match=r"eamc_capacity=10000 is too large.*at most 7943"):
        moe_offload.patch(model, eamc_capacity=10_000)
    assert not moe_offload.is_patched(model)
    moe_offload.patch(model, eamc_capacity=7943)
    moe_offload.unpatch(model)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("host_budget", 10**30),
        ("host_budget", -1),
        ("device_budget", "99999999999TiB"),
        ("io_workers", -1),
        ("io_workers", 0),
        ("io_workers", 2**64),
        ("eamc_capacity", 2**64),
        ("prefetch_depth", -1),
    ],
)
def test_out_of_range_arguments_of_from_pretrained_are_refused_before_anything_is_read(
    argument, value, tmp_path
):
    # The checkpoint does not exist: the arguments are checked before it is looked for.
    with pytest.raises(MoeOffloadError, match=argument):
        moe_offload.from_pretrained(tmp_path / "no-such-checkpoint", **{argument: value})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("8GiB", 8 << 30),
        ("1.5 GB", 1_500_000_000),
        ("512mib", 512 << 20),
        ("1048576 TiB", 2**60),
        ("0.1", 0),
    ],
)
def test_sizes_parse(value, expected):
    assert moe_offload.parse_size(value) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.integers(),
        st.text(max_size=30),
        st.from_regex(r"\A\s*\d{1,400}(\.\d{1,400})?\s*(|b|kb|MB|gib|TiB|parsec)\s*\Z"),
    )
)
def test_a_size_is_bytes_within_range_or_an_error_naming_it(value):
    try:
        size = moe_offload.parse_size(value, "host_budget")
    except MoeOffloadError as e:
        assert "host_budget" in str(e) and len(str(e)) < 300
    else:
        assert 0 <= size <= 2**60


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
