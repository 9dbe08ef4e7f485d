"""Router replay: run a model while forcing every MoE layer's top-k choice
from a recorded trace, so that expert sizes, tensor shapes and activation
patterns are all those of the real model.

Each fused experts module is called as `experts(hidden_states, top_k_index,
top_k_weights)`; a forward pre-hook replaces the index with the trace's
next rows for that layer (one row per token of the forward pass) and keeps
the router's weights, so the plain and the patched model run the same
arithmetic on the same forced routing.

`RouterReplay` replays one request at a time (a pass's rows are that
request's next tokens); `BatchRouterReplay` replays under continuous
batching, where one pass packs several requests' tokens: the batch's layout
says which rows are whose, and each request follows a trace request of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_offload._core import MoeOffloadError
from moe_offload.adapters import find_expert_blocks


class RouterReplay:
    def __init__(self, model: nn.Module) -> None:
        self.blocks = [b for b in find_expert_blocks(model) if b.layout == "fused"]
        if not self.blocks:
            raise MoeOffloadError(
                f"{type(model).__name__} has no fused MoE layer whose routing can be forced"
            )
        self.routing: np.ndarray | None = None
        self.cursor = [0] * len(self.blocks)
        self._hooks = [
            block.module.register_forward_pre_hook(self._hook(layer))
            for layer, block in enumerate(self.blocks)
        ]

    def check(self, layers: int, experts: int, top_k: int) -> None:
        """Refuses routing that this model cannot run."""
        model = (len(self.blocks), self.blocks[0].num_experts, self.blocks[0].top_k)
        if layers < model[0] or experts > model[1] or top_k != model[2]:
            raise MoeOffloadError(
                f"the trace routes {layers} MoE layers over {experts} experts, top-{top_k}; the model has "
                f"{model[0]} MoE layers of {model[1]} experts, top-{model[2]}: choose a matching shape"
            )

    def start(self, routing: np.ndarray) -> None:
        """A new request: `routing[t, l]` = token t's experts at MoE layer l."""
        self.routing = routing
        self.cursor = [0] * len(self.blocks)

    def _forced_rows(self, layer: int, rows: int) -> np.ndarray | None:
        """The experts the next `rows` tokens of this pass take at MoE layer
        `layer`, or None to leave the router's choice."""
        if self.routing is None:
            return None
        start = self.cursor[layer]
        forced = self.routing[start : start + rows, layer]
        if forced.shape[0] != rows:
            raise MoeOffloadError(
                f"the replayed request has {self.routing.shape[0]} tokens; the model asked for more"
            )
        self.cursor[layer] = start + rows
        return forced

    def _hook(self, layer: int) -> Any:
        def force(module: nn.Module, args: tuple) -> tuple:
            hidden, index, weights = args[:3]
            rows = self._forced_rows(layer, index.shape[0])
            if rows is None:
                return args
            forced = torch.as_tensor(rows.astype(np.int64), device=index.device).to(index.dtype)
            return (hidden, forced, weights, *args[3:])

        return force

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class BatchRouterReplay(RouterReplay):
    """Router replay under continuous batching. `layout()` gives the pass
    about to run as [(request key, rows)] in row order (None: a pass that is
    not the batch's, left to the router); each new key takes the next of
    `routings` (round robin) and its rows follow that routing's tokens."""

    def __init__(
        self,
        model: nn.Module,
        routings: list[np.ndarray],
        layout: Callable[[], list[tuple[str, int]] | None],
    ) -> None:
        super().__init__(model)
        if not routings:
            raise MoeOffloadError("router replay under batching needs at least one trace request")
        self.routings = routings
        self.layout = layout
        self.assigned: dict[str, tuple[np.ndarray, list[int]]] = {}  # key: (routing, cursor per layer)
        self._next = itertools.count()
        self.forced_passes = 0

    def _request(self, key: str) -> tuple[np.ndarray, list[int]]:
        if key not in self.assigned:
            routing = self.routings[next(self._next) % len(self.routings)]
            self.assigned[key] = (routing, [0] * len(self.blocks))
        return self.assigned[key]

    def _forced_rows(self, layer: int, rows: int) -> np.ndarray | None:
        layout = self.layout()
        if layout is None:
            return None
        if sum(n for _, n in layout) != rows:
            raise MoeOffloadError(
                f"the batch layout gives {sum(n for _, n in layout)} token rows; the pass has {rows}"
            )
        parts = []
        for key, n in layout:
            routing, cursor = self._request(key)
            part = routing[cursor[layer] : cursor[layer] + n, layer]
            if part.shape[0] != n:
                raise MoeOffloadError(
                    f"request {key!r} outgrew its replayed trace request of {routing.shape[0]} tokens: "
                    "use trace requests at least as long as prompt plus new tokens"
                )
            cursor[layer] += n
            parts.append(part)
        if layer == 0:
            self.forced_passes += 1
        return np.concatenate(parts)
