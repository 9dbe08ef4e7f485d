"""DeepSeek-V2/V3's latent attention in transformers' paged KV cache.

These models cache two compressed latents per token (one of `kv_lora_rank`
values, one of `qk_rope_head_dim`) where other models cache keys and values;
the paged cache sizes both slots from the config as `num_key_value_heads` ×
`head_dim`. Each latent is zero-padded to that width on the way in and cut
back on the way out, so the model computes on exactly the values it would
cache alone (the padding is never read)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation.continuous_batching.cache import PagedAttentionCache

from moe_offload._core import MoeOffloadError


def _latent_attention(module: nn.Module) -> bool:
    return hasattr(module, "kv_lora_rank") and hasattr(module, "kv_a_proj_with_mqa")


class LatentPagedCache:
    """The batch's paged cache as one latent-attention layer sees it: each
    latent `[1, 1, tokens, width]` is stored as `[1, heads, tokens, head_dim]`."""

    def __init__(self, cache: PagedAttentionCache, heads: int, head_dim: int) -> None:
        self.cache = cache
        self.heads = heads
        self.head_dim = head_dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def update(
        self, k_nope: torch.Tensor, k_rope: torch.Tensor, layer_idx: int, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if kwargs.get("block_table") is not None:
            raise MoeOffloadError(
                "latent attention cannot use the paged cache's block tables (a flash attention kernel); "
                "serve it with the sdpa or eager attention implementation"
            )
        nope, rope = self.cache.update(self._pack(k_nope), self._pack(k_rope), layer_idx, kwargs=kwargs)
        return self._unpack(nope, k_nope.shape[-1]), self._unpack(rope, k_rope.shape[-1])

    def _pack(self, latent: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, width = latent.shape
        padded = F.pad(latent, (0, self.heads * self.head_dim - width))
        return padded.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def _unpack(self, stored: torch.Tensor, width: int) -> torch.Tensor:
        batch, heads, tokens, head_dim = stored.shape
        return stored.transpose(1, 2).reshape(batch, tokens, heads * head_dim)[..., :width].unsqueeze(1)


def fit_latent_attention(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Lets `model`'s latent-attention layers (if any) run on the paged cache;
    returns the hooks (remove them to undo). A latent wider than a token's
    cache slot is refused with the reason."""
    layers = [m for m in model.modules() if _latent_attention(m)]
    if not layers:
        return []
    config = model.config.get_text_config()
    heads, head_dim = config.num_key_value_heads, config.head_dim
    widest = max(config.kv_lora_rank, config.qk_rope_head_dim)
    if widest > heads * head_dim:
        raise MoeOffloadError(
            f"{config.model_type} cannot be served: its latent of {widest} values per token does not fit the "
            f"batching engine's cache slot of {heads} heads × {head_dim} (num_key_value_heads × head_dim)"
        )

    def swap_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, PagedAttentionCache):
            key = "cache" if "cache" in kwargs else "past_key_values"
            kwargs[key] = LatentPagedCache(cache, heads, head_dim)
        return args, kwargs

    return [m.register_forward_pre_hook(swap_cache, with_kwargs=True) for m in layers]
