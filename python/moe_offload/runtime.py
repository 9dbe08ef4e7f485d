"""The per-layer bridge between a model's forward pass and the core's cache:
place the experts a layer needs (a device slot, or the CPU reading the
expert where it lies in host memory), wait for exactly the one about to run,
and release them when the layer is done; and the gate every forward pass of
a patched model goes through."""

from __future__ import annotations

import ctypes
import functools
import math
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from moe_offload._core import LATER, ON_CPU, ExpertCache, MoeOffloadError
from moe_offload.adapters.base import TensorSpec
from moe_offload.quantization import ExpertCodec, Scratch

if TYPE_CHECKING:
    from moe_offload.lookahead import RouterLookahead

SlotViews = dict[str, nn.Parameter]
_HOST = torch.device("cpu")
# Runs one expert (its index, its weights) on the tokens routed to it.
RunExpert = Callable[[int, SlotViews], None]


def tensor_views(memory: torch.Tensor, base: int, specs: tuple[TensorSpec, ...]) -> SlotViews:
    """The blob at byte `base` of `memory` (uint8) seen as the tensors `specs`
    describe: views, no copy."""
    views = {}
    for spec in specs:
        raw = memory[base + spec.offset : base + spec.offset + spec.nbytes]
        views[spec.name] = nn.Parameter(raw.view(spec.dtype).view(spec.shape), requires_grad=False)
    return views


