"""Experts stored as stacked 3-D parameters behind transformers' experts
interface (`@use_experts_implementation`): Mixtral, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2/V3, OLMoE, GPT-OSS.

Rather than patching forward methods, moe-offload registers its own experts
implementation, "moe_offload", and points the experts' config at it. The
implementation runs the same arithmetic as transformers' eager one, expert by
expert in ascending order, with each expert's weights read from its slot."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moe_offload._core import UnsupportedModelError
from moe_offload.adapters.base import (
    ExpertBlock,
    TensorSpec,
    free_storage,
    meta_placeholder,
    refill,
)
from moe_offload.quantization import Quantization

if TYPE_CHECKING:
    from moe_offload.runtime import LayerRuntime

IMPLEMENTATION = "moe_offload"
_KNOWN_TENSORS = {
    "gate_up_proj",
    "gate_up_proj_bias",
    "up_proj",
    "up_proj_bias",
    "down_proj",
    "down_proj_bias",
}


def is_fused_experts(module: nn.Module) -> bool:
    """The experts-interface decorator leaves these attributes on instances."""
    return (
        hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
        and hasattr(module, "config")
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)
        and module.down_proj.dim() == 3
    )


class FusedExperts(ExpertBlock):
    layout = "fused"

    def __init__(self, name: str, module: nn.Module, top_k: int) -> None:
        num_experts = module.down_proj.shape[0]
        super().__init__(name, module, num_experts, top_k)
        if getattr(module, "has_post_expert_norm", False):
            raise UnsupportedModelError(f"{name}: experts with a post-expert norm are not supported yet")
        self.names = [n for n, p in module.named_parameters(recurse=False) if p.shape[:1] == (num_experts,)]
        unknown = set(self.names) - _KNOWN_TENSORS
        scales = {n for n in unknown if n.endswith("_scale_inv")}
        self.weights_transposed = bool(module.is_transposed)
        if scales and scales == unknown:
            self._held_in_fp8(module)
        elif unknown:
            raise UnsupportedModelError(f"{name}: unknown expert tensors {sorted(unknown)}")
        else:
            params = [(n, module._parameters[n]) for n in self.names]
            self._set_specs([(n, tuple(p.shape[1:]), p.dtype) for n, p in params])
        self._originals: dict[str, nn.Parameter] = {}
        self._config_implementation: str | None = None
        # Read before any block is offloaded: the layers share one config,
        # which offloading points at moe-offload's implementation.
        self._model_implementation: str | None = module.config._experts_implementation

    def _held_in_fp8(self, module: nn.Module) -> None:
        """Experts transformers holds in block-scaled fp8 (its `FP8Experts`):
        the blobs hold the module's values and scales as they are, and each
        expert is dequantized to the model's dtype where it runs."""
        block = getattr(module, "block_size", None)
        if not block or getattr(module, "activation_scheme", "dynamic") != "dynamic":
            raise UnsupportedModelError(
                f"{self.name}: fp8 experts without block scales or with static activation scales are not "
                "supported yet"
            )
        dtype = _compute_dtype(module.config)
        matrices = [n for n in self.names if not n.endswith("_scale_inv")]
        self._set_specs([(n, tuple(module._parameters[n].shape[1:]), dtype) for n in matrices])
        self.quantize(Quantization.fp8((block[0], block[1])))
        held = {n: (tuple(module._parameters[n].shape[1:]), module._parameters[n].dtype) for n in self.names}
        if held != {s.name: (s.shape, s.dtype) for s in self.specs}:
            raise UnsupportedModelError(
                f"{self.name}: fp8 experts whose scales do not tile their matrices in whole blocks of "
                f"{list(block)} are not supported yet"
            )
        self.blob_is_parameters = True

    def parameters(self) -> list[nn.Parameter]:
        return [self.module._parameters[n] for n in self.names]

    def parameter_name(self, spec: TensorSpec, expert: int) -> tuple[str, int | None]:
        return f"{self.name}.{spec.name}", expert

    def expert_tensors(self, expert: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        for spec in self.weight_specs:
            yield spec, self.module._parameters[spec.name].data[expert]

    def offload(self, runtime: LayerRuntime) -> None:
        for name in self.names:
            self._originals[name] = self.module._parameters[name]
            self.module._parameters[name] = meta_placeholder(self._originals[name])
            free_storage(self._originals[name])
        self.module._moe_offload = runtime
        config = self.module.config
        self._config_implementation = config._experts_implementation
        config._experts_implementation = IMPLEMENTATION
        stacked = runtime.in_place(self.num_experts) if self.codec is None else None
        if stacked is not None:
            # The model's own implementation, run over the host tier's views.
            original = type(self.module).forward.__wrapped__
            implementation = ALL_EXPERTS_FUNCTIONS.get_interface(self._model_implementation, original)
            self.module._moe_offload_in_place = InPlace(implementation, stacked)

    @property
    def input_features(self) -> int:
        # down_proj maps the intermediate width back to the hidden width.
        [down] = [spec for spec in self.weight_specs if spec.name == "down_proj"]
        return down.shape[1] if self.module.is_transposed else down.shape[0]

    def run_expert(self, expert: int, weights: dict[str, nn.Parameter], states: torch.Tensor) -> torch.Tensor:
        return _expert_output(self.module, states, weights)

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            self.module._parameters[name] = refill(self._originals.pop(name), tensors[name])
        del self.module._moe_offload
        self.module.__dict__.pop("_moe_offload_in_place", None)
        self.module.config._experts_implementation = self._config_implementation


@dataclass(frozen=True)
class InPlace:
    """A layer whose experts all run on the CPU where they lie: the model's
    own experts implementation, and every expert's weights as the stacked
    parameters it expects, viewing the host tier."""

    implementation: Callable[..., torch.Tensor]
    stacked: dict[str, nn.Parameter]

    def run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        placeholders = {name: module._parameters[name] for name in self.stacked}
        module._parameters.update(self.stacked)
        try:
            return self.implementation(module, *args)
        finally:
            module._parameters.update(placeholders)


def _compute_dtype(config: object) -> torch.dtype:
    """The dtype the model computes in, from its config (bfloat16 when unsaid)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def _project(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """The linear map the eager implementation uses for this layout."""
    if transposed:
        return x @ weight + bias if bias is not None else x @ weight
    out = F.linear(x, weight)
    return out + bias if bias is not None else out


def _expert_output(module: nn.Module, state: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert's FFN on the rows routed to it, as the eager implementation
    computes it, on whichever device `state` and `w` are."""
    transposed = module.is_transposed
    if module.has_gate:
        gate_up = _project(state, w["gate_up_proj"], w.get("gate_up_proj_bias"), transposed)
        current = module._apply_gate(gate_up)
    else:
        current = module.act_fn(_project(state, w["up_proj"], w.get("up_proj_bias"), transposed))
    return _project(current, w["down_proj"], w.get("down_proj_bias"), transposed)


def _routing_to_host(
    top_k_index: torch.Tensor, ahead: list[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's routing (tokens, top_k) on the host and, with lookahead
    predictions `ahead`, those too (layers, tokens, top_k): one copy, so the
    lookahead waits for nothing the routing does not."""
    if not ahead:
        return top_k_index.to("cpu", torch.int64).numpy(), None
    for predicted in ahead:
        if predicted.shape != top_k_index.shape:
            raise UnsupportedModelError(
                f"router lookahead: a router chose {tuple(predicted.shape)} expert ids for a layer routed as "
                f"{tuple(top_k_index.shape)}; patch this model without lookahead"
            )
    stacked = torch.stack([t.to(torch.int64) for t in (top_k_index, *ahead)]).to("cpu").numpy()
    return stacked[0], stacked[1:]


def offloaded_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager experts arithmetic, with weights from the cache:
    each expert from its device slot or, where the core places it on the
    CPU, from host memory."""
    runtime: LayerRuntime | None = getattr(self, "_moe_offload", None)
    if runtime is None:
        raise UnsupportedModelError(
            f"{type(self).__name__} uses experts_implementation='{IMPLEMENTATION}' but is not patched; "
            "call moe_offload.patch(model)"
        )
    num_experts = self.down_proj.shape[0]
    # Router lookahead (when on): the next layers' routers on this input.
    ahead = runtime.look_ahead(hidden_states)
    in_place: InPlace | None = self.__dict__.get("_moe_offload_in_place")
    if in_place is not None:
        routing, predicted = _routing_to_host(top_k_index, ahead)
        runtime.observe(routing, predicted)
        counts = np.bincount(routing.ravel(), minlength=num_experts)
        used = np.flatnonzero(counts)
        return runtime.run_in_place(
            used.tolist(),
            counts[used].tolist(),
            lambda: in_place.run(self, hidden_states, top_k_index, top_k_weights),
        )
    final_hidden_states = torch.zeros_like(hidden_states)
    on_host = hidden_states.device.type == "cpu"
    with torch.no_grad():
        # One device-to-host copy per layer: this step's routing (with the
        # lookahead's, when on). It feeds the request tracing and planner,
        # and names the experts to fetch (in the ascending order the eager
        # implementation uses).
        routing, predicted = _routing_to_host(top_k_index, ahead)
        # The (k, token) positions that chose each expert, k-major as the
        # eager implementation's `torch.where` yields them: sorted once per
        # layer (on the device, and on the host for the CPU's experts) and
        # sliced per expert by counts known on the host, so no expert waits
        # for a device-to-host sync.
        tokens = routing.shape[0]
        flat = routing.T.reshape(-1)
        counts = np.bincount(flat, minlength=num_experts + 1)
        starts = np.concatenate(([0], np.cumsum(counts))).tolist()
        if on_host:
            order = torch.from_numpy(np.argsort(flat, kind="stable"))
        else:
            order = torch.argsort(top_k_index.T.reshape(-1), stable=True)
        all_top_k_pos, all_token_idx = order // tokens, order % tokens
    runtime.observe(routing, predicted)
    used = np.flatnonzero(counts[:num_experts]).tolist()
    # Each expert's output, added up at the end in ascending expert order,
    # as the eager implementation adds them, wherever each one ran.
    outputs: dict[int, torch.Tensor] = {}
    # On a GPU, the layer's input and each (k, token) position's token on the
    # host, made when the first expert runs on the CPU.
    host: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_device(expert: int, w: dict[str, nn.Parameter]) -> None:
        token_idx = all_token_idx[starts[expert] : starts[expert + 1]]
        outputs[expert] = _expert_output(self, hidden_states[token_idx], w)

    def on_cpu(expert: int, w: dict[str, nn.Parameter]) -> None:
        if on_host:
            on_device(expert, w)
            return
        if not host:
            # The routing copy above already waited for this layer's input.
            token_of = torch.from_numpy(np.argsort(flat, kind="stable")) % tokens
            host.append((hidden_states.to("cpu"), token_of))
        states, token_of = host[0]
        outputs[expert] = _expert_output(self, states[token_of[starts[expert] : starts[expert + 1]]], w)

    runtime.run(used, counts[used].tolist(), on_device, on_cpu)
    for expert in used:
        top_k_pos = all_top_k_pos[starts[expert] : starts[expert + 1]]
        token_idx = all_token_idx[starts[expert] : starts[expert + 1]]
        current = outputs.pop(expert).to(hidden_states.device)
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
    return final_hidden_states


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, offloaded_experts_forward)
try:  # transformers' fp8 experts choose their implementation from a registry of their own
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

    ALL_FP8_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, offloaded_experts_forward)
except ImportError:
    pass
