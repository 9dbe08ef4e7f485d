"""Experts held as a container of identical expert modules (a ModuleDict or
ModuleList): Switch Transformers, NLLB-MoE.

Each expert module keeps running its own forward, so the family's exact
arithmetic (and routing quirks) are untouched: a forward pre-hook swaps the
expert's parameters for views of the slot it was fetched into, and a forward
hook (also called when the forward raises) swaps them back and releases the
slot."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_offload.adapters.base import (
    ExpertBlock,
    TensorSpec,
    free_storage,
    meta_placeholder,
    pack,
    refill,
)

if TYPE_CHECKING:
    from moe_offload.runtime import LayerRuntime


def _signature(module: nn.Module) -> tuple:
    return (type(module),) + tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())


def expert_modules(container: nn.Module) -> list[nn.Module]:
    """The container's children that hold weights (a container may also hold
    parameterless helpers such as a token dropout)."""
    return [c for c in container.children() if next(c.parameters(), None) is not None]


def is_expert_container(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """A container of >= 2 structurally identical weighted modules that a
    routing module (one with a `router`) holds as its `experts`."""
    if not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
        return False
    if parent is None or getattr(parent, "experts", None) is not module or not hasattr(parent, "router"):
        return False
    experts = expert_modules(module)
    if len(experts) < 2:
        return False
    first = _signature(experts[0])
    return all(_signature(c) == first for c in experts[1:])


class ExpertContainer(ExpertBlock):
    layout = "modulelist"

    def __init__(self, name: str, module: nn.Module, top_k: int) -> None:
        self.experts = expert_modules(module)
        super().__init__(name, module, len(self.experts), top_k)
        names = {id(child): child_name for child_name, child in module.named_children()}
        self.child_names = [names[id(expert)] for expert in self.experts]
        params = list(self.experts[0].named_parameters())
        self.specs, self.expert_bytes = pack([(n, tuple(p.shape), p.dtype) for n, p in params])
        self._hooks: list[Any] = []
        self._originals: list[dict[str, nn.Parameter]] = []
        self._placeholders: list[dict[str, nn.Parameter]] = []

    def parameters(self) -> list[nn.Parameter]:
        return [p for expert in self.experts for p in expert.parameters()]

    def parameter_name(self, spec: TensorSpec, expert: int) -> tuple[str, int | None]:
        return f"{self.name}.{self.child_names[expert]}.{spec.name}", None

    def expert_tensors(self, expert: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        params = dict(self.experts[expert].named_parameters())
        for spec in self.specs:
            yield spec, params[spec.name].data

    def offload(self, runtime: LayerRuntime) -> None:
        for index, expert in enumerate(self.experts):
            originals = dict(expert.named_parameters())
            placeholders = {n: meta_placeholder(p) for n, p in originals.items()}
            _install(expert, placeholders)
            for param in originals.values():
                free_storage(param)
            self._originals.append(originals)
            self._placeholders.append(placeholders)
            self._hooks.append(expert.register_forward_pre_hook(_fetch_hook(runtime, index)))
            self._hooks.append(
                expert.register_forward_hook(_release_hook(runtime, index, placeholders), always_call=True)
            )

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for hook in self._hooks:
            hook.remove()
        for index, (expert, originals) in enumerate(zip(self.experts, self._originals, strict=True)):
            restored = {
                name: refill(param, tensors[name][index].clone()) for name, param in originals.items()
            }
            _install(expert, restored)
        self._hooks, self._originals, self._placeholders = [], [], []


def _install(expert: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Points the expert's parameters (dotted names) at `params`."""
    for dotted, param in params.items():
        owner_name, _, leaf = dotted.rpartition(".")
        owner = expert.get_submodule(owner_name) if owner_name else expert
        owner._parameters[leaf] = param


def _fetch_hook(runtime: LayerRuntime, index: int) -> Any:
    def hook(expert: nn.Module, args: Any) -> None:
        _install(expert, runtime.acquire(index))

    return hook


def _release_hook(runtime: LayerRuntime, index: int, placeholders: dict[str, nn.Parameter]) -> Any:
    def hook(expert: nn.Module, args: Any, output: Any) -> None:
        _install(expert, placeholders)
        runtime.release(index)

    return hook
