"""Quantized experts (int8, int4): the blob layout, the error bound, the same
tokens as the model whose weights are the dequantized ones, through `patch`
and through a quantized expert store, and the sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, build, greedy, prompt

import moe_offload
from moe_offload import MoeOffloadError, StoreError
from moe_offload.adapters import find_expert_blocks
from moe_offload.conversion import convert
from moe_offload.quantization import Quantization, dequantize, quantize
from moe_offload.skeleton import build_skeleton, expert_blocks

SCHEMES = ["int8", "int4"]
GROUP = 8  # the tiny models' widths are 24 to 64


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_weight_is_within_half_a_step_of_its_group(bits, dtype):
    generator = torch.Generator().manual_seed(bits)
    weight = (torch.randn(12, 45, generator=generator) * torch.linspace(0.01, 3, 45)).to(dtype)
    weight[3, 16:32] = 0  # a group of zeros
    scheme = Quantization(bits, 16)
    packed, scale = quantize(weight, scheme, dtype)
    assert scale.shape == (12, 3) and scale.dtype == dtype
    assert packed.shape == ((12, 12) if bits == 8 else (12, 6)) and packed.dtype == torch.int32
    restored = dequantize(packed, scale, scheme, (12, 45))
    step = scale.float().repeat_interleave(16, dim=1)[:, :45]
    error = (restored.float() - weight.float()).abs()
    # Half a step, plus the rounding of the product to `dtype`.
    assert (error <= step / 2 + weight.float().abs() * torch.finfo(dtype).eps).all()
    assert (restored[3, 16:32] == 0).all()
    assert error.max() > 0  # it did quantize


def test_int4_values_are_packed_eight_to_an_int32_lowest_bits_first():
    # One group whose largest magnitude is 7.5: scale 7.5 / 7.5 = 1, and the
    # values quantize to -8 (-7.5 rounds to even), -7, ..., 7.
    weight = torch.tensor([[-7.5, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7]])
    packed, scales = quantize(weight, Quantization(4, 16), torch.float32)
    assert scales.tolist() == [[1.0]]
    # q + 8 = 0..15: nibble i of word w holds value 8 w + i.
    assert packed.tolist() == [[0x76543210, 0xFEDCBA98 - (1 << 32)]]


def test_int8_values_are_offset_and_packed_four_to_an_int32():
    weight = torch.tensor([[-127.5, -1.0, 0.0, 1.0, 127.0, 2.0]])
    packed, scales = quantize(weight, Quantization(8, 8), torch.float32)
    assert scales.tolist() == [[1.0]]
    # q + 128 = 0, 127, 128, 129 | 255, 130 (and two zeros of padding).
    assert packed.tolist() == [[0x81807F00 - (1 << 32), 0x000082FF]]


def _dequantized_copy(model: torch.nn.Module, scheme: Quantization) -> torch.nn.Module:
    """The plain model whose expert matrices are their quantized-then-dequantized values."""
    twin = copy.deepcopy(model)
    for block in find_expert_blocks(twin):
        block.quantize(scheme)
        for expert in range(block.num_experts):
            tensors = dict(block.expert_tensors(expert))
            decoded = block.codec.decode(block.codec.encode({s.name: t for s, t in tensors.items()}))
            for spec, tensor in tensors.items():
                tensor.copy_(decoded[spec.name])
    return twin


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_quantized_patch_gives_the_dequantized_models_tokens(family, scheme_name):
    scheme = Quantization.parse(scheme_name, GROUP)
    model = build(family)
    inputs = prompt(family)
    with torch.no_grad():
        twin = _dequantized_copy(model, scheme)
    want, _ = greedy(twin, inputs, 5)
    offloader = moe_offload.patch(model, device="cpu", quantize=scheme_name, group_size=GROUP)
    assert offloader.stats()["quantization"] == scheme_name
    got, _ = greedy(model, inputs, 5)
    assert torch.equal(got, want)
    moe_offload.unpatch(model)
    # Unpatched, the model holds the dequantized values.
    for mine, theirs in zip(find_expert_blocks(model), find_expert_blocks(twin), strict=True):
        for expert in (0, mine.num_experts - 1):
            for (spec, a), (_, b) in zip(
                mine.expert_tensors(expert), theirs.expert_tensors(expert), strict=True
            ):
                assert torch.equal(a, b), (spec.name, expert)


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nllb_moe"])
def test_a_quantized_store_gives_the_quantized_patchs_tokens(tmp_path, family, scheme_name):
    model = build(family)
    model.save_pretrained(tmp_path / "checkpoint")
    inputs = prompt(family)
    moe_offload.patch(model, device="cpu", quantize=scheme_name, group_size=GROUP)
    want, _ = greedy(model, inputs, 4)
    moe_offload.unpatch(model)
    summary = convert(tmp_path / "checkpoint", tmp_path / "store", quantize=scheme_name, group_size=GROUP)
    loaded, offloader = moe_offload.from_pretrained(tmp_path / "store", device="cpu", device_budget=0)
    assert offloader.stats()["quantization"] == scheme_name
    assert summary.expert_bytes == sum(b.num_experts * b.expert_bytes for b in offloader.blocks)
    got, _ = greedy(loaded, inputs, 4)
    assert torch.equal(got, want)
    other = "int8" if scheme_name == "int4" else "int4"
    with pytest.raises(StoreError, match=f"holds {scheme_name} experts .* not {other}"):
        moe_offload.from_pretrained(tmp_path / "store", device="cpu", quantize=other)


def test_quantizing_needs_a_store_and_a_known_scheme(tmp_path):
    model = build("mixtral")
    model.save_pretrained(tmp_path)
    with pytest.raises(MoeOffloadError, match="needs an expert store .* store_dir=DIR"):
        moe_offload.from_pretrained(tmp_path, device="cpu", quantize="int4")
    with pytest.raises(MoeOffloadError, match="quantize='int3' is not a scheme"):
        moe_offload.patch(model, device="cpu", quantize="int3")
    with pytest.raises(MoeOffloadError, match="group_size = 0 is out of range"):
        moe_offload.patch(model, device="cpu", quantize="int4", group_size=0)
    with pytest.raises(MoeOffloadError, match="group_size is given without quantize"):
        moe_offload.patch(model, device="cpu", group_size=64)
    assert not moe_offload.is_patched(model)


# Config fields scaled up so that an expert's shape, not the blob's tensor
# alignment, decides its size.
_WIDTHS = (
    "hidden_size", "d_model", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
)  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_blobs_are_a_quarter_and_a_half_of_bfloat16(family):
    model = build(family)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    for field in _WIDTHS:
        if isinstance(getattr(config, field, None), int):
            setattr(config, field, getattr(config, field) * 16)
    sizes = {}
    for scheme in (None, *SCHEMES):
        blocks = expert_blocks(build_skeleton(config, torch.bfloat16))
        for block in blocks:
            if scheme is not None:
                block.quantize(Quantization.parse(scheme))
        sizes[scheme] = sum(b.num_experts * b.expert_bytes for b in blocks)
    assert sizes["int4"] <= 0.3 * sizes[None], sizes
    assert sizes["int8"] <= 0.55 * sizes[None], sizes
