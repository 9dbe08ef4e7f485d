"""Per-request sampling inside transformers' continuous batching.

The batch samples greedily (`do_sample=False` for everyone); a request that
samples gets Gumbel noise added to its logits, and the argmax of logits plus
Gumbel noise is a draw from their softmax. The noise is a hash of (seed, step,
token), not a draw from a generator shared by the batch, so a seed gives the
same tokens whatever else is batched with it, and greedy requests stay
exactly `generate`'s greedy."""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.continuous_batching.requests import FutureRequestState
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

_MASK63 = 0x7FFFFFFFFFFFFFFF
GREEDY = -1  # the noise key of a request that does not sample


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix-style integer hash, elementwise on int64: values in [0, 2^31)."""
    x = ((x ^ (x >> 33)) * 0x62A9D9ED799705F5) & _MASK63
    x = ((x ^ (x >> 28)) * 0x5851F42D4C957F2D) & _MASK63
    return (x ^ (x >> 31)) & 0x7FFFFFFF


def noise_key(seed: int, step: int) -> int:
    """The 31-bit key of one request's noise at one decoding step."""
    return int(_mix(torch.tensor((seed & 0xFFFFFFFF) * 1_000_003 + step, dtype=torch.int64)).item())


class SeededGumbel(ContinuousBatchingLogitsProcessor):
    """Adds Gumbel(0, 1) noise to the logits of requests given a `seed`;
    requests without one are left alone (greedy)."""

    supported_kwargs: dict[str, type] = {"seed": int}
    ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GREEDY)

    def prepare_tensor_args(self, requests_with_new_token: list[FutureRequestState]) -> torch.Tensor:
        keys = []
        for request in requests_with_new_token:
            seed = request.state.logit_processor_kwargs.get("seed")
            keys.append(GREEDY if seed is None else noise_key(seed, request.state.generated_len()))
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        keys = tensor_arg[: scores.size(0)].to(torch.int64)
        token = torch.arange(scores.size(1), device=scores.device, dtype=torch.int64)
        bits = _mix(keys[:, None] * 0x100000001B3 + token[None, :])
        uniform = (bits.to(torch.float64) + 0.5) / 2**31  # in (0, 1): both logs stay finite
        gumbel = -torch.log(-torch.log(uniform)).to(scores.dtype)
        return torch.where((keys >= 0)[:, None], scores + gumbel, scores)


def processors() -> ContinuousBatchingLogitsProcessorList:
    """Temperature, top-p, then the seeded noise; each request sets its own
    `temperature`, `top_p` and (to sample) `seed` as `add_request` kwargs."""
    chain = [
        ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(1.0)),
        ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(1.0)),
        SeededGumbel(),
    ]
    processor_list = ContinuousBatchingLogitsProcessorList(LogitsProcessorList(chain))
    # The constructor counts only the processors it converted itself.
    processor_list.tensors_required = len(chain)
    return processor_list
