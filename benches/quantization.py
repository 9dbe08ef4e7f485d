"""Accuracy of moe-offload's int8 and int4 experts against the unquantized
model, on random weights:

1. the relative weight error of every expert matrix, ||W - deq(q(W))|| /
   ||W|| (Frobenius, over an expert's matrices together), averaged over the
   experts of each MoE layer, and its mean over the layers;
2. the next-token distribution over teacher-forced random token sequences
   (the same inputs to both models, one forward pass each): top-1 agreement
   and mean KL(unquantized || quantized), the quantized model being the
   model patched with `quantize=` (what a user runs).

Models: the nine tiny families of the test suite (tests/tiny_models.py) and
the benchmark's real shapes scaled down for a CPU (moe_offload.bench.shapes,
4 MoE layers, hidden 512 by default), their routers routing.

Random weights say little about real quality: their errors are those of
Gaussian weights and their next-token distributions are close to uniform.
The real-model check, where models can be downloaded, is perplexity on
wikitext-2 of Mixtral-8x7B or DeepSeek-V2-Lite with and without
`quantize="int4"` / `convert --quantize int4`.

    .venv/bin/python benches/quantization.py --out benches/results/quantization-cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402

import moe_offload  # noqa: E402
from moe_offload import provenance  # noqa: E402
from moe_offload.adapters import find_expert_blocks  # noqa: E402
from moe_offload.bench import shapes  # noqa: E402
from moe_offload.bench.e2e import ExpertSnapshot  # noqa: E402
from moe_offload.quantization import SCHEMES, Quantization  # noqa: E402

CAVEAT = (
    "Random weights say little about real quality: the weight errors are those of Gaussian weights, and "
    "random models' next-token distributions are close to uniform (see reference_entropy against "
    "ln(vocabulary)). The real-model check, where models can be downloaded: perplexity on wikitext-2 of "
    "Mixtral-8x7B or DeepSeek-V2-Lite with and without quantize='int4' (and 'int8')."
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    models: dict[str, Any] = {}
    for family in args.families:
        print(f"{family} ...", file=sys.stderr, flush=True)
        model = tiny_models.build(family, seed=args.seed)
        models[family] = measure(model, args, encoder_decoder=family in tiny_models.ENCODER_DECODER)
        models[family]["kind"] = "tiny family (tests/tiny_models.py)"
    for name in args.shapes:
        print(f"{name} ...", file=sys.stderr, flush=True)
        config = shapes.config_for(name, args.layers, args.hidden)
        models[name] = measure(shapes.build(config, torch.float32, args.seed), args, encoder_decoder=False)
        models[name]["kind"] = f"bench shape, {args.layers} MoE layers, hidden {args.hidden}"
    report = {
        "command": " ".join(["python benches/quantization.py", *(sys.argv[1:] if argv is None else argv)]),
        "commit": provenance.commit(),
        "machine": provenance.machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "dtype": "float32",
        "models": models,
        "caveat": CAVEAT,
        "seconds": time.perf_counter() - started,
    }
    print(markdown(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "results.md").write_text(markdown(report) + "\n")
        print(f"\nwrote {args.out}/results.json, results.md", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--families",
        nargs="*",
        choices=list(tiny_models.FAMILIES),
        default=list(tiny_models.FAMILIES),
        help="tiny families to measure (default: all nine)",
    )
    parser.add_argument(
        "--shapes",
        nargs="*",
        choices=list(shapes.SHAPES),
        default=list(shapes.SHAPES),
        help="bench shapes to measure, scaled down (default: all of them)",
    )
    parser.add_argument("--layers", type=int, default=4, help="MoE layers of a bench shape (default: 4)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of a bench shape (default: 512)")
    parser.add_argument(
        "--schemes", nargs="+", choices=list(SCHEMES), default=["int8", "int4"], help="(default: int8 int4)"
    )
    parser.add_argument("--group-size", type=int, default=128, help="input features per scale (default: 128)")
    parser.add_argument("--sequences", type=int, default=4, help="random token sequences (default: 4)")
    parser.add_argument(
        "--tokens", type=int, default=96, help="teacher-forced tokens per sequence (default: 96)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and tokens (default: 0)")
    parser.add_argument("--out", type=Path, help="write results.json and results.md here")
    return parser


def measure(model: nn.Module, args: argparse.Namespace, encoder_decoder: bool) -> dict[str, Any]:
    """Every scheme's weight error and next-token agreement on `model`."""
    inputs = _inputs(model, args, encoder_decoder)
    reference = _log_probs(model, inputs)
    snapshot = ExpertSnapshot(model)
    unquantized = sum(b.num_experts * b.expert_bytes for b in find_expert_blocks(model))
    result: dict[str, Any] = {
        "positions": reference.shape[0],
        "vocabulary": reference.shape[1],
        # Nats; ln(vocabulary) for a uniform distribution.
        "reference_entropy": float(-(reference.exp() * reference).sum(-1).mean()),
        "unquantized_expert_bytes": unquantized,
        "schemes": {},
    }
    for name in args.schemes:
        scheme = Quantization.parse(name, args.group_size)
        assert scheme is not None
        figures = weight_error(model, scheme)
        offloader = moe_offload.patch(model, device="cpu", quantize=name, group_size=args.group_size)
        expert_bytes = sum(b.num_experts * b.expert_bytes for b in offloader.blocks)
        try:
            quantized = _log_probs(model, inputs)
        finally:
            moe_offload.unpatch(model)
            snapshot.restore(model)  # unpatching leaves the dequantized weights
        figures.update(agreement(reference, quantized))
        figures.update(expert_bytes=expert_bytes, bytes_ratio=expert_bytes / unquantized)
        result["schemes"][name] = figures
    return result


