"""Request-level tracing on the live path: activation matrices per request,
the EAMC filled by generation and carried across restarts, traces recorded
from a patched model, and prefetching that leaves the tokens unchanged."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build, expert_bytes, prompt

import moe_offload
from moe_offload import MoeOffloadError, _core
from moe_offload.serve.latent import fit_latent_attention
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


def saved_affinity_tables(path: Path) -> tuple[int, np.ndarray]:
    """The planner's affinity tables in an EAMC file: their count and values
    (the file layout of version 2: after the header and the entries)."""
    data = path.read_bytes()
    version, layers, experts, _, entries, _, tables = struct.unpack_from("<7I", data, 8)
    assert version == 2
    start = 8 + 7 * 4 + entries * (layers * experts * 4 + 12)
    count = tables * layers * experts * experts
    return tables, np.frombuffer(data, dtype="<f4", count=count, offset=start)


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
    tables, learned = saved_affinity_tables(path)
    assert tables > 0 and learned.sum() > 0, "the planner's tables are saved with the EAMC"

    offloader = moe_offload.patch(model, device="cpu", device_budget=budget, eamc_path=path)
    assert offloader.eamc_size == 2
    # Saved again before any traffic: the same file, so the restarted
    # planner holds the saved tables (a cold one would save zeros).
    assert offloader.save_eamc(tmp_path / "again.eamc").read_bytes() == path.read_bytes()
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


def test_a_layout_traces_keyed_requests_across_passes_and_refuses_bad_input(tmp_path):
    cache, _ = make_cache([(4, 100)])
    # Two packed requests (top-1): "a" has two rows, "b" one; then one each.
    cache.set_layout([7, 9], [2, 1])
    cache.observe(0, [0, 1, 3], top_k=1)
    cache.set_layout([9, 7], [1, 1])
    cache.observe(0, [3, 1], top_k=1)
    with pytest.raises(MoeOffloadError, match=r"gives out 2 token rows but layer 0's routing has 3"):
        cache.observe(0, [0, 1, 2], top_k=1)
    with pytest.raises(MoeOffloadError, match="request key 5 is not live"):
        cache.end_request(5)
    with pytest.raises(MoeOffloadError, match="one row count per key"):
        cache.set_layout([1, 2], [1])
    cache.end_request(9)
    cache.end_request(7)
    path = tmp_path / "k.eamc"
    cache.save_eamc(path)
    eamc = _core.ActivationCollection.load(path)
    assert [eamc.entry(i) for i in range(len(eamc))] == [[0, 0, 0, 2], [1, 2, 0, 0]]


CB_PROMPTS = [[5, 17, 33, 8, 9], [40, 41, 42], [7, 7, 7, 7, 7, 7, 7, 60, 61], [11, 90, 12, 13, 70, 14]]
CB_NEW_TOKENS = 6


def eamc_entries(path) -> list[list[int]]:
    eamc = _core.ActivationCollection.load(path)
    return [eamc.entry(i) for i in range(len(eamc))]


def served_alone(model, tmp_path) -> tuple[list[list[int]], list[list[int]], list]:
    """Each CB prompt through plain `generate` on a fresh patch: its new
    tokens, its EAMC entry and its recorded routing."""
    path = tmp_path / "alone.eamc"
    offloader = moe_offload.patch(model, device="cpu", eamc_path=path)
    tokens = []
    with offloader.record_trace(tmp_path / "alone.jsonl"), torch.no_grad():
        for p in CB_PROMPTS:
            out = model.generate(
                torch.tensor([p]),
                max_new_tokens=CB_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            tokens.append(out[0, len(p) :].tolist())
    moe_offload.unpatch(model)
    return tokens, eamc_entries(path), read_trace(tmp_path / "alone.jsonl").requests


def serve_continuously(model, offloader, batch_tokens: int) -> tuple[list[str], dict[str, list[int]]]:
    """Serves the CB prompts through transformers' continuous batching (several
    requests packed into one pass), the offloader following each pass's
    layout; returns the request ids in the order they finished (and were
    ended) and each one's tokens."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=CB_NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb_cfg = ContinuousBatchingConfig(
        num_blocks=16, max_batch_tokens=batch_tokens, page_size=16, max_requests_per_batch=8,
        use_cuda_graph=False, use_async_batching=False, allow_block_sharing=False,
    )  # fmt: skip
    manager = model.init_continuous_batching(generation_config=gen_cfg, continuous_batching_config=cb_cfg)

    packed = []

    def layout():
        batch = manager.batch_processor
        if batch is None:
            return None
        rows = [(f.state.request_id, f.query_length) for f in batch.inputs_and_outputs.requests_in_batch]
        packed.append(len(rows))
        return rows

    offloader.track_requests(layout)
    ended, tokens = [], {}
    manager.start()
    try:
        for i, p in enumerate(CB_PROMPTS):
            manager.add_request(p, request_id=f"req_{i}", max_new_tokens=CB_NEW_TOKENS)
        while len(ended) < len(CB_PROMPTS):
            out = manager.get_result(timeout=30)
            assert out is not None, manager.background_thread_status.fatal_error
            if out.is_finished():
                offloader.end_request(out.request_id)
                ended.append(out.request_id)
                tokens[out.request_id] = list(out.generated_tokens)
    finally:
        manager.stop(block=True, timeout=30)
        offloader.track_requests(None)
    assert max(packed) > 1, "no pass packed several requests: nothing was tested"
    return ended, tokens


