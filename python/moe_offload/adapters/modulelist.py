"""Experts held as a container of identical expert modules (a ModuleDict or
ModuleList): Switch Transformers, NLLB-MoE.

Each expert module keeps running its own forward, so the family's exact
arithmetic (and routing quirks) are untouched: a forward pre-hook swaps the
expert's parameters for views of the slot it was fetched into (or, for an
expert the core runs on the CPU, of its bytes in host memory, with the input
moved to the CPU), and a forward hook (also called when the forward raises)
swaps them back, releases the slot or host bytes, and moves a CPU result to
the model's device."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_offload.adapters.base import (
    ExpertBlock,
    TensorSpec,
    free_storage,
    meta_placeholder,
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
        self._set_specs([(n, tuple(p.shape), p.dtype) for n, p in params])
        self._hooks: list[Any] = []
        self._originals: list[dict[str, nn.Parameter]] = []
        self._placeholders: list[dict[str, nn.Parameter]] = []

    def parameters(self) -> list[nn.Parameter]:
        return [p for expert in self.experts for p in expert.parameters()]

    def parameter_name(self, spec: TensorSpec, expert: int) -> tuple[str, int | None]:
        return f"{self.name}.{self.child_names[expert]}.{spec.name}", None

    def expert_tensors(self, expert: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        params = dict(self.experts[expert].named_parameters())
        for spec in self.weight_specs:
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
            placed = _Placed()
            self._hooks.append(expert.register_forward_pre_hook(_fetch_hook(runtime, index, placed)))
            self._hooks.append(
                expert.register_forward_hook(
                    _release_hook(runtime, index, placeholders, placed), always_call=True
                )
            )

    @property
    def input_features(self) -> int:
        first = next(m for m in self.experts[0].modules() if isinstance(m, nn.Linear))
        return first.in_features

    def run_expert(self, expert: int, weights: dict[str, nn.Parameter], states: torch.Tensor) -> torch.Tensor:
        # Hooks bypassed: `weights` are the expert's already.
        module = self.experts[expert]
        _install(module, weights)
        try:
            return module.forward(states)
        finally:
            _install(module, self._placeholders[expert])

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


class _Placed:
    """Where the expert's current call runs (set by the pre-hook)."""

    def __init__(self) -> None:
        # Whether a slot or host bytes are held for the call: torch runs the
        # release hook even when the pre-hook raised before holding any.
        self.held = False
        self.on_cpu = False
        self.tokens = 0
        self.started = 0.0
        self.threads = 0  # torch's threads before a CPU run changed them


def _fetch_hook(runtime: LayerRuntime, index: int, placed: _Placed) -> Any:
    def hook(expert: nn.Module, args: Any) -> Any:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        placed.tokens = 1 if first is None or first.dim() < 2 else first.shape[:-1].numel()
        weights, placed.on_cpu = runtime.acquire(index, placed.tokens)
        placed.held = True
        _install(expert, weights)
        placed.threads = torch.get_num_threads()
        if placed.on_cpu and runtime.cpu_threads is not None:
            torch.set_num_threads(runtime.cpu_threads)
        placed.started = time.perf_counter()
        if placed.on_cpu and runtime.device.type != "cpu":
            return tuple(a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args)
        return None

    return hook


def _release_hook(
    runtime: LayerRuntime, index: int, placeholders: dict[str, nn.Parameter], placed: _Placed
) -> Any:
    def hook(expert: nn.Module, args: Any, output: Any) -> Any:
        _install(expert, placeholders)
        if not placed.held:
            return None
        placed.held = False
        elapsed = time.perf_counter() - placed.started
        if torch.get_num_threads() != placed.threads:
            torch.set_num_threads(placed.threads)
        runtime.release(index, placed.on_cpu)
        if not placed.on_cpu:
            return None
        runtime.cache.record_cpu(placed.tokens, elapsed)
        if runtime.device.type != "cpu" and isinstance(output, torch.Tensor):
            return output.to(runtime.device)
        return None

    return hook
