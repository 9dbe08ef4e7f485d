"""The per-layer bridge between a model's forward pass and the core's cache:
fetch the experts a layer needs, wait for exactly the one about to run, and
release them when the layer is done."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from moe_offload._core import ExpertCache
from moe_offload.adapters.base import TensorSpec

SlotViews = dict[str, nn.Parameter]


class SlotPool:
    """The device memory behind the cache's slots: one tensor allocated once,
    owned here (the core borrows its address and keeps it alive)."""

    def __init__(self, device: torch.device, slot_bytes: int, n_slots: int) -> None:
        self.device = device
        self.slot_bytes = slot_bytes
        self.n_slots = n_slots
        self.memory = torch.empty(n_slots * slot_bytes, dtype=torch.uint8, device=device)
        self._views: dict[tuple[TensorSpec, ...], list[SlotViews]] = {}

    def views(self, specs: tuple[TensorSpec, ...]) -> list[SlotViews]:
        """For each slot, its bytes seen as the tensors `specs` describe.
        Built once per distinct layout, so the hot path allocates nothing."""
        if specs not in self._views:
            self._views[specs] = [self._slot_views(slot, specs) for slot in range(self.n_slots)]
        return self._views[specs]

    def _slot_views(self, slot: int, specs: tuple[TensorSpec, ...]) -> SlotViews:
        base = slot * self.slot_bytes
        views = {}
        for spec in specs:
            raw = self.memory[base + spec.offset : base + spec.offset + spec.nbytes]
            views[spec.name] = nn.Parameter(raw.view(spec.dtype).view(spec.shape), requires_grad=False)
        return views


class LayerRuntime:
    """One MoE layer's access to its experts in the cache."""

    def __init__(self, cache: ExpertCache, layer: int, pool: SlotPool, specs: tuple[TensorSpec, ...]) -> None:
        self.cache = cache
        self.layer = layer
        self.device = pool.device
        self.capacity = pool.n_slots
        self.slot_views = pool.views(specs)

    def _stream(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).cuda_stream
        return 0

    def experts(self, experts: list[int]) -> Iterator[tuple[int, SlotViews]]:
        """Yields (expert, its weights) in the given order, each as soon as its
        copy has landed. Works through the list in chunks the pool can pin."""
        stream = self._stream()
        for start in range(0, len(experts), self.capacity):
            chunk = experts[start : start + self.capacity]
            slots = self.cache.fetch(self.layer, chunk)
            try:
                for expert, slot in zip(chunk, slots, strict=True):
                    self.cache.wait(self.layer, expert, stream)
                    yield expert, self.slot_views[slot]
            finally:
                self.cache.release(self.layer, chunk, stream)

    def acquire(self, expert: int) -> SlotViews:
        """Pins one expert and returns its weights once they have landed; pair
        every call with `release`."""
        [slot] = self.cache.fetch(self.layer, [expert])
        try:
            self.cache.wait(self.layer, expert, self._stream())
        except BaseException:
            self.cache.release(self.layer, [expert], self._stream())
            raise
        return self.slot_views[slot]

    def release(self, expert: int) -> None:
        self.cache.release(self.layer, [expert], self._stream())
