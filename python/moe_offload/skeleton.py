"""A model built from its config without weights (on the meta device), and
the facts about its experts that conversion and loading share."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from moe_offload._core import MoeOffloadError, UnsupportedModelError
from moe_offload.adapters import SUPPORTED_FAMILIES, ExpertBlock, find_expert_blocks


def resolve_dtype(dtype: str | torch.dtype | None, config: PretrainedConfig) -> torch.dtype:
    """`dtype` as a torch floating dtype; by default the config's, else float32."""
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MoeOffloadError(
            f"dtype={dtype!r} is not a floating torch dtype such as 'bfloat16' or 'float32'"
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """How the store index writes a dtype, e.g. "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def build_skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model class the config names, built on the meta device: every
    parameter has its shape and dtype but no memory."""
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if cls is not None:
            model = cls._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def expert_blocks(model: PreTrainedModel) -> list[ExpertBlock]:
    blocks = find_expert_blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE block moe-offload can offload. "
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    return blocks


def expert_parameter_names(blocks: list[ExpertBlock]) -> set[str]:
    """Full names of every parameter that holds routed experts."""
    return {
        block.parameter_name(spec, expert)[0]
        for block in blocks
        for spec in block.weight_specs
        for expert in range(block.num_experts)
    }
