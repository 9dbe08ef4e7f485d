"""Experts run on the CPU from host memory: the cost measurements `auto`
starts from, layers that mix slots and the CPU, and the hold on an expert's
host bytes while the CPU reads them."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build, expert_bytes, greedy, prompt

import moe_offload
from moe_offload import MoeOffloadError
from moe_offload.adapters import fused
from moe_offload.offloader import calibrate_cpu


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "switch_transformers"])
def test_calibration_measures_the_cpu_for_few_and_many_tokens(family):
    model = build(family)
    offloader = moe_offload.patch(model, device="cpu")
    assert offloader.cache.cpu_costs is None, "nothing measured yet"
    calibrate_cpu(offloader)
    few, per_token = offloader.cache.cpu_costs
    assert few > 0 and per_token > 0
    # Calibration is not the model's work: the statistics do not count it.
    assert offloader.stats()["cpu_seconds"] == 0
    assert offloader.cache.host_held == 0
    moe_offload.unpatch(model)


def test_a_layer_runs_hits_from_slots_and_misses_on_the_cpu():
    model = build("qwen2_moe", seed=2)
    inputs = prompt("qwen2_moe", seed=2)
    model.set_experts_implementation("eager")
    plain_tokens, plain_logits = greedy(model, inputs, 24)
    budget = expert_bytes(model) // 2
    offloader = moe_offload.patch(model, device="cpu", device_budget=budget, cpu_experts="always")
    tokens, logits = greedy(model, inputs, 24)
    stats = offloader.stats()
    moe_offload.unpatch(model)
    # Misses ran on the CPU and were copied in the background; later steps
    # found some of them in slots (a few only on their way: misses waiting
    # for a copy already running).
    assert stats["cpu_experts"] > stats["misses_copied"] >= 0
    assert stats["background_copies"] > 0 and stats["hits"] > 0
    # No copy on demand: every copy was a background copy or a prefetch
    # (some may still be in flight).
    assert stats["copies"] <= stats["background_copies"] + stats["prefetch_copies"]
    assert torch.equal(tokens, plain_tokens) and torch.equal(logits, plain_logits)


def test_host_bytes_held_for_the_cpu_cannot_be_rewritten():
    model = build("mixtral")
    offloader = moe_offload.patch(model, device="cpu")
    cache = offloader.cache
    address = cache.host_acquire(0, 3)
    block = offloader.blocks[0]
    assert cache.host_region[0] <= address < sum(cache.host_region)
    source = torch.zeros(block.specs[0].nbytes, dtype=torch.uint8)
    with pytest.raises(MoeOffloadError, match="expert 3 of layer 0 is in use"):
        cache.write_expert(0, 3, 0, source.data_ptr(), source.numel())
    cache.host_release(0, 3)
    with pytest.raises(MoeOffloadError, match="expert 3 of layer 0 is not held"):
        cache.host_release(0, 3)
    # A hold nobody gives back (an interrupted pass) is dropped by release_all.
    cache.host_acquire(1, 2)
    assert (cache.host_held, cache.release_all()) == (1, 1)
    assert cache.host_held == 0
    moe_offload.unpatch(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_cpu_reads_the_experts_the_model_holds(family):
    """Each expert's view of host memory holds exactly its parameters."""
    model = build(family)
    blocks_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    offloader = moe_offload.patch(model, device="cpu")
    for layer, block in enumerate(offloader.blocks):
        for expert in (0, block.num_experts - 1):
            address = offloader.cache.host_acquire(layer, expert)
            try:
                views = offloader.host.views(address, block.specs)
                for spec in block.specs:
                    name, index = block.parameter_name(spec, expert)
                    expected = blocks_before[name] if index is None else blocks_before[name][index]
                    assert torch.equal(views[spec.name], expected), (family, name, expert)
            finally:
                offloader.cache.host_release(layer, expert)
    moe_offload.unpatch(model)


@pytest.mark.parametrize("path", ["fused, expert by expert", "fused, in place", "modulelist"])
def test_cpu_threads_apply_to_experts_run_on_the_cpu_only(path, monkeypatch):
    family = "switch_transformers" if path == "modulelist" else "mixtral"
    model = build(family)
    inputs = prompt(family)
    plain, _ = greedy(model, inputs, 4)
    seen: list[int] = []

    def counting(run):
        def counted(*args):
            seen.append(torch.get_num_threads())
            return run(*args)

        return counted

    monkeypatch.setattr(fused, "_expert_output", counting(fused._expert_output))
    monkeypatch.setattr(fused.InPlace, "run", counting(fused.InPlace.run))
    # A budget keeps slots, so experts run one by one; without one, a fused
    # layer runs in place.
    budget = expert_bytes(model) // 4 if path == "fused, expert by expert" else None
    offloader = moe_offload.patch(
        model, device="cpu", device_budget=budget, cpu_experts="always", cpu_threads=1
    )
    if path == "modulelist":
        for block in offloader.blocks:
            for expert in block.experts:  # after moe-offload's own pre-hook
                expert.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tokens, _ = greedy(model, inputs, 4)
        assert torch.get_num_threads() == 2, "put back after each expert"
    finally:
        torch.set_num_threads(threads)
    cpu_experts = offloader.stats()["cpu_experts"]
    moe_offload.unpatch(model)
    assert torch.equal(tokens, plain)
    if path == "fused, expert by expert":
        # Hits run from their slots, with torch's threads.
        assert seen.count(1) == cpu_experts > 0 and set(seen) <= {1, 2}
    else:
        assert seen and set(seen) == {1}


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("switch_transformers", "nllb_moe")])
def test_a_layer_run_in_place_sees_every_expert_as_the_model_held_it(family):
    model = build(family)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    offloader = moe_offload.patch(model, device="cpu")
    for block in offloader.blocks:
        in_place = block.module.__dict__["_moe_offload_in_place"]
        for name, view in in_place.stacked.items():
            assert torch.equal(view, before[f"{block.name}.{name}"]), (family, block.name, name)
    moe_offload.unpatch(model)


@pytest.mark.parametrize("threads", [0, -2, 1.5, "4", True, 10**6])
def test_cpu_threads_out_of_range_are_refused_by_name(threads):
    model = build("olmoe")
    with pytest.raises(MoeOffloadError, match=r"cpu_threads=.*torch threads for experts run on the CPU"):
        moe_offload.patch(model, device="cpu", cpu_threads=threads)
    assert not moe_offload.is_patched(model)
