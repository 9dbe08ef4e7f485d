"""`patch` / `unpatch` and the `Offloader` object `patch` returns."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_offload import lookahead as router_lookahead
from moe_offload._core import (
    MAX_EAMC_CAPACITY,
    BudgetError,
    DeviceError,
    ExpertCache,
    ExpertStore,
    MoeOffloadError,
    PatchStateError,
    UnsupportedModelError,
    max_eamc_capacity,
)
from moe_offload.adapters import SUPPORTED_FAMILIES, ExpertBlock, TensorSpec, find_expert_blocks
from moe_offload.progress import progress
from moe_offload.quantization import Quantization, Scratch
from moe_offload.runtime import (
    BatchLayout,
    GatedMethods,
    HostMemory,
    LayerRuntime,
    PassGate,
    RequestTracker,
    SlotPool,
    TraceRecorder,
)
from moe_offload.sizes import format_size, parse_size

log = logging.getLogger("moe_offload")

_ATTR = "_moe_offload_offloader"
SLOT_ALIGN = 4096
POLICIES = ("activation-aware", "lru", "lfu", "reference")
CPU_EXPERTS = ("auto", "never", "always")
# Copy workers (and from_pretrained's I/O workers) are threads; more than
# this many only contend for the same memory bus and disk.
MAX_WORKERS = 256
# Prefetches queued per plan: more than any model has experts.
MAX_PREFETCH_DEPTH = 1 << 16
# Tokens of the "many tokens" calibration run (see `calibrate_cpu`): where an
# expert's CPU time is arithmetic rather than reading its weights.
CALIBRATION_TOKENS = 32


@dataclass(frozen=True)
class StoreBacking:
    """Experts served from an expert store on disk through a host cache of
    `host_slots` slots (`host_budget` bytes), instead of all in host memory."""

    store: ExpertStore
    host_slots: int
    host_budget: int


_UNPATCHED = (
    "the model was unpatched, and this offloader's cache with it; patch the model again for a new one"
)


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
        host: HostMemory,
        backing: StoreBacking | None = None,
        quantization: Quantization | None = None,
        lookahead: int = 0,
    ) -> None:
        self.model = model
        self.quantization = quantization
        self.lookahead = lookahead
        self.cpu_experts = cache.cpu_experts
        self._host: HostMemory | None = host
        self.blocks = blocks
        self._cache: ExpertCache | None = cache
        self._pool: SlotPool | None = pool
        self._tracker: RequestTracker | None = tracker
        self.device = pool.device
        self.n_slots = pool.n_slots
        self.slot_bytes = pool.slot_bytes
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.eamc_path = eamc_path
        self.backing = backing
        self._hooks: list[Any] = []

    @property
    def cache(self) -> ExpertCache:
        if self._cache is None:
            raise PatchStateError(_UNPATCHED)
        return self._cache

    @property
    def pool(self) -> SlotPool:
        if self._pool is None:
            raise PatchStateError(_UNPATCHED)
        return self._pool

    @property
    def host(self) -> HostMemory:
        if self._host is None:
            raise PatchStateError(_UNPATCHED)
        return self._host

    @property
    def tracker(self) -> RequestTracker:
        if self._tracker is None:
            raise PatchStateError(_UNPATCHED)
        return self._tracker

    def _close(self) -> None:
        """Lets go of the cache (its host tier and copy workers) and the slot
        pool: after `unpatch`, nothing but this object refers to them."""
        self._cache = self._pool = self._tracker = self._host = None

    def stats(self) -> dict[str, Any]:
        """Cache statistics since patching or the last `reset_stats()`.
        "lookahead" is None without router lookahead; with it, how its
        predictions compared with the routing, per distance and target
        layer (see `moe_offload.lookahead.summarize` for the keys)."""
        stats: dict[str, Any] = dict(self.cache.stats())
        fetches = stats["hits"] + stats["misses"]
        stats["hit_rate"] = stats["hits"] / fetches if fetches else 0.0
        # The per-miss split: every miss was either copied or run on the CPU.
        stats["misses_copied"] = stats["misses"] - stats["cpu_experts"]
        stats["slots"] = self.n_slots
        stats["slot_bytes"] = self.slot_bytes
        stats["moe_layers"] = len(self.blocks)
        stats["expert_bytes"] = max(b.expert_bytes for b in self.blocks)
        stats["quantization"] = None if self.quantization is None else self.quantization.name
        stats["backend"] = self.cache.backend
        stats["lookahead"] = (
            router_lookahead.summarize(self.cache.lookahead_counts(), self.lookahead, len(self.blocks))
            if self.lookahead
            else None
        )
        host = self.cache.host_stats()
        if host is not None and self.backing is not None:
            stats.update(host)
            stats["host_slots"] = self.backing.host_slots
            stats["host_budget_bytes"] = self.backing.host_budget
        return stats

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        if self.lookahead:
            self.cache.reset_lookahead_counts()

    def save_eamc(self, path: str | Path | None = None) -> Path:
        """Writes the EAMC (the activation matrices of finished requests, and
        the planner's layer-to-layer co-activation tables) atomically to
        `path`, by default the `eamc_path` given to `patch`."""
        # Passed on as given: Path("") would turn an empty path into ".".
        target = path if path is not None else self.eamc_path
        if target is None:
            raise MoeOffloadError("no path to save the EAMC to: pass one, or patch(..., eamc_path=...)")
        self.tracker.end()
        self.cache.save_eamc(target)
        return Path(target)

    @property
    def eamc_size(self) -> int:
        """Requests in the EAMC."""
        return self.cache.eamc_len

    def track_requests(self, layout: BatchLayout | None) -> None:
        """Traces requests by `layout`, a callable that returns the coming
        forward pass's token rows as ``[(request_key, rows), ...]`` in the
        order they are packed (continuous batching: several requests' tokens
        in one pass, requests joining and leaving between passes), or None
        for a pass it does not describe (traced as a plain batch). It is
        called at the start of every forward pass, on the pass's thread. A
        key seen for the first time begins a request; `end_request(key)`
        ends it. None stops following a layout."""
        self.tracker.layout = layout

    def end_request(self, key: Hashable) -> None:
        """The request `key` of `track_requests`'s layout finished: its
        activation matrix joins the EAMC. Call it once no later pass will
        hold the request's tokens."""
        self.tracker.end_request(key)

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
            f"{format_size(self.slot_bytes)} on {self.device}, policy={self.policy!r}, "
            f"cpu_experts={self.cpu_experts!r})"
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
    cpu_experts: str = "auto",
    cpu_threads: int | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    lookahead: int = 0,
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
    `eamc_capacity` is the number of requests the EAMC keeps, `prefetch_depth`
    the prefetches queued per plan (None: the default), `copy_workers` the
    threads copying experts into slots. `quantize` ("int8", "int4" or "fp8")
    keeps every expert matrix quantized in the host tier and the slots
    (weight-only: int8/int4 with one scale per `group_size` input features,
    default 128; fp8 with one per 128 x 128 block; see
    `moe_offload.quantization`), dequantized just before it runs.
    `lookahead` (0 to 16, default 0: off; fused-expert families) runs the
    routers of the next `lookahead` MoE layers on each MoE layer's hidden
    state, one small matmul each on the device, and feeds their choices to
    the prefetch planner; `stats()["lookahead"]` reports how often they were
    right. `show_progress` shows a progress bar while the experts move (None: only
    when stderr is a terminal).

    While patched, the model refuses `.to()`, `.cuda()`, `.half()` and the
    like, and `save_pretrained`, with `PatchStateError` (unpatch first);
    a move or cast that changes nothing is allowed.
    Raises `BudgetError` when the budget cannot hold one token's top-k experts
    of one layer, `UnsupportedModelError` when the model has no MoE block moe-offload
    knows, `PatchStateError` when the model is already patched, `DeviceError`
    for a device this machine does not have, `MoeOffloadError` naming the
    argument for any other argument out of range."""
    return _patch(
        model,
        device,
        device_budget,
        policy=policy,
        eamc_path=eamc_path,
        eamc_capacity=eamc_capacity,
        prefetch_depth=prefetch_depth,
        copy_workers=copy_workers,
        cpu_experts=cpu_experts,
        cpu_threads=cpu_threads,
        scheme=Quantization.parse(quantize, group_size),
        lookahead=lookahead,
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
    cpu_experts: str,
    cpu_threads: int | None,
    show_progress: bool | None,
    scheme: Quantization | None = None,
    backing: StoreBacking | None = None,
    lookahead: int = 0,
) -> Offloader:
    """`patch`, with the experts either moved from the model into the host
    tier or, given `backing`, read from an expert store; their blobs
    quantized with `scheme` (a store's must be so already)."""
    if getattr(model, _ATTR, None) is not None:
        raise PatchStateError("this model is already patched; call moe_offload.unpatch(model) first")
    check_arguments(
        device_budget=device_budget,
        policy=policy,
        eamc_path=eamc_path,
        eamc_capacity=eamc_capacity,
        prefetch_depth=prefetch_depth,
        copy_workers=copy_workers,
        cpu_experts=cpu_experts,
        cpu_threads=cpu_threads,
        lookahead=lookahead,
        show_progress=show_progress,
    )
    blocks = find_expert_blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE block moe-offload can offload. "
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    routers = router_lookahead.find_routers(model, blocks, lookahead) if lookahead else None
    held = next((b.codec.scheme for b in blocks if b.blob_is_parameters and b.codec is not None), None)
    if scheme is not None and held is not None:
        raise MoeOffloadError(
            f"the model already holds its experts quantized ({held.name}); patch it without quantize"
        )
    if scheme is not None:
        for block in blocks:
            block.quantize(scheme)
    scheme = scheme or held
    check_eamc_fits(
        eamc_capacity, len(blocks), max(b.num_experts for b in blocks), f"eamc_capacity={eamc_capacity}"
    )
    target = resolve_device(_default_device(model, blocks) if device is None else device)
    slot_bytes = -(-max(b.expert_bytes for b in blocks) // SLOT_ALIGN) * SLOT_ALIGN
    budget = _budget(
        None if device_budget is None else parse_size(device_budget, "device_budget"),
        blocks,
        slot_bytes,
        target,
        _bytes_to_move(model, blocks, target),
        None if backing is None else backing.host_budget,
        cpu_experts,
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
        cpu_experts=cpu_experts,
    )
    tracker = RequestTracker(cache)
    tracker.lookahead = routers
    host = HostMemory(cache)
    scratch = Scratch()
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
                runtime = LayerRuntime(
                    cache, layer, pool, host, block.specs, tracker, cpu_threads, block.codec, scratch
                )
                block.offload(runtime)
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
        values = _read_back(cache, offloaded, with_values=backing is None)
        with _interrupts_deferred():
            _swap_in(offloaded, values)
            values.clear()
            _move_experts(offloaded, target)
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
        host,
        backing,
        scheme,
        lookahead,
    )
    if backing is None and places_by_cost(offloader):
        calibrate_cpu(offloader)
    offloader._hooks.append(_watch_requests(model, tracker, target))
    if offloader.eamc_path is not None:
        atexit.register(_save_at_exit, weakref.ref(offloader))
    _guard(model, blocks)
    object.__setattr__(model, _ATTR, offloader)
    log.info("moe-offload: %r (host tier pinned: %s)", offloader, cache.host_pinned)
    return offloader


def unpatch(model: nn.Module) -> None:
    """Gives `model` back its ordinary expert parameters (the same parameter
    objects, with identical values, on the device the rest of the model is on).

    All or nothing: if reading the experts back fails, the model stays
    patched and working, and `unpatch` can be called again. The EAMC is
    saved first when the patch has an `eamc_path`; failing to save it is a
    warning, not an error (`offloader.save_eamc()` raises instead)."""
    offloader: Offloader | None = getattr(model, _ATTR, None)
    if offloader is None:
        raise PatchStateError("this model is not patched by moe-offload; there is nothing to unpatch")
    if offloader.eamc_path is not None:
        _save_eamc_or_warn(offloader, "at unpatch")
    _undo_patch(model, offloader, with_values=True)


def abandon_patch(model: nn.Module) -> None:
    """Undoes a patch whose loading failed, reading nothing back: the experts
    become meta tensors again, as the model was built."""
    offloader: Offloader = getattr(model, _ATTR)
    _undo_patch(model, offloader, with_values=False)


def _undo_patch(model: nn.Module, offloader: Offloader, with_values: bool) -> None:
    """Reads every expert back into host memory (a failure there changes
    nothing); then, with Ctrl-C held back, swaps them in, removes the hooks,
    the guard and the mark, frees the cache and the slot pool, and only then
    moves the experts to the device, so that device memory never holds the
    slots and every expert at once."""
    values = _read_back(offloader.cache, offloader.blocks, with_values)
    with _interrupts_deferred():
        _remove_hooks(offloader)
        _swap_in(offloader.blocks, values)
        values.clear()  # the parameters hold the host copies now, and nothing else
        _unguard(model)
        object.__delattr__(model, _ATTR)
        _free_cache(offloader)
        try:
            _move_experts(offloader.blocks, offloader.device)
        except (RuntimeError, MemoryError) as e:
            raise DeviceError(
                f"the model is unpatched, but moving its experts to {offloader.device} failed ({e}); they "
                f"are in host memory: free device memory, then call model.to({str(offloader.device)!r})"
            ) from e


def _remove_hooks(offloader: Offloader) -> None:
    for hook in offloader._hooks:
        hook.remove()
    offloader._hooks.clear()


def _free_cache(offloader: Offloader) -> None:
    """Drops the offloader's cache and slot pool. The cache keeps the pool's
    memory alive, so while that memory lives the cache does: when a reference
    cycle (a hook's closure) still holds it, collect the cycle now."""
    pool_memory = weakref.ref(offloader.pool.memory)
    offloader._close()
    if pool_memory() is not None:
        gc.collect()


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def _watch_requests(model: nn.Module, tracker: RequestTracker, device: torch.device) -> GatedMethods:
    """Runs the model's forward passes and `generate` calls one at a time
    through a `PassGate` (threads sharing the model take turns; slots that an
    interrupted pass left held are released), and starts a new request (one
    per sequence) whenever the model begins one: an encoder-decoder model
    runs its encoder once per request (`generate` calls it on its own, before
    the decoder steps); a decoder-only model starts with a forward pass that
    has nothing cached yet, unless a batch layout (`track_requests`) names
    each pass's requests. The encoder is gated too, since `generate` calls
    it outside the model's forward."""
    gate = PassGate(tracker.cache, device)
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else None
    methods = [gate.wrap(model, "generate")] if callable(getattr(model, "generate", None)) else []
    if encoder is not None:
        methods.append(gate.wrap(model, "forward"))
        methods.append(gate.wrap(encoder, "forward", before=_begin_hook(tracker, always=True)))
    else:
        methods.append(gate.wrap(model, "forward", before=_begin_hook(tracker, always=False)))
    return GatedMethods(methods)


def _begin_hook(tracker: RequestTracker, always: bool) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        candidates = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None)
        tokens = next((t for t in candidates if isinstance(t, torch.Tensor) and t.dim() >= 2), None)
        if tokens is None:
            return
        # Inside the gate, so the layout read is the pass about to run: a
        # packed (1, total) batch of several requests' tokens, or none.
        if not always and tracker.follow_layout(tokens.shape[0] * tokens.shape[1]):
            return
        # transformers names the key/value cache `past_key_values` or `cache`.
        past = next((kwargs[k] for k in ("past_key_values", "cache") if kwargs.get(k) is not None), None)
        if always or past is None or (hasattr(past, "get_seq_length") and past.get_seq_length() == 0):
            tracker.begin(tokens.shape[0])

    return hook


def _save_at_exit(ref: weakref.ref) -> None:
    offloader = ref()
    if offloader is not None and is_patched(offloader.model):
        _save_eamc_or_warn(offloader, "at exit")


def _save_eamc_or_warn(offloader: Offloader, when: str) -> None:
    """Saves the EAMC; failing to is a warning: what it learned is lost, but
    the model must still be unpatched (and the interpreter exit) cleanly."""
    try:
        offloader.save_eamc()
    except (MoeOffloadError, OSError) as e:
        warnings.warn(
            f"moe-offload: could not save the EAMC {when} to {offloader.eamc_path}: {e}. What it learned "
            "is lost; choose a writable eamc_path, or call offloader.save_eamc(path) before unpatching.",
            RuntimeWarning,
            stacklevel=3,
        )


def _default_device(model: nn.Module, blocks: list[ExpertBlock]) -> torch.device:
    """Where the model's non-expert weights are (the CPU when none holds data)."""
    expert_params = {id(p) for b in blocks for p in b.parameters()}
    others = [p.device for p in model.parameters() if id(p) not in expert_params and not p.is_meta]
    return others[0] if others else torch.device("cpu")


def resolve_device(device: str | torch.device, option: str = "device") -> torch.device:
    """`device` as a torch device with its index, if this machine has it:
    "cpu" or "cuda[:N]"; else a `DeviceError` saying what to use instead.
    `patch`, `from_pretrained` and the commands (`option="--device"`) all
    resolve their device here."""
    command = option.startswith("--")
    asked = f"{option} {device}" if command else f"{option}={str(device)!r}"
    use = "use cpu, cuda or cuda:N" if command else "use 'cpu' or 'cuda[:N]'"
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{asked} is not a device; {use}") from None
    if target.type == "cpu":
        return target
    if target.type != "cuda":
        raise DeviceError(f"{asked} is not supported; {use}")
    if not torch.cuda.is_available():
        cpu = f"{option} cpu" if command else f"{option}='cpu'"
        raise DeviceError(
            f"{asked} was asked for but torch sees no CUDA device (no GPU, no driver, or a "
            f"CPU-only torch {torch.__version__}); use {cpu}"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if target.index is None else target.index
    if index >= count:
        raise DeviceError(
            f"{asked} does not exist: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def check_arguments(
    *,
    device_budget: int | str | None = None,
    host_budget: int | str | None = None,
    policy: str = POLICIES[0],
    eamc_path: str | Path | None = None,
    eamc_capacity: int = 1,
    prefetch_depth: int | None = None,
    copy_workers: int = 1,
    io_workers: int = 1,
    cpu_experts: str = CPU_EXPERTS[0],
    cpu_threads: int | None = None,
    lookahead: int = 0,
    show_progress: bool | None = None,
) -> None:
    """Checks the arguments `patch` and `from_pretrained` share, before
    anything is allocated: each error names the argument and the fix."""
    for name, size in (("device_budget", device_budget), ("host_budget", host_budget)):
        if size is not None:
            parse_size(size, name)
    if not isinstance(policy, str) or policy not in POLICIES:
        raise MoeOffloadError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not isinstance(cpu_experts, str) or cpu_experts not in CPU_EXPERTS:
        raise MoeOffloadError(
            f"cpu_experts={cpu_experts!r}: choose 'auto' (decide per miss from measured costs), 'never' "
            "(copy every miss to the device) or 'always' (run every miss on the CPU)"
        )
    if eamc_path is not None and not isinstance(eamc_path, (str, os.PathLike)):
        raise MoeOffloadError(f"eamc_path={eamc_path!r} is not a path; pass a str or a pathlib.Path")
    _check_count(
        "eamc_capacity",
        eamc_capacity,
        1,
        MAX_EAMC_CAPACITY,
        "the number of requests the EAMC keeps (default 1000)",
    )
    if prefetch_depth is not None:
        _check_count(
            "prefetch_depth", prefetch_depth, 0, MAX_PREFETCH_DEPTH, "prefetches per plan (default 8)"
        )
    _check_count("copy_workers", copy_workers, 1, MAX_WORKERS, "copy threads (default 1)")
    if cpu_threads is not None:
        meaning = "torch threads for experts run on the CPU (default None: torch's)"
        _check_count("cpu_threads", cpu_threads, 1, MAX_WORKERS, meaning)
    _check_count("io_workers", io_workers, 1, MAX_WORKERS, "threads reading experts from disk (default 8)")
    _check_count("lookahead", lookahead, 0, router_lookahead.MAX_LOOKAHEAD, router_lookahead.MEANING)
    if show_progress is not None and not isinstance(show_progress, bool):
        raise MoeOffloadError(
            f"show_progress={show_progress!r}: pass True, False, or None (a bar only on a terminal)"
        )


def _check_count(name: str, value: object, low: int, high: int | None, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoeOffloadError(f"{name}={value!r} is not an integer; it is {meaning}")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise MoeOffloadError(f"{name}={value} is out of range: it is {meaning} and must be {bounds}")


def check_eamc_fits(capacity: int, layers: int, experts: int, asked: str) -> None:
    """Refuses an EAMC capacity above what the core allows for this shape on
    this machine (at most MAX_EAMC_CAPACITY entries, within half of its
    memory), naming the argument as `asked` spells it."""
    most = max_eamc_capacity(layers, experts)
    if capacity > most:
        raise MoeOffloadError(
            f"{asked} is too large: an EAMC of {layers} MoE layers x {experts} experts holds at most {most} "
            f"requests on this machine (at most {MAX_EAMC_CAPACITY}, within half of its memory); "
            "the default is 1000"
        )


def _core_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"cuda:{device.index}"


def _bytes_to_move(model: nn.Module, blocks: list[ExpertBlock], device: torch.device) -> int:
    """Bytes of the weights other than routed experts that are not on
    `device` yet (data-less ones included: they will be loaded there)."""
    experts = {id(p) for b in blocks for p in b.parameters()}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in experts}
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device != device)


def _budget(
    device_budget: int | None,
    blocks: list[ExpertBlock],
    slot_bytes: int,
    device: torch.device,
    still_to_move: int,
    host_budget: int | None,
    cpu_experts: str,
) -> int:
    """The device budget in bytes, checked against one token's needs. The
    default on CUDA leaves room for the other weights still to be moved
    there, and a tenth of what remains for activations and caches. On the
    CPU the device slots are host memory too: none when the CPU runs the
    experts from where they lie (`cpu_experts` other than "never"); else
    every expert when the model's experts are in host memory anyway, a
    quarter of `host_budget` when they come from a store (so memory stays
    near the host budget). Only with "never" must the budget hold one
    token's experts: otherwise what does not fit runs on the CPU."""
    top_k = max(b.top_k for b in blocks)
    minimum = top_k * slot_bytes if cpu_experts == "never" else 0
    everything = sum(b.num_experts for b in blocks) * slot_bytes
    if device_budget is None and device.type == "cpu" and cpu_experts != "never":
        return 0
    if device_budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(minimum, min(everything, int((free - still_to_move) * 0.9)))
        if host_budget is not None:
            return max(minimum, min(everything, host_budget // 4))
        return everything
    budget = device_budget
    if budget < minimum:
        raise BudgetError(
            f"device_budget={format_size(budget)} ({budget} bytes) is below the minimum of "
            f"{format_size(minimum)} ({minimum} bytes): one token needs its top-{top_k} experts of one MoE "
            f"layer on the device at once, {format_size(slot_bytes)} each. Raise device_budget to at least "
            f"{minimum} bytes, or let the CPU run the misses that do not fit (cpu_experts='auto')."
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
    # Filling the slots is not the model's traffic; what the host cache read
    # up front (from a store) stays visible.
    cache.reset_stats(host=False)


def calibrate_cpu(offloader: Offloader) -> None:
    """Times the CPU running experts of the first MoE layer from host memory,
    for a few tokens and for many, so that `cpu_experts="auto"` places misses
    from measured costs from the first layer on (it keeps learning from the
    experts the CPU runs). Each kind is run twice, the first time unmeasured
    (a cold start); different experts, so the weights come from memory."""
    cache, block = offloader.cache, offloader.blocks[0]
    generator = torch.Generator().manual_seed(0)
    dtype = block.weight_specs[0].dtype
    for run, tokens in enumerate((1, 1, CALIBRATION_TOKENS, CALIBRATION_TOKENS)):
        expert = run % block.num_experts
        states = torch.randn(tokens, block.input_features, generator=generator).to(dtype)
        address = cache.host_acquire(0, expert)
        try:
            weights = offloader.host.views(address, block.specs)
            with torch.no_grad():
                started = time.perf_counter()
                if block.codec is not None:  # dequantizing is part of running it
                    weights = block.codec.decode(weights)
                block.run_expert(expert, weights, states)
                elapsed = time.perf_counter() - started
        finally:
            cache.host_release(0, expert)
        if run % 2:
            cache.record_cpu(tokens, elapsed, count=False)


def places_by_cost(offloader: Offloader) -> bool:
    """Whether misses are placed from measured costs: "auto" with device
    slots on a GPU (on the CPU the CPU always runs them)."""
    return offloader.cpu_experts == "auto" and offloader.n_slots > 0 and offloader.device.type == "cuda"


def _fill_host_tier(cache: ExpertCache, layer: int, block: ExpertBlock) -> None:
    for expert in range(block.num_experts):
        for spec, tensor in block.blob_tensors(expert):
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


def _read_back(
    cache: ExpertCache, blocks: list[ExpertBlock], with_values: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Per block, every expert's values stacked into new host tensors (with
    `with_values` false, none: meta tensors, as a model built without
    weights). Changes nothing, so a failure here leaves the patch intact."""
    values = []
    for layer, block in enumerate(blocks):
        if not with_values:
            values.append(
                {
                    spec.name: torch.empty((block.num_experts, *spec.shape), dtype=spec.dtype, device="meta")
                    for spec in block.weight_specs
                }
            )
            continue
        blobs: dict[str, torch.Tensor] = {}
        for spec in block.specs:
            stacked = torch.empty((block.num_experts, *spec.shape), dtype=spec.dtype)
            for expert in range(block.num_experts):
                cache.read_expert(layer, expert, spec.offset, stacked[expert].data_ptr(), spec.nbytes)
            blobs[spec.name] = stacked
        as_held = block.codec is None or block.blob_is_parameters
        values.append(blobs if as_held else _dequantized(block, blobs))
    return values


def _dequantized(block: ExpertBlock, blobs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert tensors as the model holds them, from stacked blob tensors."""
    assert block.codec is not None
    experts = [
        block.codec.decode({name: t[expert] for name, t in blobs.items()})
        for expert in range(block.num_experts)
    ]
    return {spec.name: torch.stack([e[spec.name].data for e in experts]) for spec in block.weight_specs}


def _swap_in(blocks: list[ExpertBlock], values: list[dict[str, torch.Tensor]]) -> None:
    """Ordinary expert parameters again, holding `values` (see `_read_back`)."""
    # Last offloaded first: blocks may share state (one config for every
    # layer), and undoing in reverse leaves what was there before the first.
    for block, tensors in reversed(list(zip(blocks, values, strict=True))):
        block.restore(tensors)


def _move_experts(blocks: list[ExpertBlock], device: torch.device) -> None:
    """Moves the restored expert parameters (in host memory) to `device`,
    one at a time, each host copy freed as its parameter moves."""
    with torch.no_grad():
        for block in blocks:
            for param in block.parameters():
                if not param.is_meta and param.device != device:
                    param.data = param.data.to(device)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Holds Ctrl-C back while the block runs (statements that must run all
    or none), then delivers it. Signals only ever interrupt the main thread."""
    # Only the main thread can set a handler, and only over one set from Python.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


# What a patched model refuses: casts and moves (`.to`, `.cuda`, `.cpu`,
# `.half`, `.float`, `.bfloat16`, `.type`, `.to_empty` all call `_apply`)
# would reach the experts' data-less placeholders, and `save_pretrained`
# would write them.
_GUARDED = ("_apply", "save_pretrained")


def _guarded_modules(model: nn.Module, blocks: list[ExpertBlock]) -> list[nn.Module]:
    """The model, every module above an expert block, the block and the
    modules inside it: those whose casts or moves reach the experts."""
    names = [b.name for b in blocks]
    return [
        module
        for name, module in model.named_modules()
        if any(n == name or n.startswith(f"{name}.") or name.startswith(f"{n}.") for n in names) or not name
    ]


def _guard(model: nn.Module, blocks: list[ExpertBlock]) -> None:
    for module in _guarded_modules(model, blocks):
        module.__dict__["_apply"] = types.MethodType(_apply_while_patched, module)
    if hasattr(model, "save_pretrained"):
        model.__dict__["save_pretrained"] = types.MethodType(_save_while_patched, model)


def _unguard(model: nn.Module) -> None:
    for module in model.modules():
        for name in _GUARDED:
            module.__dict__.pop(name, None)


def _apply_while_patched(
    self: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
) -> nn.Module:
    """`nn.Module._apply` on a patched model: allowed when it changes no
    tensor (a move to where the model is, a cast to its dtype), else refused."""
    tensors = [t for t in chain(self.parameters(), self.buffers()) if not t.is_meta]
    kinds = {(t.dtype, t.device) for t in tensors}
    # Empty stand-ins of each kind first, so that a real change is refused
    # before it copies anything; then `fn` on the tensors themselves (for
    # in-place effects such as `share_memory_`), which must come back as they are.
    stand_ins = [torch.empty(0, dtype=dtype, device=device) for dtype, device in kinds]
    if not all(_unchanged_by(fn, t) for t in chain(stand_ins, tensors)):
        raise PatchStateError(
            f"{type(self).__name__} is patched by moe-offload: its experts are in the offloader's cache, not "
            "in the model, so it cannot be moved or cast (.to, .cuda, .cpu, .half, ...). Call "
            "moe_offload.unpatch(model) first, change the model, then patch it again."
        )
    return self


def _unchanged_by(fn: Callable[[torch.Tensor], torch.Tensor], tensor: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            return fn(tensor) is tensor
    except Exception:  # e.g. a move to a device this machine lacks: a change all the same
        return False


def _save_while_patched(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise PatchStateError(
        f"{type(self).__name__} is patched by moe-offload: its experts are in the offloader's cache, not in "
        "the model, so save_pretrained would write empty weights. Call moe_offload.unpatch(model) first, "
        "then save_pretrained (nothing was written)."
    )
