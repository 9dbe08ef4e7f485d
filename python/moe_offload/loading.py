"""`moe_offload.from_pretrained`: run a model whose experts need not fit in
host memory.

The model is built on the meta device (no expert weights are materialised
anywhere), its other weights are read straight to the device, and its
experts are served from three tiers: device slots (`device_budget`), a host
cache (`host_budget`, pinned on CUDA), and disk. Disk is an expert store
(converted on first use into `store_dir`), or a checkpoint read in place
when its layout already stores each expert as the model runs it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from moe_offload._core import BudgetError, ExpertStore, MoeOffloadError, StoreError
from moe_offload.adapters import ExpertBlock, TensorSpec
from moe_offload.checkpoint import (
    Checkpoint,
    Ranges,
    TensorInfo,
    WeightMap,
    load_config,
    not_a_directory,
    read_range,
    read_safetensors_header,
)
from moe_offload.conversion import NON_EXPERTS, STORE_INDEX, convert
from moe_offload.offloader import (
    SLOT_ALIGN,
    Offloader,
    StoreBacking,
    _patch,
    abandon_patch,
    calibrate_cpu,
    check_arguments,
    load_every_expert_that_fits,
    places_by_cost,
    resolve_device,
)
from moe_offload.progress import progress
from moe_offload.quantization import Quantization, checkpoint_quantization
from moe_offload.sizes import format_size, parse_size
from moe_offload.skeleton import (
    build_skeleton,
    dtype_name,
    expert_blocks,
    expert_parameter_names,
    resolve_dtype,
)

log = logging.getLogger("moe_offload")

# Experts handed to the copy workers per preload call (one progress step).
_PRELOAD_CHUNK = 64


def from_pretrained(
    path: str | Path,
    device: str | torch.device | None = None,
    device_budget: int | str | None = None,
    *,
    host_budget: int | str | None = None,
    store_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    policy: str = "activation-aware",
    io_workers: int = 8,
    eamc_path: str | Path | None = None,
    eamc_capacity: int = 1000,
    prefetch_depth: int | None = None,
    cpu_experts: str = "auto",
    cpu_threads: int | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    lookahead: int = 0,
    show_progress: bool | None = None,
) -> tuple[PreTrainedModel, Offloader]:
    """Loads the model at `path` (a Hugging Face safetensors checkpoint or an
    expert store written by `convert`) with its experts offloaded.

    - `device`: where the model runs (default: CUDA when available, else CPU).
    - `device_budget`: bytes of device slots, as for `patch`; on the CPU (where
      the slots are host memory too) none are needed unless `cpu_experts` is
      "never", when it defaults to a quarter of `host_budget`.
    - `host_budget`: bytes of the host cache between disk and device (default:
      every expert, capped at half of the available memory). Experts are read
      from disk when the host cache lacks them; when it holds every expert
      they are all read up front.
    - `store_dir`: for a checkpoint, the directory of its expert store,
      converted there on first use; without it the checkpoint is read in
      place, which works when it stores each expert's tensors in the model's
      dtype and layout (otherwise a `StoreError` asks for a `store_dir`).
    - `io_workers`: threads reading experts from disk (and copying them on).
    - `cpu_experts`, `cpu_threads`: where a miss runs and with how many torch
      threads, as for `patch`; on the CPU the experts run from the host
      cache, read from disk when it lacks them.
    - `quantize`, `group_size`: store the experts quantized ("int8", "int4";
      see `convert`), which needs a `store_dir` for a checkpoint. A store
      converted with quantization is loaded as it is whatever these say;
      one converted otherwise than they ask is a `StoreError`.
    - `lookahead`: router lookahead, as for `patch`.

    Returns the model and its `Offloader`. Raises `StoreError` for a missing,
    truncated or mismatched file (naming it), `BudgetError` when
    `host_budget` cannot hold one token's experts of one MoE layer."""
    check_arguments(
        device_budget=device_budget,
        host_budget=host_budget,
        policy=policy,
        eamc_path=eamc_path,
        eamc_capacity=eamc_capacity,
        prefetch_depth=prefetch_depth,
        io_workers=io_workers,
        cpu_experts=cpu_experts,
        cpu_threads=cpu_threads,
        lookahead=lookahead,
        show_progress=show_progress,
    )
    target = _target_device(device)
    path = Path(path)
    asked = Quantization.parse(quantize, group_size)
    checkpoint, store = _locate(path, store_dir, dtype, asked, show_progress)
    config = load_config(Path(store.path) if store is not None else path)
    scheme = _shipped(path, config, asked) if store is None else _stored_quantization(store, asked)
    if store is not None:
        stored = _meta(store)["dtype"]
        if dtype is not None and dtype_name(resolve_dtype(dtype, config)) != stored:
            raise StoreError(
                f"{store.path}: holds {stored} weights but dtype={dtype!r} was asked for; convert again "
                "with that dtype (moe-offload convert --dtype ... --overwrite) or leave dtype unset"
            )
        dtype = stored
    model = build_skeleton(config, resolve_dtype(dtype, config))
    blocks = expert_blocks(model)
    if scheme is not None:
        for block in blocks:
            block.quantize(scheme)
    if store is not None:
        _check_index(store, blocks)
        source_name = str(Path(store.path) / NON_EXPERTS)
        tensors = _stored_non_experts(Path(source_name), _non_experts_crc32(store))
    else:
        assert checkpoint is not None
        weights = WeightMap(model, checkpoint)
        store = _store_in_place(checkpoint, weights, blocks)
        tensors = _converted_non_experts(weights, expert_parameter_names(blocks))
        source_name = str(checkpoint.path)
    host_slots, budget = _host_slots(host_budget, blocks)
    # The expert blocks need only their shapes to be offloaded, so the
    # experts can stream into the host cache while the other weights load.
    offloader = _patch(
        model,
        target,
        device_budget,
        policy=policy,
        eamc_path=eamc_path,
        eamc_capacity=eamc_capacity,
        prefetch_depth=prefetch_depth,
        copy_workers=max(1, min(io_workers, host_slots)),
        cpu_experts=cpu_experts,
        cpu_threads=cpu_threads,
        show_progress=show_progress,
        scheme=scheme,
        backing=StoreBacking(store, host_slots, budget),
        lookahead=lookahead,
    )
    preload = host_slots >= sum(b.num_experts for b in blocks)
    try:
        with _preloading(offloader, blocks, show_progress, preload):
            _load_non_experts(model, tensors, target, blocks, source_name)
        load_every_expert_that_fits(offloader.cache, blocks, target)
        if places_by_cost(offloader):
            calibrate_cpu(offloader)
    except BaseException:
        abandon_patch(model)  # nothing is read back from a store that just failed
        raise
    log.info(
        "moe-offload: %s from %s; host cache %d slots (%s), direct I/O: %s",
        offloader,
        store.path,
        host_slots,
        format_size(budget),
        store.direct_io,
    )
    return model, offloader


