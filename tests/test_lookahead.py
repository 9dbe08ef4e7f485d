"""Router lookahead on every fused family: where the hidden state does not
change between MoE layers, the routers run ahead predict exactly what the
routers then choose; on an ordinary model they do not, and the tokens are
the model's own either way. Also its statistics, options and errors.

Nothing here measures how good the lookahead is on a real model: these
models have random weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as tf
from tiny_models import FAMILIES, build, expert_bytes, greedy, prompt
from torch import nn

import moe_offload
from moe_offload import MoeOffloadError, UnsupportedModelError, _core
from moe_offload.lookahead import find_routers
from moe_offload.runtime import RequestTracker

FUSED = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "gpt_oss"]
# Decoder layers of the models built here: DeepSeek's first one is dense,
# so every family has at least 4 MoE layers, and layer 0 looks 3 ahead.
LAYERS = 5
DEPTH = 3
NEW_TOKENS = 6


def deep_model(family: str, seed: int = 0) -> tf.PreTrainedModel:
    """`tiny_models.build(family)` with `LAYERS` decoder layers: the same
    config otherwise, and the same wide random weights."""
    config = FAMILIES[family]().config
    config.num_hidden_layers = LAYERS
    if getattr(config, "layer_types", None):
        config.layer_types = (list(config.layer_types) * LAYERS)[:LAYERS]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
            elif "norm" not in name:
                param.normal_(0.0, 0.02)
    return model


def still_model(family: str) -> tf.PreTrainedModel:
    """A model whose residual stream does not change after the embedding:
    every attention output projection and every MLP's down projection
    (routed experts, shared experts, dense layers) is zero, and the norms
    before the MoE blocks are all ones, so each MoE layer's router gets the
    same hidden state."""
    model = deep_model(family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".o_proj." in name or "down_proj" in name:
                param.zero_()
            elif "post_attention_layernorm" in name:
                param.fill_(1.0)
    return model


@contextmanager
def observed(offloader: moe_offload.Offloader) -> Iterator[list[tuple[int, np.ndarray, np.ndarray | None]]]:
    """Every (layer, routing, lookahead predictions) the patched model hands
    to the core, in order."""
    tracker = offloader.tracker
    calls: list[tuple[int, np.ndarray, np.ndarray | None]] = []

    def observe(layer: int, routing: np.ndarray, predicted: np.ndarray | None = None) -> None:
        calls.append((layer, routing.copy(), None if predicted is None else predicted.copy()))
        RequestTracker.observe(tracker, layer, routing, predicted)

    tracker.observe = observe  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del tracker.observe


def patch(model: torch.nn.Module, slots: bool, **kwargs: object) -> moe_offload.Offloader:
    """Patched on the CPU: through device slots (`slots`, a quarter of the
    experts) or with every expert run where it lies in host memory."""
    if slots:
        budget = int(0.25 * expert_bytes(model))
        return moe_offload.patch(model, device="cpu", device_budget=budget, cpu_experts="never", **kwargs)
    return moe_offload.patch(model, device="cpu", **kwargs)


@pytest.mark.parametrize("slots", [True, False], ids=["slots", "in-place"])
@pytest.mark.parametrize("family", FUSED)
def test_with_the_hidden_state_unchanged_the_lookahead_is_the_routing(family: str, slots: bool) -> None:
    model = still_model(family)
    offloader = patch(model, slots, lookahead=DEPTH)
    layers = len(offloader.blocks)
    assert layers >= DEPTH + 1
    with observed(offloader) as calls:
        greedy(model, prompt(family), NEW_TOKENS)
    stats = offloader.stats()["lookahead"]
    moe_offload.unpatch(model)

    # Directly: what layer l predicted for l + d is what l + d then chose.
    compared = 0
    for i, (layer, _, predicted) in enumerate(calls):
        assert predicted is not None or layer == layers - 1
        for d, guess in enumerate([] if predicted is None else predicted, start=1):
            later, routing, _ = calls[i + d]
            assert later == layer + d
            assert np.array_equal(guess, routing), (family, layer, d)
            compared += 1
    assert compared == NEW_TOKENS * sum(min(DEPTH, layers - 1 - layer) for layer in range(layers))
    # And as the statistics report it.
    assert stats["depth"] == DEPTH
    assert stats["precision"] == stats["recall"] == stats["token_overlap"] == [1.0] * DEPTH
    # One pass per new token; distance d scores layers d .. layers - 1.
    assert stats["passes"] == [NEW_TOKENS * (layers - d) for d in range(1, DEPTH + 1)]
    for target in range(layers):
        expected = [1.0 if target >= d else None for d in range(1, DEPTH + 1)]
        assert stats["layer_precision"][target] == stats["layer_recall"][target] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("family", FUSED)
def test_on_a_gpu_the_lookahead_is_the_routing_and_the_tokens_are_the_models(family: str) -> None:
    """The CUDA path: the routers ahead run on the device and their choices
    come back in the routing's copy, still exact on a still model; on an
    ordinary one the patched model still gives the plain model's tokens."""
    for model, exact in ((still_model(family), True), (deep_model(family), False)):
        model = model.to("cuda")
        inputs = {name: tensor.to("cuda") for name, tensor in prompt(family).items()}
        plain, _ = greedy(model, inputs, NEW_TOKENS)
        budget = int(0.25 * expert_bytes(model))
        offloader = moe_offload.patch(model, device="cuda", device_budget=budget, lookahead=DEPTH)
        tokens, _ = greedy(model, inputs, NEW_TOKENS)
        stats = offloader.stats()["lookahead"]
        moe_offload.unpatch(model)
        assert torch.equal(tokens, plain), family
        assert all(p is not None for p in stats["precision"]), stats
        if exact:
            assert stats["precision"] == stats["recall"] == [1.0] * DEPTH, stats


