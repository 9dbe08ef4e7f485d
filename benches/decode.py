"""Decode throughput of a patched model against the same model unpatched, in
one run, on one device.

    .venv/bin/python benches/decode.py --family mixtral --device cpu --budget-fraction 0.25
    .venv/bin/python benches/decode.py --family mixtral --device cuda --dtype bfloat16 --hidden 1024

Prints one JSON object; with --out also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import moe_offload  # noqa: E402
from moe_offload.demo import build_model  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_seconds(model, prompt: torch.Tensor, tokens: int, device: str) -> list[float]:
    """Per-token decode latencies (prefill excluded) via the KV cache."""
    latencies = []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            _sync(device)
            start = time.perf_counter()
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            latencies.append(time.perf_counter() - start)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
        "tokens_per_s": len(ordered) / sum(ordered),
    }


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--budget-fraction", type=float, default=0.25)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = build_model(args.layers, args.experts, args.hidden, seed=0).to(getattr(torch, args.dtype))
    model.set_experts_implementation("eager")
    model.to(args.device)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device=args.device)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)

    resident = decode_seconds(model, prompt, args.tokens, args.device)
    runs = {"resident (unpatched, eager experts)": summary(resident)}
    for label, fraction in (("patched, every expert cached", 1.0), ("patched", args.budget_fraction)):
        offloader = moe_offload.patch(
            model, device=args.device, device_budget=max(int(expert_bytes * fraction), 1)
        )
        decode_seconds(model, prompt, 4, args.device)  # warm the cache and the allocator
        offloader.reset_stats()
        result = summary(decode_seconds(model, prompt, args.tokens, args.device))
        stats = offloader.stats()
        result.update(
            budget_fraction=fraction,
            hit_rate=stats["hit_rate"],
            bytes_per_token=stats["bytes_to_device"] / args.tokens,
            stall_ms_per_token=stats["stall_seconds"] * 1e3 / args.tokens,
            backend=stats["backend"],
        )
        runs[f"{label} ({fraction:.0%} of experts)"] = result
        moe_offload.unpatch(model)
    base = runs["resident (unpatched, eager experts)"]["median_ms"]
    for result in runs.values():
        result["ratio_to_resident"] = result["median_ms"] / base
    report = {
        "command": " ".join(sys.argv),
        "machine": machine(args.device),
        "torch": torch.__version__,
        "model": {"layers": args.layers, "experts": args.experts, "hidden": args.hidden, "dtype": args.dtype},
        "expert_bytes": expert_bytes,
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