def _locate(
    path: Path,
    store_dir: str | Path | None,
    dtype: str | torch.dtype | None,
    scheme: Quantization | None,
    show_progress: bool | None,
) -> tuple[Checkpoint | None, ExpertStore | None]:
    """(checkpoint to read in place, None) or (None, opened expert store);
    converts the checkpoint into `store_dir` first when that is empty."""
    if not path.exists():
        raise StoreError(not_a_directory(path))
    if not Checkpoint.looks_like_one(path):
        return None, ExpertStore.open(path)  # which says what is wrong with it, if anything
    checkpoint = Checkpoint(path)
    if store_dir is None:
        if scheme is not None:
            _shipped(path, load_config(path), scheme)  # a quantized checkpoint says so first
            raise MoeOffloadError(
                f"quantize={scheme.name!r} needs an expert store to hold the quantized experts: pass "
                "store_dir=DIR (converted there on first use), or convert first: "
                f"moe-offload convert {path} DIR --quantize {scheme.name}"
            )
        return checkpoint, None
    store_dir = Path(store_dir)
    if not _has_content(store_dir):
        summary = convert(
            path,
            store_dir,
            dtype=dtype,
            quantize=None if scheme is None else scheme.name,
            group_size=None if scheme is None else scheme.group_size,
            show_progress=show_progress,
        )
        log.info("moe-offload: %s", summary)
    store = ExpertStore.open(store_dir)
    source = _meta(store)["source"]
    if source["fingerprint"] != checkpoint.fingerprint():
        raise StoreError(
            f"{store_dir}: holds an expert store converted from another checkpoint ({source['path']}); "
            f"choose another store_dir, or replace it: moe-offload convert {path} {store_dir} --overwrite"
        )
    return None, store


