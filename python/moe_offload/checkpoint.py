"""Hugging Face safetensors checkpoints, read piece by piece.

Tensors are read with plain positioned reads into fresh buffers (no memory
map), so the process holds only what it keeps. Checkpoint tensor names are
mapped to the model's parameters through transformers' own conversion
mapping, the same rules `from_pretrained` applies: a checkpoint that stores
experts one by one (`experts.3.w1.weight`, as Hub checkpoints and
`save_pretrained` do) and a model that fuses them (`experts.gate_up_proj`)
meet through it, one expert at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from moe_offload._core import StoreError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_FINGERPRINT_SAMPLE = 64 << 10
# `owner/name`, as Hub model ids are written.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Where `huggingface-cli download --local-dir` records what it downloaded.
_LOCAL_DIR_METADATA = Path(".cache", "huggingface", "download")
_HASH_CHUNK = 8 << 20
# The safetensors format's own limit on its JSON header.
_MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor's bytes are."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute file offset of the first byte."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def row_range(self, row: int) -> tuple[int, int]:
        """File offset and length of `tensor[row]` (rows are contiguous)."""
        row_bytes = self.nbytes // self.shape[0]
        return self.offset + row * row_bytes, row_bytes


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file; refuses a truncated file by name."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            (header_len,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
            if 8 + header_len > size:
                raise StoreError(f"{path}: is truncated (it ends inside its safetensors header)")
            if header_len > _MAX_HEADER_BYTES:
                raise ValueError(
                    f"a {header_len} byte header, above the format's limit of {_MAX_HEADER_BYTES}"
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise StoreError(f"{path}: is missing") from None
    except (OSError, ValueError, RecursionError) as e:
        raise StoreError(f"{path}: is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: is not a readable safetensors file (its header is not a JSON object)")
    start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info = _tensor_info(path, name, entry, start)
        end = info.offset + info.nbytes
        if end > size:
            raise StoreError(
                f"{path}: is truncated: tensor {name} needs bytes {info.offset}..{end} but the "
                f"file has {size} bytes. Download or copy the file again."
            )
        tensors[name] = info
    return tensors


def _tensor_info(path: Path, name: str, entry: object, start: int) -> TensorInfo:
    """One header entry, checked: dtype, shape and data offsets that agree."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        valid = isinstance(dtype, str) and isinstance(shape, list) and begin <= end
        valid = valid and all(type(n) is int and n >= 0 for n in (*shape, begin, end))
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise StoreError(f"{path}: is not a readable safetensors file (bad header entry for {name})")
    if dtype not in DTYPES:
        raise StoreError(f"{path}: tensor {name} has dtype {dtype}, which moe-offload cannot read")
    info = TensorInfo(path, name, DTYPES[dtype], tuple(shape), start + begin)
    if end - begin != info.nbytes:
        raise StoreError(f"{path}: tensor {name} holds {end - begin} bytes, its shape needs {info.nbytes}")
    return info


