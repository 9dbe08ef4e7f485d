"""`moe_offload.convert`: a Hugging Face checkpoint into an expert store.

The store (see `rust/src/tiers/store`) holds every routed expert as one
4 KiB-aligned blob laid out exactly as a device slot holds it, plus the
model's other weights (`non-experts.safetensors`, already under the model's
parameter names), its config and tokenizer files. Experts are converted one
at a time, so memory stays bounded by the largest tensor; the writer stages
everything in a directory beside the store and swaps it in only when all of
it is on disk, so the store's directory holds one complete store at every
instant (the old one until the new one is whole). Every file gets a CRC-32
in the store's index.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from moe_offload._core import StoreError, StoreWriter
from moe_offload._core import __version__ as version
from moe_offload.adapters import ExpertBlock, TensorSpec
from moe_offload.checkpoint import DTYPES, Checkpoint, WeightMap, is_side_file, load_config
from moe_offload.progress import progress
from moe_offload.quantization import Quantization, checkpoint_quantization
from moe_offload.sizes import format_size
from moe_offload.skeleton import (
    build_skeleton,
    dtype_name,
    expert_blocks,
    expert_parameter_names,
    resolve_dtype,
)

STORE_INDEX = "moe-store.json"
NON_EXPERTS = "non-experts.safetensors"
BLOB_ALIGN = 4096
_SAFETENSORS_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class ConversionSummary:
    store: Path
    experts: int
    expert_bytes: int
    file_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.expert_bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"converted {self.experts} experts, {format_size(self.expert_bytes)} "
            f"({format_size(self.file_bytes)} on disk with the other weights) in {self.seconds:.1f} s, "
            f"{self.mb_per_s:.0f} MB/s, into {self.store}"
        )


def convert(
    checkpoint: str | Path,
    store_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    overwrite: bool = False,
    verify: bool = False,
    show_progress: bool | None = None,
) -> ConversionSummary:
    """Writes the expert store for the safetensors checkpoint in `checkpoint`
    into `store_dir`, converting weights to `dtype` (default: the config's).
    With `quantize` ("int8" or "int4"), every expert matrix is stored
    quantized (one scale per `group_size` input features, default 128; see
    `moe_offload.quantization`) and the store records the scheme, which
    `from_pretrained` then uses. With `verify`, first checks every checkpoint
    file against the hash its Hugging Face Hub download recorded (see
    `Checkpoint.verify`).

    Raises `StoreError` naming the file at fault for a missing or damaged
    shard, a checkpoint that does not match its config, a directory that
    already holds something (unless `overwrite`), a place that cannot be
    written or a disk too small; no partial output is left behind."""
    started = time.perf_counter()
    scheme = Quantization.parse(quantize, group_size)
    source = Checkpoint(checkpoint)
    config = load_config(source.path)
    scheme = _scheme_for(source.path, config, scheme)
    dtype = resolve_dtype(dtype, config)
    model = build_skeleton(config, dtype)
    blocks = expert_blocks(model)
    if scheme is not None:
        for block in blocks:
            block.quantize(scheme)
    weights = WeightMap(model, source)
    store_dir = Path(store_dir)
    non_experts = _non_expert_specs(model, blocks)
    _check_target(store_dir, blocks, non_experts, source.path)
    if verify:
        source.verify()
    meta = {
        "dtype": dtype_name(dtype),
        "architectures": getattr(config, "architectures", None),
        "source": {"path": str(source.path.resolve()), "fingerprint": source.fingerprint()},
        "non_experts": NON_EXPERTS,
        "quantization": None if scheme is None else scheme.to_json(),
        "written_by": f"moe-offload {version}",
    }
    writer = StoreWriter(store_dir, [_layer_spec(b) for b in blocks], json.dumps(meta), overwrite)
    try:
        _write_side_files(source.path, writer, config, dtype)
        _write_non_experts(writer, weights, non_experts, set(expert_parameter_names(blocks)))
        _write_experts(writer, weights, blocks, show_progress)
        experts, expert_bytes, file_bytes = writer.finish()
    except OSError as e:
        writer.abort()
        raise StoreError(
            f"{store_dir}: writing the store failed ({e}); the partial output was removed. "
            "Free space or choose another directory."
        ) from e
    except BaseException:
        writer.abort()
        raise
    return ConversionSummary(store_dir, experts, expert_bytes, file_bytes, time.perf_counter() - started)


def _scheme_for(path: Path, config: PretrainedConfig, asked: Quantization | None) -> Quantization | None:
    """How the store holds the experts: as the checkpoint ships them (fp8,
    mxfp4), else quantized as `asked`, else as they are."""
    shipped = checkpoint_quantization(config)
    if shipped is not None and asked is not None:
        raise StoreError(
            f"{path}: ships its experts quantized ({shipped.name}); convert it without --quantize, and "
            f"the store keeps them in {shipped.name}"
        )
    return shipped or asked


def _layer_spec(block: ExpertBlock) -> tuple[str, int, int, list[tuple[str, str, list[int], int]]]:
    tensors = [(s.name, dtype_name(s.dtype), list(s.shape), s.offset) for s in block.specs]
    return block.name, block.num_experts, block.expert_bytes, tensors


def _non_expert_specs(model: PreTrainedModel, blocks: list[ExpertBlock]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor the store keeps besides the experts (tied
    copies are re-tied on loading), as meta tensors giving shape and dtype."""
    experts = expert_parameter_names(blocks)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return {n: t for n, t in model.state_dict().items() if n not in experts and n not in tied}


def _check_target(
    store_dir: Path, blocks: list[ExpertBlock], non_experts: dict[str, torch.Tensor], source: Path
) -> None:
    """The store is built beside `store_dir` and swapped in: its parent (or
    the nearest existing ancestor) must be writable and have room."""
    blobs = sum(BLOB_ALIGN + b.num_experts * -(-b.expert_bytes // BLOB_ALIGN) * BLOB_ALIGN for b in blocks)
    others = sum(t.numel() * t.element_size() for t in non_experts.values())
    needed = blobs + others
    absolute = Path(os.path.abspath(store_dir))
    # `/` has no parent: the writer refuses it by name.
    existing = next((p for p in absolute.parents if p.exists()), absolute)
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only(existing):
        raise StoreError(
            f"{store_dir}: cannot be written: {existing} is read-only or not writable by this user (the "
            "store is built beside its directory and moved into place). Choose another directory."
        )
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise StoreError(
            f"{store_dir}: the store for {source} needs {format_size(needed)} ({needed} bytes) but only "
            f"{format_size(free)} are free there. Free space or choose another directory."
        )


def _read_only(directory: Path) -> bool:
    """Whether `directory` is on a read-only filesystem (which `os.access`
    does not tell root)."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError as e:
        return e.errno == errno.EROFS


def _write_side_files(
    source: Path, writer: StoreWriter, config: PretrainedConfig, dtype: torch.dtype
) -> None:
    """The config (with the store's dtype) and every non-weight file of the
    checkpoint (generation config, tokenizer)."""
    staging = Path(writer.partial_dir)
    config.dtype = dtype
    # The store's non-experts are dequantized and its experts' format is in
    # its index: its config describes the unquantized model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.to_json_file(staging / "config.json")
    writer.add_file("config.json")
    for path in sorted(source.iterdir()):
        if path.is_file() and is_side_file(path):
            shutil.copyfile(path, staging / path.name)
            writer.add_file(path.name)


def _write_non_experts(
    writer: StoreWriter, weights: WeightMap, specs: dict[str, torch.Tensor], experts: set[str]
) -> None:
    """The model's other weights, converted and cast, streamed into one
    safetensors file under the model's own parameter names."""

    def produced() -> Iterator[tuple[str, torch.Tensor]]:
        for target in weights.sources:
            if target in experts:
                continue
            for name, tensor in weights.tensors(target).items():
                if name not in specs:
                    continue
                if tuple(tensor.shape) != tuple(specs[name].shape):
                    raise StoreError(
                        f"{weights.file_of(target)}: {name} is {list(tensor.shape)} but the model config "
                        f"needs {list(specs[name].shape)}"
                    )
                yield name, tensor

    path = Path(writer.partial_dir) / NON_EXPERTS
    written = write_safetensors(path, specs, produced())
    missing = sorted(set(specs) - written)
    if missing:
        raise StoreError(
            f"{weights.checkpoint.path}: the checkpoint has no tensor for the model's {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; it does not match its config"
        )
    # Read tensor by tensor when loading: that reader checks its CRC-32.
    writer.add_file(NON_EXPERTS, checked_by_reader=True)


def write_safetensors(
    path: Path, specs: dict[str, torch.Tensor], tensors: Iterator[tuple[str, torch.Tensor]]
) -> set[str]:
    """Writes a safetensors file whose header lists `specs` (names with the
    shapes and dtypes of their tensors), filling each tensor as `tensors`
    yields it (cast to its spec's dtype), one at a time. Returns the names
    written."""
    header: dict[str, dict] = {}
    offset = 0
    for name, spec in specs.items():
        nbytes = spec.numel() * spec.element_size()
        code = _SAFETENSORS_CODES[spec.dtype]
        header[name] = {"dtype": code, "shape": list(spec.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    written = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.truncate(start + offset)
        for name, tensor in tensors:
            begin = header[name]["data_offsets"][0]
            data = tensor.to(specs[name].dtype).contiguous().reshape(-1).view(torch.uint8)
            f.seek(start + begin)
            f.write(memoryview(data.numpy()))
            written.add(name)
    return written


def _write_experts(
    writer: StoreWriter, weights: WeightMap, blocks: list[ExpertBlock], show_progress: bool | None
) -> None:
    """Each expert's tensors, converted from its own checkpoint tensors,
    packed into a blob laid out like a device slot."""
    buffer = torch.zeros(max(b.expert_bytes for b in blocks), dtype=torch.uint8)
    total = sum(b.num_experts * b.expert_bytes for b in blocks)
    with progress(total, "converting experts", show_progress) as bar:
        for layer, block in enumerate(blocks):
            for expert in range(block.num_experts):
                blob = buffer[: block.expert_bytes]
                blob.zero_()
                for spec, tensor in _blob_tensors(weights, block, expert):
                    data = tensor.to(spec.dtype).contiguous().reshape(-1).view(torch.uint8)
                    blob[spec.offset : spec.offset + spec.nbytes].copy_(data)
                writer.write_expert(layer, expert, blob.data_ptr(), block.expert_bytes)
                bar.update(block.expert_bytes)


def _blob_tensors(
    weights: WeightMap, block: ExpertBlock, expert: int
) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    """The expert's blob tensors, from its checkpoint tensors (quantized
    when the block's codec says so)."""
    if block.codec is not None and block.codec.scheme.from_checkpoint:
        yield from _shipped_blob_tensors(weights, block, expert)
        return
    tensors: dict[str, torch.Tensor] = {}
    for spec in block.weight_specs:
        name, index = block.parameter_name(spec, expert)
        tensor = weights.expert_tensor(name, index, block.num_experts)
        if tuple(tensor.shape) != spec.shape:
            raise StoreError(
                f"{weights.file_of(name)}: expert {expert} of {block.name}: {spec.name} is "
                f"{list(tensor.shape)} but the model config needs {list(spec.shape)}"
            )
        tensors[spec.name] = tensor.to(spec.dtype)
    if block.codec is not None:
        tensors = block.codec.encode(tensors)
    for spec in block.specs:
        yield spec, tensors[spec.name]


def _shipped_blob_tensors(
    weights: WeightMap, block: ExpertBlock, expert: int
) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
    """The expert's blob tensors from a checkpoint that ships them quantized:
    its matrices' bytes as stored, its other tensors converted as usual."""
    assert block.codec is not None
    scheme = block.codec.scheme
    tensors: dict[str, torch.Tensor] = {}
    for spec in block.weight_specs:
        name, index = block.parameter_name(spec, expert)
        if index is None:
            raise StoreError(f"{block.name}: {scheme.name} experts are read only from fused expert tensors")
        if spec.name in block.codec.matrices:
            stored = weights.quantized_expert_tensors(name, index, block.num_experts, scheme.kind)
            tensors.update({spec.name + suffix: t for suffix, t in stored.items()})
        else:
            tensors[spec.name] = weights.expert_tensor(name, index, block.num_experts).to(spec.dtype)
    for spec in block.specs:
        tensor = tensors[spec.name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise StoreError(
                f"{weights.checkpoint.path}: expert {expert} of {block.name}: {spec.name} is "
                f"{list(tensor.shape)} {tensor.dtype}, but {scheme.name} "
                f"experts of the model config need {list(spec.shape)} {spec.dtype}"
            )
        yield spec, tensor