def _has_content(directory: Path) -> bool:
    """Whether `directory` holds anything but leftovers of a crashed writer."""
    return directory.is_dir() and any(not p.name.startswith(".partial-") for p in directory.iterdir())


# What `convert` records in the index's `meta`, and the type of each.
_META_FIELDS = {"dtype": str, "source": dict, "non_experts": str}


def _meta(store: ExpertStore) -> dict:
    """The index's description of the model, checked: a store written by
    something else (or an index edited by hand) is a `StoreError`."""
    meta = json.loads(store.index_json())["meta"]
    problem = None
    if not isinstance(meta, dict):
        problem = "has no meta object"
    else:
        wrong = [k for k, kind in _META_FIELDS.items() if not isinstance(meta.get(k), kind)]
        source = meta.get("source")
        if wrong:
            problem = f"has no valid meta.{wrong[0]}"
        elif not all(isinstance(source.get(k), str) for k in ("path", "fingerprint")):
            problem = "has no valid meta.source (path and fingerprint of the checkpoint)"
        elif meta["dtype"] not in _DTYPE_NAMES:
            problem = f"names dtype {meta['dtype']!r}, which is not a torch floating-point dtype"
    if problem is not None:
        index = Path(store.path) / STORE_INDEX
        raise StoreError(
            f"{index}: {problem}, so it was not written by `moe-offload convert`; convert the checkpoint "
            f"again: moe-offload convert CHECKPOINT {store.path} --overwrite"
        )
    return meta


def _shipped(path: Path, config: PretrainedConfig, asked: Quantization | None) -> Quantization | None:
    """How the checkpoint read in place ships its experts (fp8, mxfp4: kept
    so), None when unquantized; it cannot be quantized again."""
    shipped = checkpoint_quantization(config)
    if shipped is not None and asked is not None:
        raise StoreError(
            f"{path}: ships its experts quantized ({shipped.name}); leave quantize unset, and they are "
            f"kept in {shipped.name}"
        )
    return shipped


def _stored_quantization(store: ExpertStore, asked: Quantization | None) -> Quantization | None:
    """How the store's experts are quantized (None: not at all); a store
    quantized otherwise than `asked` (when asked) is a `StoreError`."""
    meta = _meta(store).get("quantization")
    try:
        stored = None if meta is None else Quantization.from_json(meta)
    except (MoeOffloadError, AttributeError, TypeError) as e:
        raise StoreError(
            f"{Path(store.path) / STORE_INDEX}: meta.quantization {meta!r} is not one moe-offload "
            f"writes ({e}); convert the checkpoint again: "
            f"moe-offload convert CHECKPOINT {store.path} --overwrite"
        ) from None
    if asked is not None and asked != stored:
        held = (
            "unquantized experts"
            if stored is None
            else f"{stored.name} experts (group size {stored.group_size})"
        )
        raise StoreError(
            f"{store.path}: holds {held}, not {asked.name} with group size {asked.group_size} as asked; "
            f"leave quantize unset to load it as it is, or convert again: moe-offload convert CHECKPOINT "
            f"{store.path} --quantize {asked.name} --group-size {asked.group_size} --overwrite"
        )
    return stored


_DTYPE_NAMES = {"float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2"}


def _non_experts_crc32(store: ExpertStore) -> int:
    """The CRC-32 the index records for the non-expert weights, which their
    reader checks (the store checks the other small files at open)."""
    files = json.loads(store.index_json())["files"]
    entry = next((f for f in files if f["name"] == NON_EXPERTS and f["check"] == "reader"), None)
    if entry is None:
        raise StoreError(
            f"{Path(store.path) / STORE_INDEX}: lists no checksummed {NON_EXPERTS}; convert the checkpoint "
            f"again: moe-offload convert CHECKPOINT {store.path} --overwrite"
        )
    return entry["crc32"]


