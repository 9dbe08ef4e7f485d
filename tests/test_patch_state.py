"""A patched model stays whole: `unpatch` restores everything or changes
nothing, a failed EAMC save does not block it, and ordinary transformers
calls that would reach the offloaded experts refuse at once."""

from __future__ import annotations

import signal
import weakref

import pytest
import torch
from tiny_models import build, expert_bytes, greedy, prompt

import moe_offload
from moe_offload import MoeOffloadError, PatchStateError, StoreError

NEW_TOKENS = 4


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_restored(model, before: dict[str, torch.Tensor]) -> None:
    assert not moe_offload.is_patched(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert not after[name].is_meta, f"{name} was left without data"
        assert torch.equal(after[name], value), f"{name} changed"


class FailingReads:
    """The offloader's cache, except that reading back the experts of the
    last MoE layer to be read fails, as a damaged store would."""

    def __init__(self, cache, layers: int) -> None:
        self.cache = cache
        self.layers = layers
        self.seen: set[int] = set()

    def read_expert(self, layer: int, *args) -> None:
        self.seen.add(layer)
        if len(self.seen) == self.layers:
            raise StoreError(f"layer {layer}: checksum mismatch")
        self.cache.read_expert(layer, *args)

    def __getattr__(self, name: str):
        return getattr(self.cache, name)


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_a_failed_unpatch_changes_nothing_and_can_be_retried(family):
    model = build(family)
    inputs = prompt(family)
    before = snapshot(model)
    offloader = moe_offload.patch(model, device_budget=int(0.3 * expert_bytes(model)))
    tokens, _ = greedy(model, inputs, NEW_TOKENS)
    placeholders = {name for name, p in model.named_parameters() if p.is_meta}
    assert placeholders

    cache = offloader.cache
    offloader._cache = FailingReads(cache, len(offloader.blocks))
    with pytest.raises(StoreError, match="checksum mismatch"):
        moe_offload.unpatch(model)
    # Still fully patched: every expert a placeholder, served from the cache.
    assert moe_offload.is_patched(model)
    assert {name for name, p in model.named_parameters() if p.is_meta} == placeholders
    assert torch.equal(greedy(model, inputs, NEW_TOKENS)[0], tokens)

    offloader._cache = cache  # the cause is fixed
    moe_offload.unpatch(model)
    assert_restored(model, before)
    assert torch.equal(greedy(model, inputs, NEW_TOKENS)[0], tokens)


def test_ctrl_c_during_unpatch_is_delivered_once_it_is_complete(monkeypatch):
    model = build("qwen2_moe")
    before = snapshot(model)
    offloader = moe_offload.patch(model, device_budget=int(0.3 * expert_bytes(model)))
    block = offloader.blocks[1]
    restore = block.restore

    def interrupted_restore(tensors):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C, half-way through the swap
        restore(tensors)

    monkeypatch.setattr(block, "restore", interrupted_restore)
    with pytest.raises(KeyboardInterrupt):
        moe_offload.unpatch(model)
    assert_restored(model, before)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_unwritable_eamc_path_warns_at_unpatch_and_fails_only_when_saved_explicitly(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    eamc_path = tmp_path / "a-file" / "eamc.bin"
    model = build("olmoe")
    before = snapshot(model)
    offloader = moe_offload.patch(model, device_budget=expert_bytes(model), eamc_path=eamc_path)
    greedy(model, prompt("olmoe"), NEW_TOKENS)

    with pytest.raises(MoeOffloadError, match="a-file"):
        offloader.save_eamc()
    with pytest.warns(RuntimeWarning, match="could not save the EAMC at unpatch"):
        moe_offload.unpatch(model)
    assert_restored(model, before)


def test_a_patched_model_refuses_casts_moves_and_saving_at_once(tmp_path):
    model = build("mixtral")
    inputs = prompt("mixtral")
    offloader = moe_offload.patch(model, device_budget=int(0.3 * expert_bytes(model)))
    tokens, _ = greedy(model, inputs, NEW_TOKENS)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}

    changes = {
        "to(bfloat16)": lambda: model.to(torch.bfloat16),
        "half()": model.half,
        "to('meta')": lambda: model.to("meta"),
        "to_empty": lambda: model.to_empty(device="cpu"),
        "a submodule's to(bfloat16)": lambda: model.model.layers[1].to(torch.bfloat16),
    }
    for what, change in changes.items():
        with pytest.raises(PatchStateError, match="unpatch"):
            change()
            pytest.fail(f"{what} was allowed")
    with pytest.raises(PatchStateError, match="unpatch"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()

    # What changes nothing is allowed, and nothing was changed.
    assert model.to("cpu") is model and model.to(torch.float32) is model and model.float() is model
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    assert torch.equal(greedy(model, inputs, NEW_TOKENS)[0], tokens)
    assert offloader.stats()["misses"] > 0

    moe_offload.unpatch(model)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").exists()


def test_unpatch_lets_go_of_the_slot_pool_and_the_cache():
    """The pool's memory is kept alive by the cache as long as the cache
    lives: once it is freed, both are gone, although the offloader is still
    referenced (unpatch frees them before moving experts to the device)."""
    model = build("deepseek_v2")
    offloader = moe_offload.patch(model, device_budget=expert_bytes(model))
    pool_memory = weakref.ref(offloader.pool.memory)
    moe_offload.unpatch(model)
    assert pool_memory() is None
    with pytest.raises(PatchStateError, match="unpatched"):
        offloader.stats()
    assert "slots" in repr(offloader)


@pytest.mark.gpu
def test_unpatch_on_cuda_never_holds_the_slots_and_every_expert_at_once():
    model = build("mixtral").to("cuda")
    before = snapshot(model)
    experts = expert_bytes(model)
    # A pool holding every expert: restoring them beside it would double that.
    moe_offload.patch(model, device="cuda", device_budget=2 * experts)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    moe_offload.unpatch(model)
    peak = torch.cuda.max_memory_allocated()
    assert peak <= held + experts // 2, f"peak {peak} with {held} held before and {experts} of experts"
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert_restored(model, before)