def _inputs(model: nn.Module, args: argparse.Namespace, encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """Random token sequences (ids from 3: not pad, bos, eos); an
    encoder-decoder model gets random sources and teacher-forced targets."""
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.sequences, args.tokens), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(
            3, vocab, (args.sequences, args.tokens), generator=generator
        )
    return inputs


def _log_probs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token log-probabilities at every position, [positions, vocabulary]."""
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return F.log_softmax(logits.float().flatten(0, 1), dim=-1)


def weight_error(model: nn.Module, scheme: Quantization) -> dict[str, Any]:
    """||W - deq(q(W))|| / ||W|| per expert (its matrices together), averaged
    over each layer's experts; the model is left as it was."""
    layers = []
    with torch.no_grad():
        for block in find_expert_blocks(model):
            block.quantize(scheme)
            assert block.codec is not None
            errors = []
            for expert in range(block.num_experts):
                tensors = {spec.name: t for spec, t in block.expert_tensors(expert)}
                decoded = block.codec.decode(block.codec.encode(tensors))
                diff = sum(
                    float((tensors[m] - decoded[m]).float().square().sum()) for m in block.codec.matrices
                )
                norm = sum(float(tensors[m].float().square().sum()) for m in block.codec.matrices)
                errors.append((diff / norm) ** 0.5 if norm else 0.0)
            layers.append({"layer": block.name, "relative_error": sum(errors) / len(errors)})
    mean = sum(layer["relative_error"] for layer in layers) / len(layers)
    return {"weight_error": {"per_layer": layers, "mean": mean}}


def agreement(reference: torch.Tensor, quantized: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean and largest KL(reference || quantized), in nats, of two
    [positions, vocabulary] log-probability tensors."""
    top1 = (reference.argmax(-1) == quantized.argmax(-1)).float().mean()
    kl = (reference.exp() * (reference - quantized)).sum(-1)
    # The largest too: a token routed to other experts moves its distribution far more than the rest.
    return {"top1_agreement": float(top1), "mean_kl": float(kl.mean()), "max_kl": float(kl.max())}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Quantized experts against the unquantized model, {report['dtype']}, random weights; commit "
        f"{report['commit']}, {report['machine']['cpu']} ({report['machine']['cores']} cores)",
        "",
        "| model | scheme | weight error, mean (per layer) | top-1 agreement | mean KL (nats) | max KL | "
        "reference entropy (nats) | expert bytes vs unquantized |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in report["models"].items():
        entropy = f"{model['reference_entropy']:.2f} (uniform {math.log(model['vocabulary']):.2f})"
        for scheme, f in model["schemes"].items():
            per_layer = ", ".join(f"{x['relative_error']:.4f}" for x in f["weight_error"]["per_layer"])
            cells = [
                name,
                scheme,
                f"{f['weight_error']['mean']:.4f} ({per_layer})",
                f"{f['top1_agreement']:.3f}",
                f"{f['mean_kl']:.2e}",
                f"{f['max_kl']:.2e}",
                entropy,
                f"{f['bytes_ratio']:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", report["caveat"], "", f"`{report['command']}`"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
