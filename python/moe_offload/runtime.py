"""The per-layer bridge between a model's forward pass and the core's cache:
fetch the experts a layer needs, wait for exactly the one about to run, and
release them when the layer is done."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
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


class RequestTracker:
    """Which requests the model is serving: one per sequence of the batch,
    started when a forward pass begins without cached keys and values. Every
    MoE layer's routing goes to the core (tracing, planning) and, while a
    recording is on, to the recorder."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        self.recorder: TraceRecorder | None = None

    def begin(self, batch: int) -> None:
        self.cache.begin_requests(batch)
        if self.recorder is not None:
            self.recorder.begin(batch)

    def end(self) -> None:
        self.cache.end_requests()
        if self.recorder is not None:
            self.recorder.begin(0)

    def observe(self, layer: int, routing: np.ndarray) -> None:
        top_k = routing.shape[-1]
        self.cache.observe(layer, routing.ravel().tolist(), top_k)
        if self.recorder is not None:
            self.recorder.observe(layer, routing)


class TraceRecorder:
    """Collects live routing as native trace requests (see `moe_offload.traces`)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.finished: list[np.ndarray] = []
        self._live: list[list[list[np.ndarray]]] = []

    def begin(self, batch: int) -> None:
        self._flush()
        self._live = [[[] for _ in range(self.num_layers)] for _ in range(batch)]

    def observe(self, layer: int, routing: np.ndarray) -> None:
        if not self._live:
            self.begin(1)
        rows = routing.reshape(-1, routing.shape[-1])
        per_request = rows.shape[0] // len(self._live)
        for i, request in enumerate(self._live):
            request[layer].append(rows[i * per_request : (i + 1) * per_request])

    def _flush(self) -> None:
        for request in self._live:
            if request and all(request):
                layers = [np.concatenate(rows) for rows in request]
                tokens = min(len(rows) for rows in layers)
                self.finished.append(np.stack([rows[:tokens] for rows in layers], axis=1).astype(np.int32))
        self._live = []

    def requests(self) -> list[np.ndarray]:
        """Every request recorded so far, (tokens, layers, top_k) each."""
        self._flush()
        return self.finished


class LayerRuntime:
    """One MoE layer's access to its experts in the cache."""

    def __init__(
        self,
        cache: ExpertCache,
        layer: int,
        pool: SlotPool,
        specs: tuple[TensorSpec, ...],
        tracker: RequestTracker,
    ) -> None:
        self.cache = cache
        self.tracker = tracker
        self.layer = layer
        self.device = pool.device
        self.capacity = pool.n_slots
        self.slot_views = pool.views(specs)

    def observe(self, routing: np.ndarray) -> None:
        """This step's routing at this layer: (tokens, top_k) expert ids."""
        self.tracker.observe(self.layer, routing)

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
