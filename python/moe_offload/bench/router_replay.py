"""Router replay: run a model while forcing every MoE layer's top-k choice
from a recorded trace, so that expert sizes, tensor shapes and activation
patterns are all those of the real model.

Each fused experts module is called as `experts(hidden_states, top_k_index,
top_k_weights)`; a forward pre-hook replaces the index with the trace's
next rows for that layer (one row per token of the forward pass) and keeps
the router's weights, so the plain and the patched model run the same
arithmetic on the same forced routing.
"""

from __future__ import annotations

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

    def _hook(self, layer: int) -> Any:
        def force(module: nn.Module, args: tuple) -> tuple:
            hidden, index, weights = args[:3]
            if self.routing is None:
                return args
            start = self.cursor[layer]
            rows = self.routing[start : start + index.shape[0], layer]
            if rows.shape[0] != index.shape[0]:
                raise MoeOffloadError(
                    f"the replayed request has {self.routing.shape[0]} tokens; the model asked for more"
                )
            self.cursor[layer] = start + index.shape[0]
            forced = torch.as_tensor(rows.astype(np.int64), device=index.device).to(index.dtype)
            return (hidden, forced, weights, *args[3:])

        return force

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
