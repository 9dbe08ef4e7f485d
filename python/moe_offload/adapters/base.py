"""What every adapter provides: one MoE layer's routed experts, described as
fixed-size blobs the core can store, and a way to run them from device slots."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_offload.quantization import ExpertCodec, Quantization

if TYPE_CHECKING:
    from moe_offload.runtime import LayerRuntime

# Tensors inside a blob start on this boundary, so slot views are aligned
# for any dtype and for vectorised GPU loads.
TENSOR_ALIGN = 256


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an expert: where it sits in the expert's blob."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def pack(tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> tuple[tuple[TensorSpec, ...], int]:
    """Lays tensors out back to back, each aligned; returns specs and blob bytes."""
    specs = []
    offset = 0
    for name, shape, dtype in tensors:
        specs.append(TensorSpec(name, tuple(shape), dtype, offset))
        offset += math.prod(shape) * dtype.itemsize
        offset = -(-offset // TENSOR_ALIGN) * TENSOR_ALIGN
    return tuple(specs), max(offset, 1)


def meta_placeholder(param: nn.Parameter) -> nn.Parameter:
    """A parameter of the same shape and dtype that holds no memory: any use
    outside moe-offload's forward path fails loudly instead of reading zeros."""
    return nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)


def free_storage(param: nn.Parameter) -> None:
    """Releases the memory behind an offloaded parameter (kept as an object,
    without data, for `unpatch` to refill): the host tier now holds its values."""
    if param.is_meta:
        return
    try:
        param.untyped_storage().resize_(0)
    except RuntimeError:
        pass  # storage that cannot shrink (e.g. memory-mapped) is left to its owner


def refill(param: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    """`param` holding `value` again: the same object when it had memory, a
    new parameter when it never had any (a model built on the meta device)."""
    if param.is_meta:
        return nn.Parameter(value, requires_grad=param.requires_grad)
    param.data = value
    return param


class ExpertBlock(ABC):
    """The routed experts of one MoE layer, as a module of the model holds them.

    `weight_specs` are an expert's tensors as the model holds them; `specs`
    (and `expert_bytes`) its blob's, which differ once `quantize` has set a
    `codec` that maps one to the other."""

    layout: str = ""
    weights_transposed = False  # whether the model holds matrices as [in, out]
    # Whether the module's own parameters are the blob's tensors (experts the
    # model already holds quantized), not the weights the codec decodes to.
    blob_is_parameters = False

    def __init__(self, name: str, module: nn.Module, num_experts: int, top_k: int) -> None:
        self.name = name
        self.module = module
        self.num_experts = num_experts
        self.top_k = top_k
        self.specs: tuple[TensorSpec, ...] = ()
        self.weight_specs: tuple[TensorSpec, ...] = ()
        self.expert_bytes = 0
        self.codec: ExpertCodec | None = None

    def _set_specs(self, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        self.specs, self.expert_bytes = pack(tensors)
        self.weight_specs = self.specs

    def quantize(self, scheme: Quantization) -> None:
        """Its experts' blobs hold their matrices quantized with `scheme`."""
        tensors = [(s.name, s.shape, s.dtype) for s in self.weight_specs]
        self.codec = ExpertCodec(tensors, self.weights_transposed, scheme)
        self.specs, self.expert_bytes = pack(self.codec.blob_tensors())

    def blob_tensors(self, expert: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """The expert's blob tensors, one per spec (quantized as the codec says)."""
        if self.blob_is_parameters:
            for spec in self.specs:
                yield spec, self.module._parameters[spec.name].data[expert]
            return
        if self.codec is None:
            yield from self.expert_tensors(expert)
            return
        encoded = self.codec.encode({spec.name: t for spec, t in self.expert_tensors(expert)})
        for spec in self.specs:
            yield spec, encoded[spec.name]

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter that moves to the host tier."""

    @abstractmethod
    def parameter_name(self, spec: TensorSpec, expert: int) -> tuple[str, int | None]:
        """The model parameter (full name) that holds weight spec `spec` of `expert`, and
        the expert's index along its first dimension when experts are fused."""

    @abstractmethod
    def expert_tensors(self, expert: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """The expert's current tensors (before offloading), one per weight spec."""

    @abstractmethod
    def offload(self, runtime: LayerRuntime) -> None:
        """Frees the module's expert weights and routes its compute through `runtime`."""

    @property
    @abstractmethod
    def input_features(self) -> int:
        """Width of the hidden states an expert takes."""

    @abstractmethod
    def run_expert(self, expert: int, weights: dict[str, nn.Parameter], states: torch.Tensor) -> torch.Tensor:
        """The expert's output for `states` (tokens x features), computed
        with `weights` (views of its blob) as the model computes it."""

    @abstractmethod
    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Puts ordinary parameters back; `tensors[spec.name]` stacks every expert's values."""
