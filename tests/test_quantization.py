"""Quantized experts (int8, int4): the blob layout, the error bound, the same
tokens as the model whose weights are the dequantized ones, through `patch`
and through a quantized expert store, and the sizes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import ENCODER_DECODER, FAMILIES, build, greedy, prompt

import moe_offload
from moe_offload import MoeOffloadError, StoreError, UnsupportedModelError
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


def _quantized_blocks(model: torch.nn.Module, scheme: Quantization) -> list:
    blocks = find_expert_blocks(model)
    for block in blocks:
        block.quantize(scheme)
    return blocks


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
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_quantized_patch_gives_the_dequantized_models_tokens(family, device, scheme_name):
    """On the CPU every expert runs from the host tier; on a GPU a quarter of
    the quantized bytes are slots, misses copied or run on the CPU."""
    scheme = Quantization.parse(scheme_name, GROUP)
    model = build(family).to(device)
    inputs = {name: tensor.to(device) for name, tensor in prompt(family).items()}
    with torch.no_grad():
        twin = _dequantized_copy(model, scheme)
    if family not in ENCODER_DECODER and device == "cuda":
        twin.set_experts_implementation("eager")  # the arithmetic moe-offload's experts run
    want, _ = greedy(twin, inputs, 5)
    options = {}
    if device == "cuda":
        quantized = sum(b.num_experts * b.expert_bytes for b in _quantized_blocks(model, scheme))
        options["device_budget"] = quantized // 4
    offloader = moe_offload.patch(model, device=device, quantize=scheme_name, group_size=GROUP, **options)
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
@pytest.mark.parametrize("family", list(FAMILIES))
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


# --- checkpoints that ship quantized experts ----------------------------------------

FP8_BLOCK = 32
_E4M3_MAX = 448.0


def _fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [rows, cols] as block-scaled float8: values and float32 scale_inv per 32 x 32 block."""
    rows, cols = weight.shape
    grid = weight.float().view(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
    scale_inv = grid.abs().amax(dim=(1, 3)).clamp(min=1e-12) / _E4M3_MAX
    values = (grid / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn).view(rows, cols)
    return values, scale_inv


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [..., out, in] as mxfp4: blocks [..., out, in/32, 16] and e8m0 scales [..., out, in/32]."""
    groups = weight.float().unflatten(-1, (-1, 32))
    exponent = torch.floor(torch.log2(groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-120))) - 2
    codes = (groups / torch.exp2(exponent)).clamp(-6, 6).unsqueeze(-1).sub(_FP4).abs().argmin(-1)
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent.squeeze(-1) + 127).to(torch.uint8)


def _save_quantized(model: torch.nn.Module, path, quantize, quantization_config: dict) -> None:
    """Saves `model`, then rewrites its weights as `quantize(name, tensor)`
    says (a dict of tensors per name) and adds `quantization_config`."""
    import json

    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    stored = load_file(path / "model.safetensors")
    rewritten = {}
    for name, tensor in stored.items():
        rewritten.update(quantize(name, tensor))
    save_file(rewritten, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))


def _fp8_checkpoint(path, experts_only: bool = False) -> None:
    """A tiny Qwen3-MoE in DeepSeek-V3-style fp8: every projection (experts
    one tensor per expert; with `experts_only`, only those) as float8_e4m3fn
    with its `weight_scale_inv`."""
    import transformers as tf

    config = tf.Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(config).to(torch.bfloat16)

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not name.endswith("_proj.weight") or (experts_only and ".experts." not in name):
            return {name: tensor}
        values, scale_inv = _fp8_blocks(tensor)
        return {name: values, name + "_scale_inv": scale_inv}

    settings = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [FP8_BLOCK] * 2}
    kept = ["lm_head", "mlp.gate"] + (["model.layers.*.self_attn"] if experts_only else [])
    settings["modules_to_not_convert"] = kept
    _save_quantized(model, path, quantize, settings)


def _mxfp4_checkpoint(path) -> None:
    """A tiny GPT-OSS as its published checkpoints ship: experts as mxfp4
    `*_blocks`/`*_scales` ([experts, out, in/32, ...]), everything else bf16."""
    import transformers as tf

    config = tf.GptOssConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0, 0.05)
            layer.mlp.experts.down_proj.normal_(0, 0.05)

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: tensor}
        blocks, scales = _mxfp4(tensor.transpose(1, 2))  # the model holds [in, out]
        return {name + "_blocks": blocks, name + "_scales": scales}

    settings = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    _save_quantized(model, path, quantize, settings)


SHIPPED = {"fp8": _fp8_checkpoint, "mxfp4": _mxfp4_checkpoint}


def _transformers_tokens(path, ids: torch.Tensor) -> torch.Tensor:
    """What transformers generates from the checkpoint on this CPU (which
    dequantizes fp8 and mxfp4 experts as it loads them), checked to be what
    that model generates patched too."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
        moe_offload.patch(model, device="cpu")
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), tokens)
    moe_offload.unpatch(model)
    return tokens


