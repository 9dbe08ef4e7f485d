"""Tiny random models of every supported family, built from transformers
configs (no downloads). Sizes are small enough for fast CPU tests while
keeping each family's real structure (shared experts, dense first layers,
encoder-decoder, biases, sliding windows)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

COMMON = dict(vocab_size=96, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(COMMON, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def _mixtral() -> tf.PreTrainedModel:
    config = tf.MixtralConfig(**DECODER, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    return tf.MixtralForCausalLM(config)


def _qwen2_moe() -> tf.PreTrainedModel:
    config = tf.Qwen2MoeConfig(
        **DECODER,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
    )
    return tf.Qwen2MoeForCausalLM(config)


def _qwen3_moe() -> tf.PreTrainedModel:
    config = tf.Qwen3MoeConfig(
        **DECODER,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
    )
    return tf.Qwen3MoeForCausalLM(config)


def _deepseek_v2() -> tf.PreTrainedModel:
    config = tf.DeepseekV2Config(
        **dict(DECODER, num_key_value_heads=4),
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
    )
    return tf.DeepseekV2ForCausalLM(config)


def _deepseek_v3() -> tf.PreTrainedModel:
    config = tf.DeepseekV3Config(
        **dict(DECODER, num_key_value_heads=4),
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=2,
        topk_group=1,
    )
    return tf.DeepseekV3ForCausalLM(config)


def _olmoe() -> tf.PreTrainedModel:
    config = tf.OlmoeConfig(**DECODER, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    return tf.OlmoeForCausalLM(config)


def _gpt_oss() -> tf.PreTrainedModel:
    config = tf.GptOssConfig(
        **DECODER,
        head_dim=8,
        intermediate_size=24,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return tf.GptOssForCausalLM(config)


def _switch() -> tf.PreTrainedModel:
    config = tf.SwitchTransformersConfig(
        **COMMON,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=8,
        expert_capacity=64,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        decoder_start_token_id=0,
    )
    return tf.SwitchTransformersForConditionalGeneration(config)


def _nllb_moe() -> tf.PreTrainedModel:
    config = tf.NllbMoeConfig(
        **COMMON,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=40,
        num_experts=4,
        expert_capacity=64,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
        decoder_start_token_id=2,
    )
    return tf.NllbMoeForConditionalGeneration(config)


FAMILIES: dict[str, Callable[[], tf.PreTrainedModel]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
    "switch_transformers": _switch,
    "nllb_moe": _nllb_moe,
}
ENCODER_DECODER = {"switch_transformers", "nllb_moe"}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> tf.PreTrainedModel:
    """A tiny random `family` model in eval mode. Weights are re-drawn with a
    wide normal so routing is decisive (no near-ties) and logits differ."""
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
            elif "norm" not in name and "layer_norm" not in name:
                param.normal_(0.0, 0.02)
    return model.to(dtype)


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of routed experts (shared experts excluded)."""
    total = 0
    for name, param in model.named_parameters():
        if (
            ".experts." in name
            or name.endswith(".experts.gate_up_proj")
            or name.endswith(".experts.down_proj")
        ):
            total += param.numel() * param.element_size()
    return total


def greedy(model: torch.nn.Module, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of exactly `new_tokens` tokens: the sequences and
    the logits of every step."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits)


def prompt(family: str, seed: int = 0, length: int = 8) -> dict[str, torch.Tensor]:
    """Generation inputs: a random prompt (decoder-only) or source (encoder-decoder)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, COMMON["vocab_size"], (1, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "a cache of experts keeps the hot ones close",
    "user asks and assistant answers : hello there",
)


def word_tokenizer(vocab_size: int = COMMON["vocab_size"]) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly `vocab_size` distinct words (so
    every id a tiny model can emit decodes to its own word), built offline
    from a few sentences plus filler words, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos as in COMMON
    for word in " ".join(SENTENCES).split():
        if word not in words:
            words.append(word)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