# 64: every prompt in the first pass; 8: prompts prefilled in chunks that
# share passes with other requests' decoding. DeepSeek-V2 caches latents in
# the paged cache (the server's fit_latent_attention).
@pytest.mark.parametrize("batch_tokens", [64, 8])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_continuous_batching_traces_each_request_as_if_served_alone(tmp_path, family, batch_tokens):
    model = build(family)
    latent_hooks = fit_latent_attention(model)
    assert bool(latent_hooks) == (family == "deepseek_v2")
    alone_tokens, alone_entries, alone_routing = served_alone(model, tmp_path)
    assert len(alone_entries) == len(CB_PROMPTS)

    path = tmp_path / "cb.eamc"
    offloader = moe_offload.patch(model, device="cpu", eamc_path=path)
    with offloader.record_trace(tmp_path / "cb.jsonl"):
        ended, tokens = serve_continuously(model, offloader, batch_tokens)
    with pytest.raises(MoeOffloadError, match="'req_0' is not being traced"):
        offloader.end_request("req_0")
    offloader.save_eamc()
    moe_offload.unpatch(model)
    for hook in latent_hooks:
        hook.remove()

    order = [int(key.removeprefix("req_")) for key in ended]
    assert sorted(order) == list(range(len(CB_PROMPTS)))
    # Same greedy tokens, so the same routing, request by request.
    assert [tokens[key] for key in ended] == [alone_tokens[i] for i in order]
    assert eamc_entries(path) == [alone_entries[i] for i in order]
    recorded = read_trace(tmp_path / "cb.jsonl").requests
    assert len(recorded) == len(CB_PROMPTS)
    for request, i in zip(recorded, order, strict=True):
        assert request.routing.shape == alone_routing[i].routing.shape
        # Per token, the same experts (their order within a row may differ).
        assert (sorted_rows(request.routing) == sorted_rows(alone_routing[i].routing)).all()


def sorted_rows(routing):
    return torch.from_numpy(routing.astype("int64")).sort(dim=-1).values.numpy()


def test_plain_generate_traces_one_request_per_sequence_with_or_without_a_layout(tmp_path):
    model = build("mixtral")
    inputs = prompt("mixtral")
    batch = {k: v.repeat(2, 1) for k, v in inputs.items()}
    batch["input_ids"][1, -3:] = torch.tensor([20, 21, 22])
    entries = []
    for i, layout in enumerate([None, lambda: None]):
        path = tmp_path / f"plain{i}.eamc"
        offloader = moe_offload.patch(model, device="cpu", eamc_path=path)
        offloader.track_requests(layout)
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        moe_offload.unpatch(model)
        entries.append(eamc_entries(path))
    assert entries[0] == entries[1]
    assert len(entries[0]) == 2 and entries[0][0] != entries[0][1]
    # Every position but the last generated token, top-2 in each of 3 layers.
    passed = inputs["input_ids"].shape[1] + 3
    assert all(sum(entry) == passed * 2 * 3 for entry in entries[0])


def test_a_layout_that_does_not_cover_the_pass_warns_once_and_traces_one_request(tmp_path):
    model = build("mixtral")
    path = tmp_path / "bad.eamc"
    offloader = moe_offload.patch(model, device="cpu", eamc_path=path)
    offloader.track_requests(lambda: [("a", 1), ("b", 1)])
    with pytest.warns(RuntimeWarning, match="gives 2 token rows to 2 requests but the pass has 8") as caught:
        with torch.no_grad():
            model.generate(**prompt("mixtral"), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert len([w for w in caught if "batch layout" in str(w.message)]) == 1
    moe_offload.unpatch(model)
    [entry] = eamc_entries(path)
    assert sum(entry) == (8 + 2) * 2 * 3