@pytest.mark.parametrize("kind", list(SHIPPED))
def test_a_checkpoint_shipping_quantized_experts_keeps_them_so_and_gives_transformers_tokens(tmp_path, kind):
    checkpoint = tmp_path / "checkpoint"
    SHIPPED[kind](checkpoint)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    want = _transformers_tokens(checkpoint, ids)
    with pytest.raises(StoreError, match=f"ships its experts quantized \\({kind}\\); leave quantize unset"):
        moe_offload.from_pretrained(checkpoint, device="cpu", quantize="int8")
    # Read in place: each blob gathered from the checkpoint's byte ranges.
    model, offloader = moe_offload.from_pretrained(checkpoint, device="cpu")
    assert offloader.stats()["quantization"] == kind
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    with pytest.raises(
        StoreError, match=f"convert it without --quantize, and the store keeps them in {kind}"
    ):
        convert(checkpoint, tmp_path / "refused", quantize="int4")
    model, offloader = moe_offload.from_pretrained(checkpoint, device="cpu", store_dir=tmp_path / "store")
    assert offloader.stats()["quantization"] == kind
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    # The blobs hold the checkpoint's quantized bytes and scales, not bfloat16.
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        for layer, block in enumerate(offloader.blocks):
            prefix = f"model.layers.{layer}.mlp.experts."
            shipped = sum(f.get_tensor(name).nbytes for name in f.keys() if name.startswith(prefix))
            per_expert = shipped // block.num_experts
            unaligned = sum(spec.nbytes for spec in block.specs)
            assert unaligned == per_expert, (layer, unaligned, per_expert)
            bf16 = sum(math.prod(s.shape) * 2 for s in block.weight_specs)
            assert block.expert_bytes < (0.6 if kind == "fp8" else 0.35) * bf16
    # Loaded again from its store, as it is.
    again, offloader = moe_offload.from_pretrained(tmp_path / "store", device="cpu", device_budget=0)
    assert offloader.stats()["quantization"] == kind
    with torch.no_grad():
        assert torch.equal(again.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_checkpoints_quantized_otherwise_are_refused_by_method(tmp_path):
    import json

    model = build("mixtral")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="quantized with 'awq' are not supported yet"):
        convert(tmp_path, tmp_path.parent / "store")


def test_a_model_transformers_holds_in_fp8_patches_and_gives_the_dequantized_models_tokens(
    tmp_path, monkeypatch
):
    """transformers builds its fp8 experts (`FP8Experts`) only where its fp8
    kernels run; on this CPU it dequantizes instead. Built anyway (its
    environment check skipped), the model cannot run here, but patched, its
    experts stay in fp8 in every tier and it gives the dequantized model's tokens."""
    import transformers as tf
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    checkpoint = tmp_path / "checkpoint"
    _fp8_checkpoint(checkpoint, experts_only=True)  # fp8 attention would not run on this CPU either
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    want = _transformers_tokens(checkpoint, ids)
    with monkeypatch.context() as patched:
        patched.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
        model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
    held = {name: p.detach().clone() for name, p in experts.named_parameters()}
    offloader = moe_offload.patch(model, device="cpu")
    assert offloader.stats()["quantization"] == "fp8"
    block = offloader.blocks[0]
    assert block.expert_bytes < 0.6 * sum(math.prod(s.shape) * 2 for s in block.weight_specs)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    moe_offload.unpatch(model)
    assert all(torch.equal(p, held[name]) for name, p in experts.named_parameters())


def test_the_same_device_budget_holds_three_times_the_int4_experts():
    model = build("mixtral")
    config = copy.deepcopy(model.config)
    config.hidden_size, config.intermediate_size = 512, 768
    slots = {}
    for scheme in (None, "int4", "int8", "fp8"):
        torch.manual_seed(0)
        wide = type(model)(config).to(torch.bfloat16)
        bf16_expert = 3 * 512 * 768 * 2
        offloader = moe_offload.patch(
            wide, device="cpu", device_budget=4 * bf16_expert, cpu_experts="never", quantize=scheme
        )
        slots[scheme] = offloader.n_slots
        moe_offload.unpatch(wide)
    assert slots[None] == 4
    assert slots["int4"] >= 3 * slots[None], slots
    assert slots["int8"] >= 1.5 * slots[None], slots
    assert slots["fp8"] >= 1.5 * slots[None], slots


def test_fp8_made_here_gives_the_dequantized_models_tokens():
    """fp8 needs matrices its 128 x 128 blocks tile: a 512 x 768 Mixtral."""
    model = build("mixtral")
    config = copy.deepcopy(model.config)
    config.hidden_size, config.intermediate_size = 512, 768
    torch.manual_seed(0)
    wide = type(model)(config)
    with torch.no_grad():
        for block in find_expert_blocks(wide):
            for param in block.parameters():
                param.normal_(0, 0.05)
        twin = _dequantized_copy(wide, Quantization.parse("fp8"))
    inputs = prompt("mixtral")
    want, _ = greedy(twin, inputs, 5)
    offloader = moe_offload.patch(wide, device="cpu", quantize="fp8")
    assert offloader.stats()["quantization"] == "fp8"
    got, _ = greedy(wide, inputs, 5)
    assert torch.equal(got, want)
    with pytest.raises(MoeOffloadError, match="group_size does not apply to fp8"):
        Quantization.parse("fp8", 64)
    with pytest.raises(MoeOffloadError, match="which fp8 blocks of 128 x 128 do not tile"):
        moe_offload.patch(build("mixtral"), device="cpu", quantize="fp8")