def _target_device(device: str | torch.device | None) -> torch.device:
    """`device`, checked as `patch` checks it; by default CUDA when available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_device(device)


def _check_index(store: ExpertStore, blocks: list[ExpertBlock]) -> None:
    """The store's experts must be the model's: same layers, tensors,
    dtypes, shapes and offsets."""
    store_path = Path(store.path)
    layers = json.loads(store.index_json())["layers"]
    if len(layers) != len(blocks):
        raise StoreError(
            f"{store_path / STORE_INDEX}: holds {len(layers)} MoE layers but the model config has "
            f"{len(blocks)}; the store belongs to another model"
        )
    for layer, (entry, block) in enumerate(zip(layers, blocks, strict=True)):
        expected = [(s.name, dtype_name(s.dtype), list(s.shape), s.offset) for s in block.specs]
        found = [(t["name"], t["dtype"], t["shape"], t["offset"]) for t in entry["tensors"]]
        same_blobs = len(entry["blobs"]) == block.num_experts and entry["blob_bytes"] == block.expert_bytes
        if entry["name"] != block.name or not same_blobs or found != expected:
            raise StoreError(
                f"{store_path / entry['file']}: experts 0-{len(entry['blobs']) - 1} of MoE layer {layer} "
                f"({entry['name']}) hold {_describe(found)}, but the model config needs "
                f"{block.num_experts} experts of {block.name} holding {_describe(expected)}. The store was "
                "converted for another configuration; convert the checkpoint again."
            )


def _describe(tensors: list[tuple[str, str, list[int], int]]) -> str:
    return ", ".join(f"{name} {dtype} {list(shape)}" for name, dtype, shape, _ in tensors)


def _store_in_place(checkpoint: Checkpoint, weights: WeightMap, blocks: list[ExpertBlock]) -> ExpertStore:
    """The checkpoint's own files as the disk tier: each expert's blob is
    gathered from the byte ranges its tensors occupy."""
    files: dict[Path, int] = {}
    extents: list[list[tuple[int, int, int, int]]] = []
    for block in blocks:
        for expert in range(block.num_experts):
            blob = []
            for spec, ranges in _blob_ranges(weights, block, expert):
                if ranges is None:
                    raise StoreError(
                        f"{checkpoint.path}: the experts of {block.name} are not stored as the model runs "
                        f"them ({dtype_name(spec.dtype)}, {spec.name} fused per expert), so they cannot be "
                        "read in place; pass store_dir=... to convert the checkpoint into an expert store "
                        "on first use"
                    )
                if ranges.shape != spec.shape:
                    raise StoreError(
                        f"{ranges.parts[0][0].file}: expert {expert} of {block.name}: {spec.name} is "
                        f"{list(ranges.shape)} but the model config needs {list(spec.shape)}"
                    )
                dst = spec.offset
                for info, offset, length in ranges.parts:
                    blob.append((files.setdefault(info.file, len(files)), offset, length, dst))
                    dst += length
            extents.append(blob)
    layers = [(b.num_experts, b.expert_bytes) for b in blocks]
    return ExpertStore.from_extents(checkpoint.path, [str(f) for f in files], layers, extents)


def _blob_ranges(
    weights: WeightMap, block: ExpertBlock, expert: int
) -> Iterator[tuple[TensorSpec, Ranges | None]]:
    """Each blob tensor of the expert with where the checkpoint holds it
    (None: not as the blob needs it)."""
    codec = block.codec if block.codec is not None and block.codec.scheme.from_checkpoint else None
    found: dict[str, Ranges | None] = {}
    for spec in block.weight_specs:
        name, index = block.parameter_name(spec, expert)
        if codec is not None and spec.name in codec.matrices and index is not None:
            stored = weights.quantized_expert_ranges(name, index, block.num_experts, codec.scheme.kind)
            found.update({spec.name + suffix: ranges for suffix, ranges in stored.items()})
        else:
            found[spec.name] = weights.expert_ranges(name, index, block.num_experts, spec.dtype)
    for spec in block.specs:
        yield spec, found.get(spec.name)


def _stored_non_experts(path: Path, crc32: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The store's non-expert weights, read in file order; their CRC-32 runs
    over every byte read (header and gaps included), and a mismatch raises
    once the last one is read, before the model is handed out."""
    tensors = sorted(read_safetensors_header(path).values(), key=lambda info: info.offset)
    crc = 0
    position = 0
    for info in tensors:
        crc = _crc_of_range(path, position, info.offset, crc)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        read_range(path, info.offset, raw)
        crc = zlib.crc32(memoryview(raw.numpy()), crc)
        position = max(position, info.offset + info.nbytes)
        yield info.name, _typed(raw, info)
    crc = _crc_of_range(path, position, path.stat().st_size, crc)
    if crc != crc32:
        raise StoreError(
            f"{path}: checksum mismatch: expected {crc32:08x}, read {crc:08x}; the non-expert weights were "
            f"changed or damaged. Convert the checkpoint again: moe-offload convert CHECKPOINT {path.parent} "
            "--overwrite"
        )


