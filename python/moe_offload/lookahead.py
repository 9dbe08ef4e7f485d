"""Router lookahead: at MoE layer l, the routers of layers l+1 .. l+D run on
layer l's hidden state and their top-k choices go to the prefetch planner
beside its history signals.

The hidden state changes little from one layer to the next (the residual
stream), so a later layer's router, fed an earlier layer's input, mostly
picks the experts it will pick for real (Pre-gated MoE, ProMoE). Each look-
ahead layer costs one router call on the device (a [tokens, hidden] x
[hidden, experts] matmul and its top-k); the predictions reach the host in
the same copy as the layer's own routing, so no synchronisation is added.

The routers are the model's own modules, called as the MoE block calls
them, so each family's top-k rule (softmax top-k, Qwen's normalised top-k,
DeepSeek-V2's group-limited and DeepSeek-V3's sigmoid scores with their
correction bias and groups, GPT-OSS's router bias) stays the one
transformers runs. How good the predictions are depends on the model's
weights: `Offloader.stats()["lookahead"]` reports it on the model served
(see `summarize`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moe_offload._core import MoeOffloadError, UnsupportedModelError
from moe_offload.adapters import ExpertBlock

# The most layers looked ahead: beyond a few layers the hidden state has
# moved on, and each layer ahead is one more router call per layer.
MAX_LOOKAHEAD = 16
MEANING = "MoE layers ahead whose routers run on each MoE layer's hidden state (default 0: off)"

# Counts per (distance, target layer), as `ExpertCache.lookahead_counts` gives them.
Counts = tuple[int, int, int, int, int, int, int, int]


@dataclass(frozen=True)
class RouterLookahead:
    """The routers of a model's MoE layers, in layer order, and how many
    layers ahead each layer looks."""

    routers: tuple[nn.Module, ...]
    depth: int

    def predict(self, layer: int, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """The experts (token rows of top-k ids, on the device) that the
        routers of the next `depth` layers (fewer near the last) choose for
        `hidden_states`, layer `layer`'s router input."""
        ahead = self.routers[layer + 1 : layer + 1 + self.depth]
        with torch.no_grad():
            return [_route(router, hidden_states) for router in ahead]


def _route(router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    # `forward`, not the module call: hooks on the router (transformers'
    # capture of router logits, a user's) see the model's own calls only.
    out = router.forward(hidden_states)
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], torch.Tensor)):
        raise UnsupportedModelError(
            f"{type(router).__name__} does not return (logits, weights, expert ids) as the routers of the "
            "supported families do; patch without lookahead"
        )
    return out[2]


def find_routers(model: nn.Module, blocks: Sequence[ExpertBlock], depth: int) -> RouterLookahead:
    """Each MoE layer's router (its block's `gate` or `router` module) for
    a lookahead of `depth` layers; refuses a model or depth it cannot serve,
    before anything is changed."""
    if depth >= len(blocks):
        raise MoeOffloadError(
            f"lookahead={depth} is out of range for this model: it has {len(blocks)} MoE layers, so a layer "
            f"can look at most {len(blocks) - 1} ahead"
        )
    widths = sorted({block.num_experts for block in blocks})
    if len(widths) > 1:
        raise UnsupportedModelError(
            f"router lookahead feeds the prefetch planner, which needs as many experts in every MoE layer; "
            f"this model's MoE layers have {', '.join(map(str, widths))}; patch it without lookahead"
        )
    return RouterLookahead(tuple(_router_of(model, block) for block in blocks), depth)


def _router_of(model: nn.Module, block: ExpertBlock) -> nn.Module:
    if block.layout != "fused":
        raise UnsupportedModelError(
            f"{block.name}: router lookahead is supported for the fused-expert families (Mixtral, Qwen2-MoE, "
            "Qwen3-MoE, DeepSeek-V2/V3, OLMoE, GPT-OSS); patch this model without lookahead"
        )
    parent = model.get_submodule(block.name.rpartition(".")[0])
    for name in ("gate", "router"):
        router = getattr(parent, name, None)
        weight = getattr(router, "weight", None)
        # A bare Linear gives logits only: its top-k rule lives in the
        # block's forward, which lookahead would have to re-implement.
        if (
            isinstance(router, nn.Module)
            and not isinstance(router, nn.Linear)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.shape[0] == block.num_experts
        ):
            return router
    raise UnsupportedModelError(
        f"{block.name}: no router module with a top-k rule found beside the experts (a `gate` or `router` "
        "returning logits, weights and expert ids); patch this model without lookahead"
    )


def summarize(counts: Sequence[Counts], depth: int, layers: int) -> dict[str, object]:
    """`Offloader.stats()["lookahead"]`, from the core's counts. Per pass
    and target layer, P is the set of experts the lookahead predicted and U
    the set the layer used; precision is |P & U| / |P| and recall
    |P & U| / |U|, summed over passes before dividing. Keys (lists indexed
    by distance d - 1, d = 1 .. depth; None where nothing was scored):
    "precision", "recall", "token_overlap" (the share of each token's
    top-k ids that its predicted top-k held), "passes" (passes x target
    layers scored), and "layer_precision" / "layer_recall" (per target
    layer, a list by distance)."""
    totals = [[0] * 6 for _ in range(depth)]
    cells: dict[tuple[int, int], list[int]] = {}
    for distance, layer, *values in counts:
        if 1 <= distance <= depth and 0 <= layer < layers:
            totals[distance - 1] = [a + b for a, b in zip(totals[distance - 1], values, strict=True)]
            cells[distance, layer] = list(values)
    empty = [0] * 6

    def ratio(values: list[int], num: int, den: int) -> float | None:
        return values[num] / values[den] if values[den] else None

    def by_layer(num: int, den: int) -> list[list[float | None]]:
        distances = range(1, depth + 1)
        return [[ratio(cells.get((d, layer), empty), num, den) for d in distances] for layer in range(layers)]

    # Indices into the counts: passes, predicted, used, hits, token_hits, token_ids.
    return {
        "depth": depth,
        "precision": [ratio(t, 3, 1) for t in totals],
        "recall": [ratio(t, 3, 2) for t in totals],
        "token_overlap": [ratio(t, 4, 5) for t in totals],
        "passes": [t[0] for t in totals],
        "layer_precision": by_layer(3, 1),
        "layer_recall": by_layer(3, 2),
    }
