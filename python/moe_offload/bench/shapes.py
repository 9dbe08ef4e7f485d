"""Real MoE model shapes, built with random weights from their published
configurations, optionally scaled down (fewer layers, a narrower hidden
size, fewer experts) to run on a CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf

from moe_offload._core import MoeOffloadError


@dataclass(frozen=True)
class Shape:
    """A model's configuration and which fields scale with it."""

    config_class: type
    config: dict[str, Any]
    #: MoE layers = hidden layers - dense_layers.
    dense_layers: int = 0
    experts_key: str = "num_local_experts"
    #: Widths scaled with the hidden size (heads keep their dimension).
    widths: tuple[str, ...] = ()


SHAPES: dict[str, Shape] = {
    "mixtral-8x7b": Shape(
        tf.MixtralConfig,
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=4096,
        ),
        widths=("intermediate_size",),
    ),
    "deepseek-v2-lite": Shape(
        tf.DeepseekV2Config,
        dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            max_position_embeddings=4096,
        ),
        dense_layers=1,
        experts_key="n_routed_experts",
        widths=("intermediate_size", "moe_intermediate_size", "kv_lora_rank"),
    ),
    "qwen3-30b-a3b": Shape(
        tf.Qwen3MoeConfig,
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            max_position_embeddings=4096,
        ),
        experts_key="num_experts",
        widths=("intermediate_size", "moe_intermediate_size"),
    ),
}

# A scaled-down model also gets a small vocabulary: the output layer would
# otherwise dominate its time.
SCALED_VOCAB = 4096


def config_for(
    name: str, layers: int | None = None, hidden: int | None = None, experts: int | None = None
) -> tf.PretrainedConfig:
    """The configuration of shape `name`, with `layers` MoE layers, hidden
    size `hidden` and `experts` routed experts when given."""
    if name not in SHAPES:
        raise MoeOffloadError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    shape = SHAPES[name]
    values = dict(shape.config)
    if layers is not None:
        if layers < 1:
            raise MoeOffloadError(f"--layers {layers}: a model needs at least 1 MoE layer")
        values["num_hidden_layers"] = shape.dense_layers + layers
    if experts is not None:
        top_k = values["num_experts_per_tok"]
        if experts < top_k:
            raise MoeOffloadError(
                f"--experts {experts}: {name} routes each token to {top_k} experts; use at least {top_k}"
            )
        values[shape.experts_key] = experts
    if hidden is not None and hidden != values["hidden_size"]:
        if hidden < 8 or hidden % 8:
            raise MoeOffloadError(f"--hidden {hidden}: use a positive multiple of 8, e.g. 512")
        factor = hidden / values["hidden_size"]
        for key in shape.widths:
            values[key] = max(8, round(values[key] * factor / 8) * 8)
        heads, kv = _scaled_heads(values, hidden, factor)
        values.update(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=hidden)
        values["vocab_size"] = min(values["vocab_size"], SCALED_VOCAB)
    return shape.config_class(**values)


def _scaled_heads(values: dict[str, Any], hidden: int, factor: float) -> tuple[int, int]:
    """(attention heads, key/value heads) scaled by `factor`, lowered to the
    nearest that transformers takes: heads divide the hidden size, and where
    the head size is derived from them, the rotary embedding wants it even.
    One head of each always fits (the hidden size is a multiple of 8)."""
    derived = "head_dim" not in values and "v_head_dim" not in values
    for kv in range(max(1, round(values["num_key_value_heads"] * factor)), 0, -1):
        heads = max(kv, round(values["num_attention_heads"] * factor) // kv * kv)
        for candidate in range(heads, 0, -kv):
            if hidden % candidate == 0 and not (derived and hidden // candidate % 2):
                return candidate, kv
    return 1, 1


def routing_shape(config: tf.PretrainedConfig, name: str) -> tuple[int, int, int]:
    """(MoE layers, routed experts per layer, top-k) of shape `name` at `config`."""
    experts = getattr(config, SHAPES[name].experts_key)
    return moe_layers(config, name), experts, config.num_experts_per_tok


def build(config: tf.PretrainedConfig, dtype: torch.dtype, seed: int = 0) -> tf.PreTrainedModel:
    """A model of `config` with random weights, in eval mode, on the CPU."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def moe_layers(config: tf.PretrainedConfig, name: str) -> int:
    return config.num_hidden_layers - SHAPES[name].dense_layers