class HostMemory:
    """The host memory the CPU runs experts from (the host tier, or the host
    cache), seen as one uint8 tensor without a copy; the cache owns it and
    outlives every layer that uses it."""

    def __init__(self, cache: ExpertCache) -> None:
        address, nbytes = cache.host_region
        self._owner = cache  # the memory lives as long as the cache
        self.address = address
        self.memory = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)
        self._views: dict[tuple[int, tuple[TensorSpec, ...]], SlotViews] = {}

    def stacked(self, addresses: list[int], specs: tuple[TensorSpec, ...]) -> SlotViews | None:
        """Every expert of a layer at once, as the model's own stacked
        parameters ([experts, ...] each) viewing the host tier, when the
        experts' blobs lie at `addresses` one fixed stride apart; else None."""
        first, count = addresses[0], len(addresses)
        stride = addresses[1] - first if count > 1 else 1
        if stride <= 0 or any(a != first + i * stride for i, a in enumerate(addresses)):
            return None
        start = first - self.address
        stacked = {}
        for spec in specs:
            size = spec.dtype.itemsize
            if stride % size or spec.offset % size or start % size:
                return None
            typed = self.memory[start : start + count * stride].view(spec.dtype)
            inner = [math.prod(spec.shape[i + 1 :]) for i in range(len(spec.shape))]
            # as_strided counts its offset from the start of the storage.
            offset = typed.storage_offset() + spec.offset // size
            view = typed.as_strided((count, *spec.shape), (stride // size, *inner), offset)
            stacked[spec.name] = nn.Parameter(view, requires_grad=False)
        return stacked

    def views(self, address: int, specs: tuple[TensorSpec, ...]) -> SlotViews:
        """The expert blob at host `address` as tensors; built once per blob
        (an expert of the host tier, or a host cache slot)."""
        key = (address, specs)
        if key not in self._views:
            self._views[key] = tensor_views(self.memory, address - self.address, specs)
        return self._views[key]


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (None: left
    as they are), then put back."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
        return tensor_views(self.memory, slot * self.slot_bytes, specs)


# The coming pass's token rows as (request key, rows) in order, or None.
BatchLayout = Callable[[], Iterable[tuple[Hashable, int]] | None]


class RequestTracker:
    """Which requests the model is serving. A plain batch holds one request
    per sequence, started when a forward pass begins without cached keys and
    values. With a `layout` callable (continuous batching: a pass packs
    several requests' tokens, and requests join and leave between passes),
    each pass's rows go to the requests it names, keyed, until `end_request`.
    Every MoE layer's routing goes to the core (tracing, planning) and, while
    a recording is on, to the recorder."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        self.recorder: TraceRecorder | None = None
        self.layout: BatchLayout | None = None
        # The routers that run ahead on each layer's hidden state (None: off).
        self.lookahead: RouterLookahead | None = None
        # The core takes integer keys; callers name requests by any hashable.
        self._ids: dict[Hashable, int] = {}
        self._next_id = 0
        self._keyed_pass = False
        self._warned = False
        # end_request may come from another thread than the passes.
        self._lock = threading.Lock()

    def begin(self, batch: int) -> None:
        self._keyed_pass = False
        self.cache.begin_requests(batch)
        if self.recorder is not None:
            self.recorder.begin(batch)

    def end(self) -> None:
        self.cache.end_requests()
        if self.recorder is not None:
            self.recorder.begin(0)

    def follow_layout(self, rows: int) -> bool:
        """Asks `layout` for the coming pass of `rows` token rows and has the
        core split its routing so; False when there is no layout for it (the
        caller goes on as for a plain batch)."""
        layout = self.layout() if self.layout is not None else None
        if layout is not None:
            layout = [(key, int(n)) for key, n in layout]
            if sum(n for _, n in layout) == rows:
                self._set_layout(layout)
                return True
            self._warn_mismatch(layout, rows)
        if self._keyed_pass:
            self._keyed_pass = False
            self.cache.clear_layout()
            if self.recorder is not None:
                self.recorder.set_layout(None)
        return False

    def _set_layout(self, layout: list[tuple[Hashable, int]]) -> None:
        with self._lock:
            ids = []
            for key, _ in layout:
                if key not in self._ids:
                    self._ids[key] = self._next_id
                    self._next_id += 1
                ids.append(self._ids[key])
            rows = [n for _, n in layout]
            self.cache.set_layout(ids, rows)
            self._keyed_pass = True
            if self.recorder is not None:
                self.recorder.set_layout(list(zip(ids, rows, strict=True)))

    def _warn_mismatch(self, layout: list[tuple[Hashable, int]], rows: int) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(
            f"moe-offload: the batch layout gives {sum(n for _, n in layout)} token rows to "
            f"{len(layout)} requests but the pass has {rows}; this pass and any other like it is "
            "traced as one request. Return the pass's requests in the order its tokens are packed, "
            "or None for a pass the layout does not describe.",
            RuntimeWarning,
            stacklevel=2,
        )

    def end_request(self, key: Hashable) -> None:
        """The request `key` of a layout finished: its activation matrix
        joins the EAMC."""
        with self._lock:
            if key not in self._ids:
                raise MoeOffloadError(
                    f"request {key!r} is not being traced: no batch layout named it, or it has ended already"
                )
            request = self._ids.pop(key)
            self.cache.end_request(request)
            if self.recorder is not None:
                self.recorder.end_request(request)

    @property
    def live_keys(self) -> list[Hashable]:
        """The layout's requests that have not ended."""
        with self._lock:
            return list(self._ids)

    def observe(self, layer: int, routing: np.ndarray, predicted: np.ndarray | None = None) -> None:
        """Hands the layer's routing (tokens, top_k) to the core, and before
        it the lookahead's `predicted` routing of the layers after it
        (layers, tokens, top_k), so that the plan made after the routing
        uses them."""
        top_k = routing.shape[-1]
        # A pass of no tokens has nothing to look ahead for (nor to route).
        if predicted is not None and predicted.size:
            self.cache.lookahead(layer, predicted.ravel().tolist(), top_k, len(predicted))
        self.cache.observe(layer, routing.ravel().tolist(), top_k)
        if self.recorder is not None:
            self.recorder.observe(layer, routing)


class TraceRecorder:
    """Collects live routing as native trace requests (see `moe_offload.traces`):
    per sequence of a plain batch, or per keyed request of a layout."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.finished: list[np.ndarray] = []
        self._live: list[list[list[np.ndarray]]] = []
        self._keyed: dict[int, list[list[np.ndarray]]] = {}
        self._layout: list[tuple[int, int]] | None = None

    def begin(self, batch: int) -> None:
        self._flush()
        self._layout = None
        self._live = [self._new_request() for _ in range(batch)]

    def set_layout(self, layout: list[tuple[int, int]] | None) -> None:
        """The coming passes' rows, as (request id, rows) in order; None:
        split equally among the plain batch's requests."""
        self._layout = layout
        for request, _ in layout or []:
            self._keyed.setdefault(request, self._new_request())

    def end_request(self, request: int) -> None:
        if request in self._keyed:
            self._finish(self._keyed.pop(request))

    def observe(self, layer: int, routing: np.ndarray) -> None:
        rows = routing.reshape(-1, routing.shape[-1])
        if self._layout is not None:
            start = 0
            for request, n in self._layout:
                if request in self._keyed:
                    self._keyed[request][layer].append(rows[start : start + n])
                start += n
            return
        if not self._live:
            self.begin(1)
        per_request = rows.shape[0] // len(self._live)
        for i, request in enumerate(self._live):
            request[layer].append(rows[i * per_request : (i + 1) * per_request])

    def _new_request(self) -> list[list[np.ndarray]]:
        return [[] for _ in range(self.num_layers)]

    def _finish(self, request: list[list[np.ndarray]]) -> None:
        if request and all(request):
            layers = [np.concatenate(rows) for rows in request]
            tokens = min(len(rows) for rows in layers)
            self.finished.append(np.stack([rows[:tokens] for rows in layers], axis=1).astype(np.int32))

    def _flush(self) -> None:
        for request in self._live:
            self._finish(request)
        self._live = []

    def requests(self) -> list[np.ndarray]:
        """Every request recorded so far, (tokens, layers, top_k) each; keyed
        requests still live are included as far as they got."""
        self._flush()
        for request in self._keyed.values():
            self._finish(request)
        self._keyed = {}
        return self.finished


class LayerRuntime:
    """One MoE layer's access to its experts: device slots through the cache,
    or host memory for the CPU."""

    def __init__(
        self,
        cache: ExpertCache,
        layer: int,
        pool: SlotPool,
        host: HostMemory,
        specs: tuple[TensorSpec, ...],
        tracker: RequestTracker,
        cpu_threads: int | None = None,
        codec: ExpertCodec | None = None,
        scratch: Scratch | None = None,
    ) -> None:
        self.cache = cache
        self.cpu_threads = cpu_threads
        self.codec = codec
        self.scratch = scratch if scratch is not None else Scratch()
        self.tracker = tracker
        self.layer = layer
        self.device = pool.device
        self.capacity = pool.n_slots
        self.slot_views = pool.views(specs)
        self.host = host
        self.specs = specs

    def _usable(self, blob: SlotViews, device: torch.device) -> SlotViews:
        """An expert's weights as the model uses them, from its blob's views
        (on `device`): the views themselves, or dequantized into scratch."""
        if self.codec is None:
            return blob
        return self.codec.decode(blob, self.scratch.for_codec(self.codec, device))

    def observe(self, routing: np.ndarray, predicted: np.ndarray | None = None) -> None:
        """This step's routing at this layer: (tokens, top_k) expert ids; and
        the lookahead's for the layers after it (see `look_ahead`)."""
        self.tracker.observe(self.layer, routing, predicted)

    def look_ahead(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """With router lookahead on, the routing that the next layers'
        routers choose for this layer's router input `hidden_states`, on its
        device (to be copied to the host with this layer's routing); else
        nothing."""
        lookahead = self.tracker.lookahead
        return [] if lookahead is None else lookahead.predict(self.layer, hidden_states)

    def in_place(self, num_experts: int) -> SlotViews | None:
        """The layer's experts as stacked views of the host tier, when the CPU
        runs every one of them where it lies (a CPU device without slots,
        every expert in host memory); else None."""
        if self.capacity > 0 or self.device.type != "cpu" or self.cache.host_slots > 0:
            return None
        addresses = []
        for expert in range(num_experts):
            addresses.append(self.cache.host_acquire(self.layer, expert))
            self.cache.host_release(self.layer, expert)
        return self.host.stacked(addresses, self.specs)

    def run_in_place(
        self, experts: list[int], tokens: list[int], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """Runs the whole layer at once on the CPU (`compute`, over the views
        from `in_place`), booked as `experts` run on the CPU; their host
        bytes are held meanwhile."""
        self.cache.place(self.layer, experts, tokens)
        held = 0
        try:
            for expert in experts:
                self.cache.host_acquire(self.layer, expert)
                held += 1
            with torch_threads(self.cpu_threads):
                started = time.perf_counter()
                output = compute()
                # The whole layer's time: counted, but no single expert's cost.
                self.cache.record_cpu(0, time.perf_counter() - started)
        finally:
            for expert in experts[:held]:
                self.cache.host_release(self.layer, expert)
        return output

    def _stream(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).cuda_stream
        return 0

    def run(self, experts: list[int], tokens: list[int], on_device: RunExpert, on_cpu: RunExpert) -> None:
        """Runs each of `experts` (`tokens[i]` tokens routed to `experts[i]`)
        where the core places it: `on_device` with its slot's weights, or
        `on_cpu` with its weights in host memory. Device work is launched
        first, so on a GPU the hits compute while the CPU runs the misses;
        every slot and host hold is given back on every path."""
        placements = self.cache.place(self.layer, experts, tokens)
        pinned = [e for e, p in zip(experts, placements, strict=True) if p >= 0]
        stream = self._stream()
        # A Ctrl-C landing before the `try` leaves these pinned: the pass
        # gate releases them (see PassGate).
        try:
            for expert, placement in zip(experts, placements, strict=True):
                if placement >= 0:
                    self.cache.wait(self.layer, expert, stream)
                    on_device(expert, self._usable(self.slot_views[placement], self.device))
            for expert, placement, count in zip(experts, placements, tokens, strict=True):
                if placement == ON_CPU:
                    self._run_on_cpu(expert, count, on_cpu)
        finally:
            self.cache.release(self.layer, pinned, stream)
        later = [e for e, p in zip(experts, placements, strict=True) if p == LATER]
        with closing(self.experts(later)) as ready:
            for expert, weights in ready:
                on_device(expert, weights)

    def _run_on_cpu(self, expert: int, tokens: int, run: RunExpert) -> None:
        with self.on_cpu(expert) as weights, torch_threads(self.cpu_threads):
            started = time.perf_counter()
            run(expert, weights)
            self.cache.record_cpu(tokens, time.perf_counter() - started)

    @contextmanager
    def on_cpu(self, expert: int) -> Iterator[SlotViews]:
        """The expert's weights where they lie in host memory, held (not
        evicted from the host cache, not rewritten) for the block."""
        address = self.cache.host_acquire(self.layer, expert)
        try:
            yield self._usable(self.host.views(address, self.specs), _HOST)
        finally:
            self.cache.host_release(self.layer, expert)

    def experts(self, experts: list[int]) -> Iterator[tuple[int, SlotViews]]:
        """Yields (expert, its weights) in the given order, each as soon as its
        copy has landed. Works through the list in chunks the pool can pin."""
        stream = self._stream()
        for start in range(0, len(experts), max(self.capacity, 1)):
            chunk = experts[start : start + self.capacity]
            slots = self.cache.fetch(self.layer, chunk)
            # A Ctrl-C landing before the `try` leaves these pinned: the pass
            # gate releases them (see PassGate).
            try:
                for expert, slot in zip(chunk, slots, strict=True):
                    self.cache.wait(self.layer, expert, stream)
                    yield expert, self._usable(self.slot_views[slot], self.device)
            finally:
                self.cache.release(self.layer, chunk, stream)

    def acquire(self, expert: int, tokens: int) -> tuple[SlotViews, bool]:
        """Places one expert for `tokens` tokens and returns its weights once
        they can be read, and whether they are in host memory (run it on the
        CPU); pair every call with `release(expert, on_cpu)`."""
        [placement] = self.cache.place(self.layer, [expert], [tokens])
        if placement == ON_CPU:
            address = self.cache.host_acquire(self.layer, expert)
            try:
                return self._usable(self.host.views(address, self.specs), _HOST), True
            except BaseException:
                self.cache.host_release(self.layer, expert)
                raise
        if placement == LATER:
            [placement] = self.cache.fetch(self.layer, [expert])
        try:
            self.cache.wait(self.layer, expert, self._stream())
            return self._usable(self.slot_views[placement], self.device), False
        except BaseException:
            self.cache.release(self.layer, [expert], self._stream())
            raise

    def release(self, expert: int, on_cpu: bool) -> None:
        if on_cpu:
            self.cache.host_release(self.layer, expert)
        else:
            self.cache.release(self.layer, [expert], self._stream())


BeforePass = Callable[[nn.Module, tuple, dict], None]


class PassGate:
    """Runs a patched model's forward passes (and `generate` calls) through
    the core's pass gate (`ExpertCache.run_pass`): one pass at a time,
    whichever thread calls (a pass nested in another on the same thread, such
    as an encoder run inside the model's forward, goes straight in), and
    slots that an interrupted pass left held are released when the next one
    starts. Taking and ending a turn happens inside that one core call, so
    no Python exception -- a Ctrl-C lands between any two bytecodes -- can
    leave a turn taken or cut the release short."""

    def __init__(self, cache: ExpertCache, device: torch.device) -> None:
        self.cache = cache
        self.device = device

    def stream(self) -> int:
        """The CUDA stream passes read slots on (0 on the CPU)."""
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def wrap(self, module: nn.Module, name: str, before: BeforePass | None = None) -> GatedMethod:
        """Routes calls of `module.<name>` through this gate, running `before`
        (a forward pre-hook's work) inside the pass."""
        return GatedMethod(self, module, name, before)


class GatedMethod:
    """`module.<name>` replaced by the same call through a `PassGate`;
    `remove()` puts the original back (or, when something has wrapped the
    method since, makes this layer a plain pass-through)."""

    def __init__(self, gate: PassGate, module: nn.Module, name: str, before: BeforePass | None) -> None:
        self.module = module
        self.name = name
        self._gate: PassGate | None = gate
        self._previous = module.__dict__.get(name)
        original = getattr(module, name)
        run = original
        if before is not None:

            def run(*args: Any, **kwargs: Any) -> Any:
                before(module, args, kwargs)
                return original(*args, **kwargs)

        @functools.wraps(original)
        def gated(*args: Any, **kwargs: Any) -> Any:
            gate = self._gate
            if gate is None:
                return original(*args, **kwargs)
            return gate.cache.run_pass(run, args, kwargs, gate.stream())

        self._gated = gated
        module.__dict__[name] = gated

    def remove(self) -> None:
        self._gate = None
        # Dropping our reference to `gated` breaks the cycle through its
        # closure, so the cache and its pool are freed at once, not by the
        # garbage collector.
        gated, self._gated = self._gated, None
        if self.module.__dict__.get(self.name) is gated:
            if self._previous is None:
                del self.module.__dict__[self.name]
            else:
                self.module.__dict__[self.name] = self._previous


class GatedMethods:
    """Several `GatedMethod`s, removed together (one handle of a patch)."""

    def __init__(self, methods: list[GatedMethod]) -> None:
        self.methods = methods

    def remove(self) -> None:
        for method in self.methods:
            method.remove()