@pytest.mark.parametrize("family", FUSED)
def test_on_an_ordinary_model_the_lookahead_errs_and_the_tokens_are_the_models(family: str) -> None:
    model = deep_model(family)
    inputs = prompt(family)
    model.set_experts_implementation("eager")  # the arithmetic the patch runs
    plain_tokens, plain_logits = greedy(model, inputs, NEW_TOKENS)
    offloader = patch(model, slots=True, lookahead=DEPTH)
    tokens, logits = greedy(model, inputs, NEW_TOKENS)
    stats = offloader.stats()["lookahead"]
    moe_offload.unpatch(model)
    assert torch.equal(tokens, plain_tokens)
    assert torch.equal(logits, plain_logits)
    # Random routers of different layers agree only by chance.
    assert all(p is not None and 0.0 <= p < 1.0 for p in stats["precision"]), stats
    assert all(0.0 <= r < 1.0 for r in stats["recall"]), stats
    assert all(0.0 <= t < 1.0 for t in stats["token_overlap"]), stats


def test_the_planner_prefetches_what_the_lookahead_predicts() -> None:
    """Where the lookahead is exact, prefetches guided by it hit far more
    often than those from routing history alone (plans come from the
    planner thread as the model runs, so the counts vary a little)."""
    hits = {}
    for depth in (0, DEPTH):
        model = still_model("mixtral")
        offloader = patch(model, slots=True, lookahead=depth)
        greedy(model, prompt("mixtral"), 24)
        hits[depth] = offloader.stats()["prefetch_hits"]
        moe_offload.unpatch(model)
    assert hits[DEPTH] > 2 * hits[0], hits


def test_statistics_are_absent_without_lookahead_and_reset_with_the_others() -> None:
    model = still_model("mixtral")
    offloader = patch(model, slots=True)
    greedy(model, prompt("mixtral"), 2)
    assert offloader.stats()["lookahead"] is None
    moe_offload.unpatch(model)
    offloader = patch(model, slots=True, lookahead=1)
    greedy(model, prompt("mixtral"), 2)
    assert offloader.stats()["lookahead"]["passes"][0] > 0
    offloader.reset_stats()
    stats = offloader.stats()["lookahead"]
    assert stats["passes"] == [0]
    assert stats["precision"] == stats["recall"] == stats["token_overlap"] == [None]
    moe_offload.unpatch(model)


