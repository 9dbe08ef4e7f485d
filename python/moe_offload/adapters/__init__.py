"""Finding a model's MoE blocks: one adapter per way of storing experts
(its *layout*), recognised from the modules themselves, not class names."""

from __future__ import annotations

from torch import nn

from moe_offload.adapters.base import ExpertBlock, TensorSpec
from moe_offload.adapters.fused import FusedExperts, is_fused_experts
from moe_offload.adapters.modulelist import ExpertContainer, is_expert_container

SUPPORTED_FAMILIES = (
    "Mixtral",
    "Qwen2-MoE",
    "Qwen3-MoE",
    "DeepSeek-V2",
    "DeepSeek-V3",
    "OLMoE",
    "GPT-OSS",
    "Switch Transformers",
    "NLLB-MoE",
)

__all__ = ["SUPPORTED_FAMILIES", "ExpertBlock", "TensorSpec", "find_expert_blocks"]


def find_expert_blocks(model: nn.Module) -> list[ExpertBlock]:
    """The routed-expert blocks of `model`, in module order (which is also
    execution order for the supported families: encoder before decoder)."""
    modules = dict(model.named_modules())
    blocks: list[ExpertBlock] = []
    for name, module in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if is_fused_experts(module):
            blocks.append(FusedExperts(name, module, _top_k(module, parent, model)))
        elif is_expert_container(name, module, parent):
            blocks.append(ExpertContainer(name, module, _top_k(module, parent, model)))
    return blocks


def _top_k(experts: nn.Module, parent: nn.Module | None, model: nn.Module) -> int:
    """Experts one token uses in this layer: from the router, else the config.
    Top-1 / top-2 routers without a `top_k` are told apart by whether they
    pick a second expert (a `second_expert_policy`)."""
    router = getattr(parent, "router", None) or getattr(parent, "gate", None)
    for source in (router, parent, getattr(experts, "config", None), getattr(model, "config", None)):
        for attr in ("top_k", "num_experts_per_tok"):
            value = getattr(source, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return 2 if hasattr(router, "second_expert_policy") else 1
