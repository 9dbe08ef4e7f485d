"""Request-level tracing on the live path: activation matrices per request,
the EAMC filled by generation and carried across restarts, traces recorded
from a patched model, and prefetching that leaves the tokens unchanged."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, expert_bytes, prompt

import moe_offload
from moe_offload import MoeOffloadError, _core
from moe_offload.traces import read_trace


def make_cache(layers, **kwargs):
    slot_bytes = 4096
    pool = torch.zeros(4 * slot_bytes, dtype=torch.uint8)
    cache = _core.ExpertCache(
        layers=layers,
        pool_address=pool.data_ptr(),
        pool_owner=pool,
        slot_bytes=slot_bytes,
        n_slots=4,
        **kwargs,
    )
    return cache, pool


def test_each_sequence_of_a_batch_gets_its_own_activation_matrix(tmp_path):
    cache, _ = make_cache([(4, 100), (4, 100)])
    cache.begin_requests(2)
    # Batch of 2 sequences, 2 tokens each, top-2: rows are batch-major.
    cache.observe(0, [0, 1, 2, 3, 0, 2, 1, 3], top_k=2)
    cache.observe(1, [3, 2, 3, 1, 0, 1, 0, 2], top_k=2)
    cache.observe(0, [0, 2, 1, 3], top_k=2)  # one decode step: one row each
    cache.end_requests()
    path = tmp_path / "c.eamc"
    cache.save_eamc(path)
    eamc = _core.ActivationCollection.load(path)
    assert len(eamc) == 2
    # Worked by hand: layer 0 then layer 1, experts 0..3.
    assert eamc.entry(0) == [2, 1, 2, 1] + [0, 1, 1, 2]
    assert eamc.entry(1) == [1, 2, 1, 2] + [2, 1, 1, 0]


def test_generation_fills_the_eamc_and_a_restart_starts_warm(tmp_path):
    model = build("mixtral")
    inputs = prompt("mixtral")
    budget = int(0.25 * expert_bytes(model))
    path = tmp_path / "warm.eamc"

    offloader = moe_offload.patch(model, device="cpu", device_budget=budget, eamc_path=path)
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        model.generate(**prompt("mixtral", seed=1), max_new_tokens=6, do_sample=False)
    moe_offload.unpatch(model)  # ends the live request and saves the EAMC
    assert path.exists()
    assert len(_core.ActivationCollection.load(path)) == 2

    offloader = moe_offload.patch(model, device="cpu", device_budget=budget, eamc_path=path)
    assert offloader.eamc_size == 2
    with torch.no_grad():
        again = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    moe_offload.unpatch(model)
    assert torch.equal(first, again)

    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(MoeOffloadError, match="warm.eamc"):
        moe_offload.patch(model, device="cpu", device_budget=budget, eamc_path=path)
    assert not moe_offload.is_patched(model)


def router_choices(model, sequence: torch.Tensor) -> torch.Tensor:
    """Each position's top-k experts per MoE layer, from the unpatched
    model's own router logits: (tokens, layers, top_k), sorted per token."""
    with torch.no_grad():
        out = model(sequence, output_router_logits=True)
    k = model.config.num_experts_per_tok
    picks = [logits.topk(k, dim=-1).indices for logits in out.router_logits]
    return torch.stack(picks, dim=1).sort(dim=-1).values


def test_a_recorded_trace_is_the_routing_the_model_chose(tmp_path):
    model = build("mixtral")
    inputs = prompt("mixtral")
    path = tmp_path / "live.jsonl"
    offloader = moe_offload.patch(model, device="cpu", device_budget=int(0.25 * expert_bytes(model)))
    with offloader.record_trace(path), torch.no_grad():
        sequence = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    moe_offload.unpatch(model)

    trace = read_trace(path)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (3, 8, 2)
    [request] = trace.requests
    # Every position but the last generated one passed through the model.
    recorded = torch.from_numpy(request.routing.astype("int64")).sort(dim=-1).values
    expected = router_choices(model, sequence[:, :-1])
    assert recorded.shape == expected.shape == (inputs["input_ids"].shape[1] + 7, 3, 2)
    assert torch.equal(recorded, expected)

    # The replay walks exactly that sequence of routings.
    from moe_offload import lab

    report = lab.run(trace, ["lru", "oracle"], lab.LabParams(expert_bytes=1 << 20))
    assert report["trace"]["tokens"] == request.tokens
    assert report["policies"]["oracle"]["hit_rate"] >= report["policies"]["lru"]["hit_rate"]


def test_prefetching_copies_ahead_and_leaves_the_tokens_unchanged(tmp_path):
    model = build("qwen3_moe")
    inputs = prompt("qwen3_moe", length=12)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    offloader = moe_offload.patch(
        model, device="cpu", device_budget=int(0.25 * expert_bytes(model)), policy="activation-aware"
    )
    with torch.no_grad():
        model.generate(**prompt("qwen3_moe", seed=3), max_new_tokens=16, do_sample=False)
        offloader.reset_stats()
        offloaded = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    stats = offloader.stats()
    moe_offload.unpatch(model)
    assert torch.equal(plain, offloaded)
    assert stats["prefetch_copies"] > 0
    # Some prefetched experts had arrived by the time their layer needed them.
    assert stats["prefetch_hits"] > 0, stats
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    rates = stats["layer_hit_rates"]
    assert len(rates) == stats["moe_layers"] == 3 and all(0.0 <= r <= 1.0 for r in rates)
