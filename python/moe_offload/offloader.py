"""`patch` / `unpatch` and the `Offloader` object `patch` returns."""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_offload._core import (
    BudgetError,
    ExpertCache,
    ExpertStore,
    MoeOffloadError,
    PatchStateError,
    UnsupportedModelError,
)
from moe_offload.adapters import SUPPORTED_FAMILIES, ExpertBlock, TensorSpec, find_expert_blocks
from moe_offload.progress import progress
from moe_offload.runtime import LayerRuntime, RequestTracker, SlotPool, TraceRecorder
from moe_offload.sizes import format_size, parse_size

log = logging.getLogger("moe_offload")

_ATTR = "_moe_offload_offloader"
SLOT_ALIGN = 4096
POLICIES = ("activation-aware", "lru", "lfu", "reference")


@dataclass(frozen=True)
class StoreBacking:
    """Experts served from an expert store on disk through a host cache of
    `host_slots` slots (`host_budget` bytes), instead of all in host memory."""

    store: ExpertStore
    host_slots: int
    host_budget: int


class Offloader:
    """A patched model's expert cache: statistics and the way back (`unpatch`)."""

    def __init__(
        self,
        model: nn.Module,
        blocks: list[ExpertBlock],
        cache: ExpertCache,
        pool: SlotPool,
        budget_bytes: int,
        policy: str,
        tracker: RequestTracker,
        eamc_path: Path | None,
        backing: StoreBacking | None = None,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.cache = cache
        self.pool = pool
        self.device = pool.device
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.tracker = tracker
        self.eamc_path = eamc_path
        self.backing = backing
        self._hooks: list[Any] = []

    @property
    def n_slots(self) -> int:
        return self.pool.n_slots

    @property
    def slot_bytes(self) -> int:
        return self.pool.slot_bytes

    def stats(self) -> dict[str, Any]:
        """Cache statistics since patching or the last `reset_stats()`."""
        stats: dict[str, Any] = dict(self.cache.stats())
        fetches = stats["hits"] + stats["misses"]
        stats["hit_rate"] = stats["hits"] / fetches if fetches else 0.0
        stats["slots"] = self.n_slots
        stats["slot_bytes"] = self.slot_bytes
        stats["moe_layers"] = len(self.blocks)
        stats["backend"] = self.cache.backend
        host = self.cache.host_stats()
        if host is not None and self.backing is not None:
            stats.update(host)
            stats["host_slots"] = self.backing.host_slots
            stats["host_budget_bytes"] = self.backing.host_budget
        return stats

    def reset_stats(self) -> None:
        self.cache.reset_stats()

    def save_eamc(self, path: str | Path | None = None) -> Path:
        """Writes the EAMC (the activation matrices of finished requests)
        atomically to `path`, by default the `eamc_path` given to `patch`."""
        target = Path(path) if path is not None else self.eamc_path
        if target is None:
            raise MoeOffloadError("no path to save the EAMC to: pass one, or patch(..., eamc_path=...)")
        self.tracker.end()
        self.cache.save_eamc(target)
        return target

    @property
    def eamc_size(self) -> int:
        """Requests in the EAMC."""
        return self.cache.eamc_len

    @contextmanager
    def record_trace(self, path: str | Path) -> Iterator[TraceRecorder]:
        """Records the routing of every request served inside the block and
        writes it to `path` as a native JSONL trace (for `moe-offload replay`)."""
        from moe_offload.traces import Request, Trace, write_trace

        fused = [b for b in self.blocks if b.layout == "fused"]
        if not fused:
            raise MoeOffloadError("routing is traced for fused-expert families only; this model has none")
        recorder = TraceRecorder(len(self.blocks))
        self.tracker.recorder = recorder
        try:
            yield recorder
        finally:
            self.tracker.recorder = None
        requests = [Request(f"request-{i}", r) for i, r in enumerate(recorder.requests())]
        trace = Trace(
            num_layers=len(self.blocks),
            num_experts=self.blocks[0].num_experts,
            top_k=self.blocks[0].top_k,
            source=type(self.model).__name__,
            requests=requests,
        )
        write_trace(path, trace)

    def unpatch(self) -> None:
        unpatch(self.model)

    def __repr__(self) -> str:
        return (
            f"Offloader({len(self.blocks)} MoE layers, {self.n_slots} slots of "
            f"{format_size(self.slot_bytes)} on {self.device}, policy={self.policy!r})"
        )


def patch(
    model: nn.Module,
    device: str | torch.device | None = None,
    device_budget: int | str | None = None,
    *,
    policy: str = "activation-aware",
    eamc_path: str | Path | None = None,
    eamc_capacity: int = 1000,
    prefetch_depth: int | None = None,
    copy_workers: int = 1,
    show_progress: bool | None = None,
) -> Offloader:
    """Offload `model`'s routed experts: their weights move into the core's
    host tier (pinned when `device` is CUDA), every other weight moves to
    `device`, and each MoE layer runs its experts from a fixed pool of device
    slots holding `device_budget` bytes.

    `device` defaults to where the model's non-expert weights are;
    `device_budget` (bytes or a size string like "8GiB") defaults to every
    expert on CPU, and on CUDA to what fits in 90% of free device memory.
    `policy` picks the eviction policy ("activation-aware" prefetches from
    request traces; "lru", "lfu", "reference" fetch on demand). `eamc_path`
    names the EAMC file: loaded now when it exists, saved by
    `offloader.save_eamc()`, at `unpatch` and at interpreter exit.
    Raises `BudgetError` when the budget cannot hold one token's top-k experts
    of one layer, `UnsupportedModelError` when the model has no MoE block moe-offload
    knows, `PatchStateError` when the model is already patched."""
    return _patch(
        model,
        device,
        device_budget,
        policy=policy,
        eamc_path=eamc_path,
        eamc_capacity=eamc_capacity,
        prefetch_depth=prefetch_depth,
        copy_workers=copy_workers,
        show_progress=show_progress,
    )


def _patch(
    model: nn.Module,
    device: str | torch.device | None,
    device_budget: int | str | None,
    *,
    policy: str,
    eamc_path: str | Path | None,
    eamc_capacity: int,
    prefetch_depth: int | None,
    copy_workers: int,
    show_progress: bool | None,
    backing: StoreBacking | None = None,
) -> Offloader:
    """`patch`, with the experts either moved from the model into the host
    tier or, given `backing`, read from an expert store."""
    if getattr(model, _ATTR, None) is not None:
        raise PatchStateError("this model is already patched; call moe_offload.unpatch(model) first")
    if policy not in POLICIES:
        raise MoeOffloadError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    blocks = find_expert_blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE block moe-offload can offload. "
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    target = _resolve_device(model, blocks, device)
    slot_bytes = -(-max(b.expert_bytes for b in blocks) // SLOT_ALIGN) * SLOT_ALIGN
    budget = _budget(
        device_budget,
        blocks,
        slot_bytes,
        target,
        _bytes_to_move(model, blocks, target),
        None if backing is None else backing.host_budget,
    )
    n_slots = min(budget // slot_bytes, sum(b.num_experts for b in blocks))
    pool = SlotPool(target, slot_bytes, n_slots)
    cache = ExpertCache(
        layers=[(b.num_experts, b.expert_bytes) for b in blocks],
        pool_address=pool.memory.data_ptr(),
        pool_owner=pool.memory,
        slot_bytes=slot_bytes,
        n_slots=n_slots,
        device=_core_device(target),
        copy_workers=copy_workers,
        policy=policy,
        budget_bytes=budget,
        eamc_path=None if eamc_path is None else Path(eamc_path),
        eamc_capacity=eamc_capacity,
        prefetch_depth=prefetch_depth,
        store=None if backing is None else backing.store,
        host_slots=0 if backing is None else backing.host_slots,
    )
    tracker = RequestTracker(cache)
    # Block by block, the experts go into the host tier (unless an expert
    # store holds them) and the model's own copies are freed, so memory holds
    # each expert once (plus one block). From the first block on, a failure
    # undoes what was done.
    offloaded: list[ExpertBlock] = []
    total = 0 if backing is not None else sum(b.num_experts * b.expert_bytes for b in blocks)
    try:
        with progress(total, "moving experts to the host tier", show_progress) as bar:
            for layer, block in enumerate(blocks):
                if backing is None:
                    _fill_host_tier(cache, layer, block)
                block.offload(LayerRuntime(cache, layer, pool, block.specs, tracker))
                offloaded.append(block)
                bar.update(block.num_experts * block.expert_bytes if backing is None else 0)
        _move_non_experts(model, target)
        # From a store, the caller loads them once its preloading has read
        # the experts in parallel.
        if backing is None:
            load_every_expert_that_fits(cache, blocks, target)
    except BaseException:
        # A model read from a store had no expert data before: give it none
        # back rather than read a possibly damaged store.
        _restore(cache, offloaded, target, with_values=backing is None)
        raise
    offloader = Offloader(
        model,
        blocks,
        cache,
        pool,
        budget,
        policy,
        tracker,
        None if eamc_path is None else Path(eamc_path),
        backing,
    )
    offloader._hooks.append(_watch_requests(model, tracker))
    if offloader.eamc_path is not None:
        atexit.register(_save_at_exit, weakref.ref(offloader))
    object.__setattr__(model, _ATTR, offloader)
    log.info("moe-offload: %r (host tier pinned: %s)", offloader, cache.host_pinned)
    return offloader


def unpatch(model: nn.Module) -> None:
    """Gives `model` back its ordinary expert parameters (the same parameter
    objects, with identical values, on the device the rest of the model is on)."""
    offloader: Offloader | None = getattr(model, _ATTR, None)
    if offloader is None:
        raise PatchStateError("this model is not patched by moe-offload; there is nothing to unpatch")
    if offloader.eamc_path is not None:
        offloader.save_eamc()
    _undo_patch(model, offloader, with_values=True)


def abandon_patch(model: nn.Module) -> None:
    """Undoes a patch whose loading failed, reading nothing back: the experts
    become meta tensors again, as the model was built."""
    offloader: Offloader = getattr(model, _ATTR)
    _undo_patch(model, offloader, with_values=False)


def _undo_patch(model: nn.Module, offloader: Offloader, with_values: bool) -> None:
    for hook in offloader._hooks:
        hook.remove()
    _restore(offloader.cache, offloader.blocks, offloader.device, with_values)
    object.__delattr__(model, _ATTR)


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def _watch_requests(model: nn.Module, tracker: RequestTracker) -> Any:
    """Starts a new request (one per sequence) whenever the model begins
    one: an encoder-decoder model runs its encoder once per request
    (`generate` calls it on its own, before the decoder steps); a decoder-only
    model starts with a forward pass that has nothing cached yet."""
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else None
    if encoder is not None:
        return encoder.register_forward_pre_hook(_begin_hook(tracker, always=True), with_kwargs=True)
    return model.register_forward_pre_hook(_begin_hook(tracker, always=False), with_kwargs=True)


def _begin_hook(tracker: RequestTracker, always: bool) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        candidates = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None)
        tokens = next((t for t in candidates if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
        if tokens is None:
            return
        # transformers names the key/value cache `past_key_values` or `cache`.
        past = next((kwargs[k] for k in ("past_key_values", "cache") if kwargs.get(k) is not None), None)
        if always or past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0):
            tracker.begin(tokens.shape[0])

    return hook


def _save_at_exit(ref: weakref.ref) -> None:
    offloader = ref()
    if offloader is not None and is_patched(offloader.model):
        try:
            offloader.save_eamc()
        except MoeOffloadError as e:
            log.warning("moe-offload: could not save the EAMC at exit: %s", e)


def _resolve_device(
    model: nn.Module, blocks: list[ExpertBlock], device: str | torch.device | None
) -> torch.device:
    if device is None:
        expert_params = {id(p) for b in blocks for p in b.parameters()}
        others = [p.device for p in model.parameters() if id(p) not in expert_params and not p.is_meta]
        target = others[0] if others else torch.device("cpu")
    else:
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise MoeOffloadError(f"device={device!r} is not a device: {e}") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise MoeOffloadError(f"device={str(target)!r} was asked for but torch sees no CUDA device")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
    elif target.type != "cpu":
        raise MoeOffloadError(f"device={str(target)!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return target


def _core_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"cuda:{device.index}"


def _bytes_to_move(model: nn.Module, blocks: list[ExpertBlock], device: torch.device) -> int:
    """Bytes of the weights other than routed experts that are not on
    `device` yet (data-less ones included: they will be loaded there)."""
    experts = {id(p) for b in blocks for p in b.parameters()}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in experts}
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device != device)


def _budget(
    device_budget: int | str | None,
    blocks: list[ExpertBlock],
    slot_bytes: int,
    device: torch.device,
    still_to_move: int,
    host_budget: int | None,
) -> int:
    """The device budget in bytes, checked against one token's needs. The
    default on CUDA leaves room for the other weights still to be moved
    there, and a tenth of what remains for activations and caches. On the
    CPU the device slots are host memory too: every expert when the model's
    experts are in host memory anyway, a quarter of `host_budget` when they
    come from a store (so memory stays near the host budget)."""
    top_k = max(b.top_k for b in blocks)
    minimum = top_k * slot_bytes
    everything = sum(b.num_experts for b in blocks) * slot_bytes
    if device_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(minimum, min(everything, int((free - still_to_move) * 0.9)))
        if host_budget is not None:
            return max(minimum, min(everything, host_budget // 4))
        return everything
    budget = parse_size(device_budget, "device_budget")
    if budget < minimum:
        raise BudgetError(
            f"device_budget={format_size(budget)} ({budget} bytes) is below the minimum of "
            f"{format_size(minimum)} ({minimum} bytes): one token needs its top-{top_k} experts of one MoE "
            f"layer on the device at once, {format_size(slot_bytes)} each. Raise device_budget to at least "
            f"{minimum} bytes."
        )
    return budget


def load_every_expert_that_fits(cache: ExpertCache, blocks: list[ExpertBlock], device: torch.device) -> None:
    """When the budget holds every expert, copies them all now, so that no
    forward pass waits for one; otherwise leaves the slots to demand."""
    if cache.n_slots < sum(b.num_experts for b in blocks):
        return
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    for layer, block in enumerate(blocks):
        experts = list(range(block.num_experts))
        cache.fetch(layer, experts)
        for expert in experts:
            cache.wait(layer, expert, stream)
        cache.release(layer, experts, stream)
    cache.reset_stats()


def _fill_host_tier(cache: ExpertCache, layer: int, block: ExpertBlock) -> None:
    for expert in range(block.num_experts):
        for spec, tensor in block.expert_tensors(expert):
            host = _host_copy(block, spec, tensor)
            cache.write_expert(layer, expert, spec.offset, host.data_ptr(), spec.nbytes)


def _host_copy(block: ExpertBlock, spec: TensorSpec, tensor: torch.Tensor) -> torch.Tensor:
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise UnsupportedModelError(
            f"{block.name}: expert tensor {spec.name} is {tuple(tensor.shape)} {tensor.dtype}, "
            f"expected {spec.shape} {spec.dtype} like the first expert"
        )
    if tensor.is_meta:
        raise MoeOffloadError(
            f"{block.name}: expert tensor {spec.name} has no data (meta device); load the weights first"
        )
    return tensor.detach().to("cpu").contiguous()


def _move_non_experts(model: nn.Module, device: torch.device) -> None:
    """Moves every parameter and buffer that still holds data to `device`;
    offloaded experts are meta placeholders by now and stay put."""
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and not param.is_meta and param.device != device:
                    param.data = param.data.to(device)
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta and buffer.device != device:
                    module._buffers[name] = buffer.to(device)


def _restore(
    cache: ExpertCache, blocks: list[ExpertBlock], device: torch.device, with_values: bool = True
) -> None:
    """Ordinary expert parameters again, holding the cache's values (or, with
    `with_values` false, none: meta tensors, as a model built without weights)."""
    # Last offloaded first: blocks may share state (one config for every
    # layer), and undoing in reverse leaves what was there before the first.
    for layer, block in reversed(list(enumerate(blocks))):
        tensors: dict[str, torch.Tensor] = {}
        for spec in block.specs:
            shape = (block.num_experts, *spec.shape)
            if not with_values:
                tensors[spec.name] = torch.empty(shape, dtype=spec.dtype, device="meta")
                continue
            stacked = torch.empty(shape, dtype=spec.dtype)
            for expert in range(block.num_experts):
                cache.read_expert(layer, expert, spec.offset, stacked[expert].data_ptr(), spec.nbytes)
            tensors[spec.name] = stacked.to(device)
        block.restore(tensors)
