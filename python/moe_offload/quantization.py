"""Weight-only integer quantization of experts: int8 and int4, symmetric,
one scale per group of `group_size` input features.

The layout is compressed-tensors' "pack-quantized" one (what llmcompressor
writes and vLLM reads), per expert matrix W of shape [out, in] (the model's
[in, out] matrices, `is_transposed`, are quantized as their transpose):

- `<name>_packed`: each value stored as q + 2^(bits-1) (0..15 for int4,
  0..255 for int8), 32 / bits of them to an int32, the first in the lowest
  bits, rows padded with zeros to whole words ([out, ceil(in * bits / 32)]).
- `<name>_scale`: [out, ceil(in / group_size)] in the model's dtype.
- W[o, i] = q[o, i] * scale[o, i // group_size], q = clamp(round(W / scale),
  -2^(bits-1), 2^(bits-1) - 1), scale = max |W| over the group / (2^bits - 1) * 2.

Expert tensors of one dimension (biases) stay as they are. A quantized
expert's blob holds these tensors; before it runs, it is dequantized into a
scratch buffer on the device where it runs (allocated once, reused)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_offload._core import MoeOffloadError, UnsupportedModelError

SCHEMES = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
FP8_BLOCK = 128  # rows and columns sharing one fp8 scale, as DeepSeek-V3 and Qwen3 FP8 ship
_E4M3_MAX = 448.0
MXFP4_GROUP = 32  # values sharing one scale; two to a byte, so 16 bytes a group
# e2m1 values by their 4-bit code (sign in the top bit).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Each value's bit offset in its int32 word, per (bits, device).
_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 32, bits, dtype=torch.int32, device=device)
    return _SHIFTS[key]


def add_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--quantize and --group-size, for a command that keeps experts as `what` says."""
    parser.add_argument(
        "--quantize",
        choices=(*SCHEMES, "fp8"),
        help=f"{what}, weight-only: int8/int4 with one scale per group of input features, fp8 with one "
        f"per {FP8_BLOCK} x {FP8_BLOCK} block (default: as they are)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        metavar="N",
        help=f"input features per int8/int4 scale (default: {DEFAULT_GROUP_SIZE}; needs --quantize)",
    )