def read_range(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fills the contiguous uint8 tensor `out` from `path` at `offset`."""
    view = memoryview(out.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise StoreError(f"{path}: is truncated (it ends at byte {offset + done})")
            done += n
    except OSError as e:
        raise StoreError(f"{path}: reading bytes {offset}..{offset + len(view)} failed: {e}") from None
    finally:
        os.close(fd)


def read_tensor(info: TensorInfo, row: int | None = None) -> torch.Tensor:
    """The tensor (or its `row`-th slice along the first dimension)."""
    if row is None:
        offset, nbytes, shape = info.offset, info.nbytes, info.shape
    else:
        (offset, nbytes), shape = info.row_range(row), info.shape[1:]
    raw = torch.empty(nbytes, dtype=torch.uint8)
    read_range(info.file, offset, raw)
    return raw.view(info.dtype).reshape(shape)


class Checkpoint:
    """A Hugging Face checkpoint directory: `config.json` and safetensors
    weights (one file, or shards listed by `model.safetensors.index.json`).
    Every shard is checked on opening: present, and holding what its header
    promises."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(not_a_directory(self.path))
        if not (self.path / CONFIG_FILE).is_file():
            raise StoreError(
                f"{self.path}: has no {CONFIG_FILE}, so it is not a Hugging Face checkpoint directory "
                f"(moe-offload needs {CONFIG_FILE} and safetensors weights); pass the directory holding them"
            )
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise StoreError(f"{index}: is not a safetensors index ({e})") from None
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = {}
        else:
            raise StoreError(
                f"{self.path}: has no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}); "
                "moe-offload reads safetensors checkpoints only"
            )
        shards = sorted(set(weight_map.values())) or [SINGLE_FILE]
        missing = [s for s in shards if not (self.path / s).is_file()]
        if missing:
            users = [k for k, v in weight_map.items() if v == missing[0]]
            raise StoreError(
                f"{self.path / missing[0]}: is missing; the checkpoint's index lists it for {len(users)} "
                f"tensors (e.g. {users[0]}). Download or copy the checkpoint again."
            )
        self.shards = [self.path / s for s in shards]
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            self.tensors.update(read_safetensors_header(shard))
        absent = [k for k in weight_map if k not in self.tensors]
        if absent:
            raise StoreError(
                f"{self.path / weight_map[absent[0]]}: lacks tensor {absent[0]}, which the checkpoint's "
                "index places there. Download or copy the checkpoint again."
            )

    def verify(self) -> list[Path]:
        """Checks every file a conversion reads against the hash the Hugging
        Face Hub recorded when it was downloaded (a cache snapshot links each
        file to a blob named by its hash; `--local-dir` downloads keep it in
        `.cache/huggingface/download/`). Returns the files checked; raises
        `StoreError` for a file that differs, or for weights with no
        recorded hash, since then there is nothing to check against."""
        files = [*self.shards, self.path / CONFIG_FILE]
        if (self.path / INDEX_FILE).is_file():
            files.append(self.path / INDEX_FILE)
        files += [
            p for p in sorted(self.path.iterdir()) if p.is_file() and p not in files and is_side_file(p)
        ]
        checked = []
        for path in files:
            recorded = recorded_hash(self.path, path)
            if recorded is None:
                if path in self.shards:
                    raise StoreError(
                        f"{path}: has no hash recorded by a Hugging Face Hub download, so there is nothing "
                        "to verify it against. Verification works on a Hub cache snapshot or a "
                        "`huggingface-cli download --local-dir` directory; convert without verifying to "
                        "trust the files as they are"
                    )
                continue
            kind, expected = recorded
            actual = file_hash(path, kind)
            if actual != expected:
                raise StoreError(
                    f"{path}: its {kind} is {actual} but the Hub download recorded {expected}: the file was "
                    "changed or damaged after downloading. Download it again."
                )
            checked.append(path)
        return checked

    @staticmethod
    def looks_like_one(path: Path) -> bool:
        return (path / "config.json").is_file() and (
            (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()
        )

    def fingerprint(self) -> str:
        """Identifies these weights cheaply: every shard's name and size, its
        header and a sample of its bytes (the first and last 64 KiB)."""
        digest = hashlib.sha256()
        for shard in self.shards:
            size = shard.stat().st_size
            digest.update(f"{shard.name}:{size};".encode())
            with open(shard, "rb") as f:
                digest.update(f.read(_FINGERPRINT_SAMPLE))
                f.seek(max(0, size - _FINGERPRINT_SAMPLE))
                digest.update(f.read(_FINGERPRINT_SAMPLE))
        return digest.hexdigest()


def not_a_directory(path: Path) -> str:
    """Why `path` cannot be read, with a hint when it looks like a Hub id."""
    if path.exists():
        return f"{path}: is not a directory"
    message = f"{path}: does not exist"
    if _HUB_ID.fullmatch(str(path)):
        message += (
            f". It looks like a Hugging Face Hub model id; moe-offload reads local files only. Download it "
            f"first (`huggingface-cli download {path} --local-dir DIR`, or "
            f"`huggingface_hub.snapshot_download({str(path)!r})`), then pass the directory"
        )
    return message


def load_config(directory: Path) -> PretrainedConfig:
    """The model config in `directory`; a missing or unreadable config.json
    is a `StoreError` naming it."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise StoreError(f"{path}: is missing")
    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())
        raise StoreError(f"{path}: is not a usable model config ({reason})") from None


def is_side_file(path: Path) -> bool:
    """Whether a checkpoint file is copied into a store (not weights, not hidden)."""
    weights = path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")
    return not path.name.startswith(".") and path.name != CONFIG_FILE and not weights


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def recorded_hash(checkpoint: Path, path: Path) -> tuple[str, str] | None:
    """("sha256" or "git-sha1", hex digest) the Hub recorded for a downloaded
    file: LFS files (weights) by their sha256, others by their git blob id."""
    etag = None
    if path.is_symlink() and path.resolve().parent.name == "blobs":
        etag = path.resolve().name  # a cache snapshot: blobs are named by their hash
    else:
        metadata = checkpoint / _LOCAL_DIR_METADATA / f"{path.name}.metadata"
        if metadata.is_file():
            lines = metadata.read_text(errors="replace").splitlines()
            etag = lines[1].strip() if len(lines) > 1 else None
    if etag is None:
        return None
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return "sha256", etag
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        return "git-sha1", etag
    return None


def file_hash(path: Path, kind: str) -> str:
    """The file's sha256, or its git blob id (sha1 of a `blob SIZE\\0` header and the bytes)."""
    if kind == "sha256":
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1()
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Ranges:
    """A tensor stored as byte ranges of the checkpoint, joined in order."""

    parts: list[tuple[TensorInfo, int, int]]
    """(tensor, file offset, length) per range."""
    shape: tuple[int, ...]


@dataclass
class Source:
    """The checkpoint tensors one model tensor is made of: per source pattern
    of its converter (None when it is only renamed), the checkpoint names in
    natural order, which for per-expert tensors is expert order."""

    target: str
    keys: dict[str | None, list[str]]
    converter: WeightConverter | None


class WeightMap:
    """Which checkpoint tensors make each model tensor, by transformers'
    conversion mapping for `model` (renamings, then at most one converter)."""

    def __init__(self, model: PreTrainedModel, checkpoint: Checkpoint) -> None:
        self.model = model
        self.checkpoint = checkpoint
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        expected = model.state_dict()
        self.sources: dict[str, Source] = {}
        self.unexpected: list[str] = []
        for key in sorted(checkpoint.tensors, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
            if target not in expected and key in expected:
                target, pattern = key, None
            if target not in expected:
                self.unexpected.append(key)
                continue
            source = self.sources.setdefault(target, Source(target, {}, by_pattern.get(pattern)))
            source.keys.setdefault(pattern, []).append(key)

    def source(self, target: str) -> Source:
        if target not in self.sources:
            raise StoreError(
                f"{self.checkpoint.path}: the checkpoint has no tensor for the model's {target}; it does not "
                "match the model config"
            )
        return self.sources[target]

    def file_of(self, target: str) -> Path:
        """The (first) checkpoint file holding `target`'s sources."""
        keys = next(iter(self.source(target).keys.values()))
        return self.checkpoint.tensors[keys[0]].file

    def tensors(self, target: str) -> dict[str, torch.Tensor]:
        """The model tensors made from `target`'s sources (a converter that
        splits one checkpoint tensor yields several), by full name."""
        source = self.source(target)
        if source.converter is None:
            [key] = source.keys[None]
            return {target: self._read_dequantized(key)}
        if any(self._fp8_scale(key) for keys in source.keys.values() for key in keys):
            raise StoreError(
                f"{self.file_of(target)}: {target} is made of several float8 tensors; such checkpoints are "
                "supported only for routed experts and for weights stored one tensor each"
            )
        converter = deepcopy(source.converter)
        for pattern, keys in source.keys.items():
            for key in keys:
                converter.add_tensor(target, key, pattern, read_tensor(self.checkpoint.tensors[key]))
        converted = converter.convert(target, model=self.model, config=self.model.config)
        return {name: t[0] if isinstance(t, list) else t for name, t in converted.items()}

    def _fp8_scale(self, key: str) -> TensorInfo | None:
        """The block scales of float8 tensor `key` (its `_scale_inv` sibling), if it is one."""
        info = self.checkpoint.tensors[key]
        if info.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return None
        return self.checkpoint.tensors.get(key + "_scale_inv")

    def _read_dequantized(self, key: str) -> torch.Tensor:
        """Tensor `key` as stored, or, for a block-scaled float8 tensor, its
        values times their block's scale in float32 (as transformers
        dequantizes it; the caller casts to the model's dtype)."""
        tensor = read_tensor(self.checkpoint.tensors[key])
        scale = self._fp8_scale(key)
        if scale is None:
            return tensor
        scales = read_tensor(scale).to(torch.float32)
        rows, cols = tensor.shape[-2:]
        grid_rows, grid_cols = scales.shape[-2:]
        if rows % grid_rows or cols % grid_cols:
            raise StoreError(
                f"{scale.file}: {key}_scale_inv is {list(scales.shape)}, which does not tile {key} "
                f"{list(tensor.shape)} in whole blocks"
            )
        grid = (grid_rows, rows // grid_rows, grid_cols, cols // grid_cols)
        product = tensor.to(torch.float32).view(grid) * scales.view(grid_rows, 1, grid_cols, 1)
        return product.view(rows, cols)

    def quantized_expert_tensors(
        self, target: str, index: int, num_experts: int, kind: str
    ) -> dict[str, torch.Tensor]:
        """One expert's matrix `target` as a checkpoint quantized in `kind`
        ("fp8", "mxfp4") stores it, by suffix: fp8's values ("") and
        "_scale_inv"; mxfp4's "_blocks" and "_scales"."""
        if kind == "mxfp4":
            found = {}
            for suffix in ("_blocks", "_scales"):
                if target + suffix not in self.checkpoint.tensors:
                    raise StoreError(
                        f"{self.checkpoint.path}: the mxfp4 checkpoint has no tensor {target + suffix} for "
                        "the model's experts; it does not match the model config"
                    )
                found[suffix] = read_tensor(self._fused_info(target + suffix, num_experts), row=index)
            return found
        source = self.source(target)
        if source.converter is None:
            [key] = source.keys[None]
            keys = [key]
            rows: int | None = index
        else:
            if not _stacks_whole_tensors(source.converter):
                raise StoreError(
                    f"{self.file_of(target)}: the fp8 experts of {target} are stored in a layout moe-offload "
                    "cannot read yet"
                )
            per_expert = self._per_expert_keys(source, num_experts)
            keys = [per_expert[p][index] for p in source.converter.source_patterns if p in per_expert]
            rows = None
        values, scales = [], []
        for key in keys:
            scale = self._fp8_scale(key)
            if scale is None:
                raise StoreError(
                    f"{self.checkpoint.tensors[key].file}: {key} is not a float8 tensor with block scales "
                    f"({key}_scale_inv) as the checkpoint's fp8 quantization_config says"
                )
            if rows is None:
                values.append(read_tensor(self.checkpoint.tensors[key]))
                scales.append(read_tensor(scale))
            else:
                values.append(read_tensor(self._fused_info(key, num_experts), row=rows))
                scales.append(read_tensor(self._fused_info(key + "_scale_inv", num_experts), row=rows))
        return {"": torch.cat(values), "_scale_inv": torch.cat(scales)}

    def quantized_expert_ranges(
        self, target: str, index: int, num_experts: int, kind: str
    ) -> dict[str, Ranges]:
        """Where `quantized_expert_tensors` finds its tensors in the checkpoint,
        as byte ranges to join, by the same suffixes."""
        if kind == "mxfp4":
            found = {}
            for suffix in ("_blocks", "_scales"):
                info = self._fused_info(target + suffix, num_experts)
                found[suffix] = Ranges([(info, *info.row_range(index))], info.shape[1:])
            return found
        source = self.source(target)
        if source.converter is None:
            [key] = source.keys[None]
            rows: list[TensorInfo] = [self._fused_info(key, num_experts)]
            scales = [self._fused_info(key + "_scale_inv", num_experts)]
            return {
                "": Ranges([(rows[0], *rows[0].row_range(index))], rows[0].shape[1:]),
                "_scale_inv": Ranges([(scales[0], *scales[0].row_range(index))], scales[0].shape[1:]),
            }
        per_expert = self._per_expert_keys(source, num_experts)
        keys = [per_expert[p][index] for p in source.converter.source_patterns if p in per_expert]
        found = {}
        for suffix in ("", "_scale_inv"):
            infos = [self.checkpoint.tensors[key + suffix] for key in keys]
            shape = (sum(info.shape[0] for info in infos), *infos[0].shape[1:])
            found[suffix] = Ranges([(info, info.offset, info.nbytes) for info in infos], shape)
        return found

    def expert_tensor(self, target: str, index: int | None, num_experts: int) -> torch.Tensor:
        """One expert's part of model tensor `target`: its whole value
        (`index` None: one module per expert) or its slice along the fused
        first dimension, converted from that expert's checkpoint tensors only."""
        if index is None:
            return self.tensors(target)[target]
        source = self.source(target)
        if source.converter is None:
            [key] = source.keys[None]
            info = self._fused_info(key, num_experts)
            return read_tensor(info, row=index)
        converter = deepcopy(source.converter)
        for pattern, keys in self._per_expert_keys(source, num_experts).items():
            converter.add_tensor(
                target, keys[index], pattern, read_tensor(self.checkpoint.tensors[keys[index]])
            )
        [stacked] = converter.convert(target, model=self.model, config=self.model.config).values()
        return stacked[0]

    def expert_ranges(
        self, target: str, index: int | None, num_experts: int, dtype: torch.dtype
    ) -> Ranges | None:
        """Where the expert's part of `target` lies in the checkpoint, when
        the checkpoint already stores it in `dtype` as byte ranges to join;
        None when it needs converting."""
        source = self.source(target)
        if index is not None and source.converter is not None:
            if not _stacks_whole_tensors(source.converter):
                return None
            keys = self._per_expert_keys(source, num_experts)
            infos = [
                self.checkpoint.tensors[keys[p][index]] for p in source.converter.source_patterns if p in keys
            ]
            if any(info.dtype != dtype or info.shape[1:] != infos[0].shape[1:] for info in infos):
                return None
            shape = (sum(info.shape[0] for info in infos), *infos[0].shape[1:])
            return Ranges([(info, info.offset, info.nbytes) for info in infos], shape)
        if source.converter is not None:
            return None
        [key] = source.keys[None]
        if index is None:
            info = self.checkpoint.tensors[key]
            return Ranges([(info, info.offset, info.nbytes)], info.shape) if info.dtype == dtype else None
        info = self._fused_info(key, num_experts)
        return Ranges([(info, *info.row_range(index))], info.shape[1:]) if info.dtype == dtype else None

    def _fused_info(self, key: str, num_experts: int) -> TensorInfo:
        info = self.checkpoint.tensors[key]
        if not info.shape or info.shape[0] != num_experts:
            raise StoreError(
                f"{info.file}: tensor {key} has shape {list(info.shape)}, but the model config has "
                f"{num_experts} experts along its first dimension"
            )
        return info

    def _per_expert_keys(self, source: Source, num_experts: int) -> dict[str | None, list[str]]:
        for pattern, keys in source.keys.items():
            if len(keys) != num_experts:
                file = self.checkpoint.tensors[keys[0]].file
                raise StoreError(
                    f"{file}: the checkpoint holds {len(keys)} tensors matching {pattern!r} for "
                    f"{source.target}, but the model config has {num_experts} experts"
                )
        return source.keys


def _stacks_whole_tensors(converter: WeightConverter) -> bool:
    """Whether the converter only stacks per-expert tensors and joins them
    along their first dimension: each expert's result is then its source
    tensors' bytes one after another."""
    ops = converter.operations
    stacks = len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    joins = all(isinstance(op, Concatenate) and op.dim == 1 for op in ops[1:])
    return stacks and joins and len(ops) <= 2
