"""The `moe-offload` command."""

from __future__ import annotations

import argparse
import sys

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
    return parser


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
    except MoeOffloadError as e:
        print(f"moe-offload: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