def _crc_of_range(path: Path, start: int, end: int, crc: int) -> int:
    """`crc` continued over bytes start..end of `path` (the header, or bytes
    between tensors)."""
    if end <= start:
        return crc
    raw = torch.empty(end - start, dtype=torch.uint8)
    read_range(path, start, raw)
    return zlib.crc32(memoryview(raw.numpy()), crc)


def _typed(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    return raw.view(info.dtype).reshape(info.shape)


def _converted_non_experts(weights: WeightMap, experts: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for target in weights.sources:
        if target not in experts:
            yield from weights.tensors(target).items()


def _load_non_experts(
    model: PreTrainedModel,
    tensors: Iterator[tuple[str, torch.Tensor]],
    device: torch.device,
    blocks: list[ExpertBlock],
    source: str,
) -> None:
    """Puts every non-expert weight on `device`, one tensor at a time, then
    lets transformers tie weights and compute non-persistent buffers (rotary
    frequencies, sinusoidal positions) as its own loading does."""
    expected = model.state_dict()
    experts = expert_parameter_names(blocks)
    loaded = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if name in experts or name not in expected:
                continue
            ref = expected[name]
            if tuple(tensor.shape) != tuple(ref.shape):
                raise StoreError(
                    f"{source}: {name} is {list(tensor.shape)} but the model config needs {list(ref.shape)}"
                )
            dtype = ref.dtype if tensor.is_floating_point() else tensor.dtype
            _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
            loaded.add(name)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(expected) - experts - loaded - tied)
    if missing:
        raise StoreError(
            f"{source}: has no tensor for the model's {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; it does not match the model config"
        )
    model.tie_weights()
    for name, buffer in model.named_non_persistent_buffers():
        _set_tensor(model, name, torch.empty_like(buffer, device=device), initialized=False)
    for param in model.parameters():
        if param.is_meta:
            param._is_hf_initialized = True  # expert placeholders: nothing to initialise
    model.initialize_weights()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, initialized: bool = True) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        value = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value
    if initialized:
        value._is_hf_initialized = True


def _host_slots(host_budget: int | str | None, blocks: list[ExpertBlock]) -> tuple[int, int]:
    """(host cache slots, host budget in bytes), checked against one token's
    needs: its top-k experts of one MoE layer."""
    slot = -(-max(b.expert_bytes for b in blocks) // SLOT_ALIGN) * SLOT_ALIGN
    experts = sum(b.num_experts for b in blocks)
    top_k = max(b.top_k for b in blocks)
    minimum = top_k * slot
    if host_budget is None:
        budget = max(minimum, min(experts * slot, _available_memory() // 2))
    else:
        budget = parse_size(host_budget, "host_budget")
    if budget < minimum:
        raise BudgetError(
            f"host_budget={format_size(budget)} ({budget} bytes) is below the minimum of "
            f"{format_size(minimum)} ({minimum} bytes): one token needs its top-{top_k} experts of one MoE "
            f"layer in host memory at once, {format_size(slot)} each. Raise host_budget to at least "
            f"{minimum} bytes."
        )
    return min(budget // slot, experts), budget


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@contextmanager
def _preloading(
    offloader: Offloader, blocks: list[ExpertBlock], show_progress: bool | None, enabled: bool
) -> Iterator[None]:
    """Reads every expert into the host cache (on the copy workers, driven
    from a thread of its own) while the block runs; raises what it raised."""
    failure: list[BaseException] = []

    def preload() -> None:
        try:
            _preload(offloader, blocks, show_progress)
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    thread = threading.Thread(target=preload, name="moe-offload-preload", daemon=True)
    if enabled:
        thread.start()
    try:
        yield
    finally:
        if enabled:
            thread.join()
    if failure:
        raise failure[0]


def _preload(offloader: Offloader, blocks: list[ExpertBlock], show_progress: bool | None) -> None:
    """Reads every expert into the host cache on the copy workers."""
    pairs = [(layer, e) for layer, block in enumerate(blocks) for e in range(block.num_experts)]
    total = sum(b.num_experts * b.expert_bytes for b in blocks)
    with progress(total, "loading experts into host memory", show_progress) as bar:
        for start in range(0, len(pairs), _PRELOAD_CHUNK):
            chunk = pairs[start : start + _PRELOAD_CHUNK]
            offloader.cache.preload(chunk)
            bar.update(sum(blocks[layer].expert_bytes for layer, _ in chunk))