def test_packed_requests_of_continuous_batching_are_looked_ahead_each() -> None:
    """A layout packs several requests' tokens into one pass (as `serve`
    does): the lookahead is split among them like the routing, and still
    exact on a model whose hidden state does not change."""
    model = still_model("qwen3_moe")
    offloader = patch(model, slots=True, lookahead=2)
    layout = [("a", 3), ("b", 5)]
    offloader.track_requests(lambda: layout)
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
        layout = [("b", 1), ("a", 1)]
        model(input_ids=ids[:, :2])
    offloader.end_request("a")
    offloader.end_request("b")
    stats = offloader.stats()["lookahead"]
    assert offloader.eamc_size == 2
    moe_offload.unpatch(model)
    assert stats["precision"] == stats["recall"] == [1.0, 1.0]
    assert stats["passes"][0] == 2 * (len(offloader.blocks) - 1)


@pytest.mark.parametrize("value", [-1, 17, 2.0, "2", True, None])
def test_bad_lookahead_values_are_refused_naming_the_option(value: object) -> None:
    model = build("mixtral")
    with pytest.raises(MoeOffloadError, match=r"lookahead=.*(integer|out of range)"):
        moe_offload.patch(model, device="cpu", lookahead=value)  # type: ignore[arg-type]
    assert not moe_offload.is_patched(model)
    with pytest.raises(MoeOffloadError, match="lookahead=-1 is out of range"):
        moe_offload.from_pretrained("no/such/checkpoint", lookahead=-1)


def test_a_lookahead_past_the_last_layer_or_on_another_family_is_refused() -> None:
    model = build("deepseek_v2")  # 3 decoder layers, 2 of them MoE
    with pytest.raises(MoeOffloadError, match="lookahead=2 is out of range for this model: it has 2 MoE"):
        moe_offload.patch(model, device="cpu", lookahead=2)
    assert not moe_offload.is_patched(model)
    model = build("switch_transformers")
    with pytest.raises(UnsupportedModelError, match="router lookahead is supported for the fused-expert"):
        moe_offload.patch(model, device="cpu", lookahead=1)
    assert not moe_offload.is_patched(model)


def test_the_core_checks_a_lookahead_like_a_routing() -> None:
    pool = torch.zeros(4 * 4096, dtype=torch.uint8)
    cache = _core.ExpertCache(
        layers=[(4, 100)] * 3, pool_address=pool.data_ptr(), pool_owner=pool, slot_bytes=4096, n_slots=4
    )
    with pytest.raises(MoeOffloadError, match="reaches past the last of 3 MoE layers"):
        cache.lookahead(1, [0, 1, 2, 3], 1, 2)
    with pytest.raises(MoeOffloadError, match="do not split into 2 layers of rows of top_k = 2"):
        cache.lookahead(0, [0, 1, 2], 2, 2)
    with pytest.raises(MoeOffloadError, match="unknown expert 4 of MoE layer 2"):
        cache.lookahead(0, [0, 4], 1, 2)
    # Sizes whose products overflow are refused, not a panic.
    with pytest.raises(MoeOffloadError, match="reaches past the last"):
        cache.lookahead(2, [0], 1, 2**64 - 2)
    with pytest.raises(MoeOffloadError, match="do not split into 2 layers"):
        cache.lookahead(0, [0], 2**63, 2)
    cache.lookahead(0, [0, 1, 2, 3], 1, 2)
    cache.observe(0, [3, 3], 1)
    cache.observe(1, [0, 1], 1)
    assert cache.lookahead_counts() == [(1, 1, 1, 2, 2, 2, 2, 2)]
    cache.reset_lookahead_counts()
    assert cache.lookahead_counts() == []
    with pytest.raises(MoeOffloadError, match="lookahead_weight=2"):
        _core.ExpertCache(
            layers=[(4, 100)],
            pool_address=pool.data_ptr(),
            pool_owner=pool,
            slot_bytes=4096,
            n_slots=4,
            lookahead_weight=2.0,
        )


def test_lookahead_is_refused_where_the_moe_layers_differ_in_width() -> None:
    """The planner that takes the lookahead needs one expert count for
    every MoE layer: a model without it is refused, not silently ignored."""
    blocks = [SimpleNamespace(num_experts=n, layout="fused") for n in (8, 16)]
    with pytest.raises(UnsupportedModelError, match="have 8, 16; patch it without lookahead"):
        find_routers(nn.Module(), blocks, 1)
