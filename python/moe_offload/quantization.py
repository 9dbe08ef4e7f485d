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

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_offload._core import MoeOffloadError

SCHEMES = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
# Each value's bit offset in its int32 word, per (bits, device).
_SHIFTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, device)
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 32, bits, dtype=torch.int32, device=device)
    return _SHIFTS[key]


@dataclass(frozen=True)
class Quantization:
    """A quantization scheme: `bits` per weight, one scale per `group_size`
    input features."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def parse(cls, name: str | None, group_size: int | None = None) -> Quantization | None:
        """The scheme `name` ("int8", "int4"; None: no quantization), checked."""
        if name is None:
            if group_size is not None:
                raise MoeOffloadError("group_size is given without quantize: pass quantize='int8' or 'int4'")
            return None
        if name not in SCHEMES:
            raise MoeOffloadError(
                f"quantize={name!r} is not a scheme moe-offload knows: use 'int8' or 'int4'"
            )
        group = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= 1 << 20:
            raise MoeOffloadError(
                f"group_size = {group_size!r} is out of range: use 1 to {1 << 20}, e.g. 128"
            )
        return cls(SCHEMES[name], group)

    def to_json(self) -> dict[str, object]:
        return {"format": "pack-quantized", "scheme": self.name, "group_size": self.group_size}

    @classmethod
    def from_json(cls, meta: dict[str, object]) -> Quantization:
        scheme = cls.parse(str(meta.get("scheme")), meta.get("group_size"))  # type: ignore[arg-type]
        assert scheme is not None
        return scheme


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
            else:
                self.kept[name] = (tuple(shape), dtype)
        if not self.matrices:
            raise MoeOffloadError("these experts have no weight matrix to quantize")

    def blob_tensors(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The tensors of a quantized expert's blob, in order."""
        out: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for m in self.matrices.values():
            rows, cols = m.out_in
            groups = math.ceil(cols / self.scheme.group_size)
            out.append((m.name + "_packed", (rows, math.ceil(cols * self.scheme.bits / 32)), torch.int32))
            out.append((m.name + "_scale", (rows, groups), m.dtype))
        out += [(name, shape, dtype) for name, (shape, dtype) in self.kept.items()]
        return out

    def encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's tensors (as the model holds them) as its blob's."""
        blob: dict[str, torch.Tensor] = {}
        for m in self.matrices.values():
            weight = tensors[m.name].T if m.transposed else tensors[m.name]
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
            weight = dequantize(blob[m.name + "_packed"], blob[m.name + "_scale"], self.scheme, m.out_in, out)
            tensors[m.name] = nn.Parameter(weight.T if m.transposed else weight, requires_grad=False)
        tensors.update({name: blob[name] for name in self.kept})
        return tensors

    @property
    def key(self) -> tuple[tuple[str, tuple[int, int], torch.dtype], ...]:
        """What `decode`'s scratch buffers must be."""
        return tuple((m.name, m.out_in, m.dtype) for m in self.matrices.values())


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