@dataclass(frozen=True)
class Quantization:
    """How expert matrices are quantized. `kind` "int": int8/int4 (`bits`,
    one scale per `group_size` input features); "fp8": block-scaled
    float8_e4m3fn, one float32 scale per `block` of [rows, columns]; both
    made here from unquantized weights or, `shipped`, read from checkpoints
    that ship them so. "mxfp4" (GPT-OSS's e2m1 values, one power-of-two scale
    per 32) is only read as shipped."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    kind: str = "int"
    block: tuple[int, int] | None = None
    # Read from the checkpoint as it ships them, not made here; the same
    # scheme either way (a store compares equal).
    shipped: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        return f"int{self.bits}" if self.kind == "int" else self.kind

    @property
    def from_checkpoint(self) -> bool:
        """Whether experts come quantized from the checkpoint (not made here)."""
        return self.shipped

    @classmethod
    def parse(cls, name: str | None, group_size: int | None = None) -> Quantization | None:
        """The scheme `name` ("int8", "int4", "fp8"; None: no quantization), checked."""
        if name is None:
            if group_size is not None:
                raise MoeOffloadError(
                    "group_size is given without quantize: pass quantize='int8', 'int4' or 'fp8'"
                )
            return None
        if name == "fp8":
            if group_size is not None:
                raise MoeOffloadError(
                    f"group_size does not apply to fp8, which scales blocks of {FP8_BLOCK} x {FP8_BLOCK}"
                )
            return cls.fp8((FP8_BLOCK, FP8_BLOCK))
        if name not in SCHEMES:
            raise MoeOffloadError(
                f"quantize={name!r} is not a scheme moe-offload knows: use 'int8', 'int4' or 'fp8'"
            )
        group = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= 1 << 20:
            raise MoeOffloadError(
                f"group_size = {group_size!r} is out of range: use 1 to {1 << 20}, e.g. 128"
            )
        return cls(SCHEMES[name], group)

    @classmethod
    def fp8(cls, block: tuple[int, int], shipped: bool = False) -> Quantization:
        return cls(8, block[1], "fp8", (int(block[0]), int(block[1])), shipped)

    @classmethod
    def mxfp4(cls) -> Quantization:
        return cls(4, MXFP4_GROUP, "mxfp4", shipped=True)

    def to_json(self) -> dict[str, object]:
        if self.kind == "fp8":
            return {"format": "fp8-block", "scheme": "fp8", "block": list(self.block or ())}
        if self.kind == "mxfp4":
            return {"format": "mxfp4", "scheme": "mxfp4"}
        return {"format": "pack-quantized", "scheme": self.name, "group_size": self.group_size}

    @classmethod
    def from_json(cls, meta: dict[str, object]) -> Quantization:
        scheme = meta.get("scheme")
        if scheme == "fp8":
            block = meta.get("block")
            if not (
                isinstance(block, list)
                and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)
            ):
                raise MoeOffloadError(f"an fp8 scheme needs a block of two positive sizes, not {block!r}")
            return cls.fp8((block[0], block[1]))
        if scheme == "mxfp4":
            return cls.mxfp4()
        parsed = cls.parse(str(scheme), meta.get("group_size"))  # type: ignore[arg-type]
        assert parsed is not None
        return parsed


@dataclass(frozen=True)
class QuantizedMatrix:
    """One expert matrix as its blob holds it quantized."""

    name: str
    shape: tuple[int, int]  # as the model holds it
    dtype: torch.dtype  # the model's
    transposed: bool  # the model holds [in, out]

    @property
    def out_in(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape


class ExpertCodec:
    """How a quantized expert's tensors map to and from its blob's tensors."""

    def __init__(
        self,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        transposed: bool,
        scheme: Quantization,
    ) -> None:
        self.scheme = scheme
        self.matrices: dict[str, QuantizedMatrix] = {}
        self.kept: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape, dtype in tensors:
            if len(shape) == 2 and dtype.is_floating_point:
                self.matrices[name] = QuantizedMatrix(name, (shape[0], shape[1]), dtype, transposed)
                self._check_fits(self.matrices[name])
            else:
                self.kept[name] = (tuple(shape), dtype)
        if not self.matrices:
            raise MoeOffloadError("these experts have no weight matrix to quantize")
        # What `decode`'s scratch buffers must be; looked up once per expert run.
        self.key = tuple((m.name, m.out_in, m.dtype) for m in self.matrices.values())

    def _check_fits(self, matrix: QuantizedMatrix) -> None:
        rows, cols = matrix.out_in
        if self.scheme.kind == "fp8":
            assert self.scheme.block is not None
            block_rows, block_cols = self.scheme.block
            if rows % block_rows or cols % block_cols:
                raise MoeOffloadError(
                    f"expert matrix {matrix.name} is {rows} x {cols}, which fp8 blocks of "
                    f"{block_rows} x {block_cols} do not tile; such checkpoints are not supported yet"
                )
        elif self.scheme.kind == "mxfp4" and cols % MXFP4_GROUP:
            raise MoeOffloadError(
                f"expert matrix {matrix.name} has {cols} input features, not a multiple of "
                f"{MXFP4_GROUP} as mxfp4 needs"
            )

    def blob_tensors(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The tensors of a quantized expert's blob, in order."""
        out: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for m in self.matrices.values():
            out += self._matrix_tensors(m)
        out += [(name, shape, dtype) for name, (shape, dtype) in self.kept.items()]
        return out

    def _matrix_tensors(self, m: QuantizedMatrix) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        rows, cols = m.out_in
        scheme = self.scheme
        if scheme.kind == "fp8":
            assert scheme.block is not None
            scales = (rows // scheme.block[0], cols // scheme.block[1])
            return [
                (m.name, (rows, cols), torch.float8_e4m3fn),
                (m.name + "_scale_inv", scales, torch.float32),
            ]
        if scheme.kind == "mxfp4":
            groups = cols // MXFP4_GROUP
            return [
                (m.name + "_blocks", (rows, groups, MXFP4_GROUP // 2), torch.uint8),
                (m.name + "_scales", (rows, groups), torch.uint8),
            ]
        groups = math.ceil(cols / scheme.group_size)
        return [
            (m.name + "_packed", (rows, math.ceil(cols * scheme.bits / 32)), torch.int32),
            (m.name + "_scale", (rows, groups), m.dtype),
        ]

    def encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's tensors (as the model holds them) as its blob's."""
        if self.scheme.kind == "mxfp4":
            raise MoeOffloadError(
                "mxfp4 experts are read from checkpoints that ship them; moe-offload quantizes to int8, "
                "int4 or fp8"
            )
        blob: dict[str, torch.Tensor] = {}
        for m in self.matrices.values():
            weight = tensors[m.name].T if m.transposed else tensors[m.name]
            if self.scheme.kind == "fp8":
                assert self.scheme.block is not None
                blob[m.name], blob[m.name + "_scale_inv"] = quantize_fp8(weight, self.scheme.block)
            else:
                blob[m.name + "_packed"], blob[m.name + "_scale"] = quantize(weight, self.scheme, m.dtype)
        blob.update({name: tensors[name] for name in self.kept})
        return blob

    def decode(
        self, blob: dict[str, nn.Parameter], scratch: dict[str, torch.Tensor] | None = None
    ) -> dict[str, nn.Parameter]:
        """One expert's tensors as the model holds them, from its blob's
        (views of a slot or of host memory); each matrix is written into
        `scratch[name]` ([out, in], on the blob's device) when given."""
        tensors: dict[str, nn.Parameter] = {}
        for m in self.matrices.values():
            out = None if scratch is None else scratch[m.name]
            weight = self._dequantize(m, blob, out)
            tensors[m.name] = nn.Parameter(weight.T if m.transposed else weight, requires_grad=False)
        tensors.update({name: blob[name] for name in self.kept})
        return tensors

    def _dequantize(
        self, m: QuantizedMatrix, blob: dict[str, nn.Parameter], out: torch.Tensor | None
    ) -> torch.Tensor:
        if self.scheme.kind == "fp8":
            assert self.scheme.block is not None
            return dequantize_fp8(blob[m.name], blob[m.name + "_scale_inv"], self.scheme.block, m.dtype, out)
        if self.scheme.kind == "mxfp4":
            return dequantize_mxfp4(blob[m.name + "_blocks"], blob[m.name + "_scales"], m.dtype, out)
        return dequantize(blob[m.name + "_packed"], blob[m.name + "_scale"], self.scheme, m.out_in, out)


class Scratch:
    """Dequantization buffers: one expert's matrices per device and expert
    shape, allocated on first use and reused by every layer (one pass runs
    at a time, and a device runs its work in order)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, tuple], dict[str, torch.Tensor]] = {}

    def for_codec(self, codec: ExpertCodec, device: torch.device) -> dict[str, torch.Tensor]:
        key = (str(device), codec.key)
        if key not in self._buffers:
            self._buffers[key] = {
                name: torch.empty(shape, dtype=dtype, device=device) for name, shape, dtype in codec.key
            }
        return self._buffers[key]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for buffers in self._buffers.values() for t in buffers.values())


def quantize(
    weight: torch.Tensor, scheme: Quantization, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed values, scales) of `weight` [out, in]; scales in `dtype`."""
    rows, cols = weight.shape
    group = scheme.group_size
    groups = math.ceil(cols / group)
    padded = torch.zeros(rows, groups * group, dtype=torch.float32, device=weight.device)
    padded[:, :cols] = weight.float()
    grouped = padded.view(rows, groups, group)
    levels = (1 << scheme.bits) - 1  # the span of the integer range, e.g. 15 for -8..7
    scale = (grouped.abs().amax(-1) / (levels / 2)).to(dtype)
    # A group of zeros gets scale 0; its values are 0 whatever q is.
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).float().unsqueeze(-1)
    low, high = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    q = torch.round(grouped / divisor).clamp_(low, high).view(rows, -1)[:, :cols].to(torch.int64)
    return _pack(q - low, scheme.bits), scale


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] of 0..2^bits - 1 into [rows, ceil(cols * bits / 32)]
    int32, 32 / bits to a word, the first in the lowest bits."""
    rows, cols = values.shape
    per_word = 32 // bits
    words = math.ceil(cols / per_word)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64, device=values.device)
    padded[:, :cols] = values
    shifts = _shifts(bits, values.device).to(torch.int64)
    packed = (padded.view(rows, words, per_word) << shifts).sum(-1)
    # A top value of 2^(bits-1) or more makes a word of 2^31 or more: the
    # same 32 bits as a negative int32.
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    scheme: Quantization,
    out_in: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [out, in] matrix in `scale`'s dtype, written into `out` when given."""
    rows, cols = out_in
    bits = scheme.bits
    # Arithmetic shifts sign-extend the top value; the mask drops that.
    fields = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & ((1 << bits) - 1)
    values = (fields.view(rows, -1)[:, :cols] - (1 << (bits - 1))).to(scale.dtype)
    group = scheme.group_size
    if out is None:
        out = torch.empty(rows, cols, dtype=scale.dtype, device=packed.device)
    if cols % group == 0:
        torch.mul(values.view(rows, -1, group), scale.unsqueeze(-1), out=out.view(rows, -1, group))
    else:
        torch.mul(values, scale.repeat_interleave(group, dim=1)[:, :cols], out=out)
    return out


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [rows, cols] as block-scaled float8_e4m3fn: the values and
    each block's float32 scale (its largest magnitude / 448, e4m3's largest)."""
    rows, cols = weight.shape
    grid = weight.float().view(rows // block[0], block[0], cols // block[1], block[1])
    scale_inv = grid.abs().amax(dim=(1, 3)) / _E4M3_MAX
    divisor = torch.where(scale_inv == 0, torch.ones_like(scale_inv), scale_inv)[:, None, :, None]
    values = (grid / divisor).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return values.view(rows, cols), scale_inv


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A block-scaled float8 matrix [rows, cols] in `dtype`: each value times
    its block's float32 scale, in float32, rounded once (as transformers
    dequantizes these checkpoints)."""
    rows, cols = weight.shape
    grid = (rows // block[0], block[0], cols // block[1], block[1])
    product = weight.to(torch.float32).view(grid) * scale_inv.view(grid[0], 1, grid[2], 1)
    if out is None:
        return product.view(rows, cols).to(dtype)
    return out.copy_(product.view(rows, cols))


_FP4_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """An mxfp4 matrix [rows, groups * 32] in `dtype` from its `blocks`
    [rows, groups, 16] (the even value in the low four bits) and `scales`
    [rows, groups] (exponents biased by 127): the e2m1 value in `dtype`,
    scaled by its power of two (as transformers dequantizes GPT-OSS)."""
    rows, groups, half = blocks.shape
    key = (dtype, blocks.device)
    if key not in _FP4_TABLES:
        _FP4_TABLES[key] = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    table = _FP4_TABLES[key]
    if out is None:
        out = torch.empty(rows, groups * half * 2, dtype=dtype, device=blocks.device)
    values = out.view(rows * groups, half * 2)
    flat = blocks.reshape(rows * groups, half)
    values[:, 0::2] = table[(flat & 0x0F).to(torch.int)]
    values[:, 1::2] = table[(flat >> 4).to(torch.int)]
    torch.ldexp(values, scales.reshape(rows * groups, 1).to(torch.int32) - 127, out=values)
    return out


def checkpoint_quantization(config: object) -> Quantization | None:
    """How a checkpoint's config says its experts ship quantized: fp8
    (block-scaled) or mxfp4, read as they are; None when unquantized. Any
    other method is refused with what moe-offload reads instead."""
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    settings = found if isinstance(found, dict) else found.to_dict()
    method = settings.get("quant_method")
    if method == "mxfp4":
        return Quantization.mxfp4()
    if method == "fp8":
        block = settings.get("weight_block_size")
        scale_fmt, expert_dtype = settings.get("scale_fmt", "float"), settings.get("expert_dtype", "fp8")
        unsupported = [
            what
            for what, ok in (
                ("per-tensor scales (no weight_block_size)", block is not None),
                (f"scale_fmt {scale_fmt!r}", scale_fmt == "float"),
                (f"expert_dtype {expert_dtype!r}", expert_dtype == "fp8"),
            )
            if not ok
        ]
        if unsupported:
            raise UnsupportedModelError(f"fp8 checkpoints with {unsupported[0]} are not supported yet")
        assert block is not None
        return Quantization.fp8((block[0], block[1]), shipped=True)
    raise UnsupportedModelError(
        f"checkpoints quantized with {method!r} are not supported yet: moe-offload reads block-scaled "
        "fp8 and mxfp4 checkpoints as they ship, and quantizes unquantized ones itself "
        "(quantize='int8' or 'int4')"
    )
