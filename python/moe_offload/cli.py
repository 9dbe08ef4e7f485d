"""The `moe-offload` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_offload._core import MoeOffloadError


def _parser() -> argparse.ArgumentParser:
    from moe_offload import __version__

    parser = argparse.ArgumentParser(prog="moe-offload", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moe-offload {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build a small random Mixtral-style model, offload it, generate")
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--experts", type=int, default=8)
    demo.add_argument("--hidden", type=int, default=256)
    demo.add_argument("--tokens", type=int, default=32)
    demo.add_argument(
        "--budget-fraction", type=float, default=0.25, help="device budget as a share of expert bytes"
    )
    demo.add_argument("--seed", type=int, default=0)
    convert = commands.add_parser(
        "convert", help="write the expert store for a Hugging Face safetensors checkpoint"
    )
    convert.add_argument("checkpoint", help="checkpoint directory (config.json and safetensors shards)")
    convert.add_argument("store", help="directory of the expert store to write")
    convert.add_argument(
        "--dtype", help="convert weights to this dtype (default: the config's), e.g. bfloat16"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace a store already in that directory")
    _replay_parser(commands)
    _bench_parser(commands)
    return parser


def _bench_parser(commands: argparse._SubParsersAction) -> None:
    from moe_offload.bench import e2e

    bench = commands.add_parser(
        "bench",
        help="per-token latency of a real model shape under every system, side by side",
        description=e2e.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e2e.add_arguments(bench)


def _replay_parser(commands: argparse._SubParsersAction) -> None:
    from moe_offload.lab import POLICIES, LabParams
    from moe_offload.traces import FORMATS

    defaults = LabParams()
    replay = commands.add_parser(
        "replay",
        help="replay routing traces through the core on a simulated clock and compare cache policies",
        description="Replays recorded routing through the real cache, planner, EAMC and prefetch queue "
        "with a simulated clock: a copy takes expert-bytes / bandwidth, each MoE layer computes for a "
        "fixed time, and a needed expert that has not arrived stalls the clock.",
    )
    replay.add_argument("trace", nargs="+", type=Path, help="trace files or directories")
    replay.add_argument("--format", choices=FORMATS, default="auto")
    replay.add_argument(
        "--capacity", type=float, default=defaults.capacity, help="device slots as a share of all experts"
    )
    replay.add_argument(
        "--policy", nargs="+", choices=POLICIES, default=list(POLICIES), help="policies to compare"
    )
    replay.add_argument("--bandwidth-gbps", type=float, default=defaults.bandwidth_gbps)
    replay.add_argument("--layer-compute-us", type=float, default=defaults.layer_compute_us)
    replay.add_argument(
        "--expert-bytes", type=int, help="bytes of one expert (default: known from the trace's model shape)"
    )
    replay.add_argument("--limit", type=int, help="read only the first N requests of the trace")
    replay.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        help="the last N requests read only fill the EAMC before the replay; they are not measured",
    )
    replay.add_argument("--eamc-capacity", type=int, default=1000)
    replay.add_argument(
        "--replacement",
        choices=("least-matched", "oldest", "most-similar"),
        default="least-matched",
        help="which EAMC entry a full collection gives up",
    )
    replay.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from moe_offload.demo import run

            return run(args.layers, args.experts, args.hidden, args.tokens, args.budget_fraction, args.seed)
        if args.command == "convert":
            from moe_offload.conversion import convert

            print(
                convert(
                    args.checkpoint,
                    args.store,
                    dtype=args.dtype,
                    overwrite=args.overwrite,
                    show_progress=True,
                )
            )
            return 0
        if args.command == "replay":
            return _replay(args)
        if args.command == "bench":
            from moe_offload.bench import e2e

            return e2e.main(args)
    except MoeOffloadError as e:
        print(f"moe-offload: {e}", file=sys.stderr)
        return 2
    return 1


def _replay(args: argparse.Namespace) -> int:
    from moe_offload import lab
    from moe_offload.traces import read_trace

    if not 0 < args.capacity <= 1:
        raise MoeOffloadError(f"--capacity {args.capacity} must be a share of the experts in (0, 1]")
    trace = read_trace(args.trace, args.format, args.limit)
    params = lab.LabParams(
        capacity=args.capacity,
        bandwidth_gbps=args.bandwidth_gbps,
        layer_compute_us=args.layer_compute_us,
        expert_bytes=args.expert_bytes,
        warmup=args.warmup,
    )
    report = lab.run(
        trace, args.policy, params, eamc_capacity=args.eamc_capacity, replacement=args.replacement
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t, p = report["trace"], report["params"]
    print(
        f"trace {t['source']}: {t['requests']} requests, {t['tokens']} tokens measured "
        f"({t['warmup_requests']} warm-up requests), {t['layers']} MoE layers x {t['experts']} experts, "
        f"top-{t['top_k']}"
    )
    print(
        f"cache: {p['slots']} of {p['total_experts']} experts ({p['capacity']:.0%}); "
        f"expert {p['expert_bytes'] / 1e6:.1f} MB ({p['expert_bytes_from']}) "
        f"at {p['bandwidth_gbps']:g} GB/s, "
        f"{p['layer_compute_us']:g} us per MoE layer\n"
    )
    print(lab.table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
