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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from moe_offload.demo import run

            return run(args.layers, args.experts, args.hidden, args.tokens, args.budget_fraction, args.seed)
    except MoeOffloadError as e:
        print(f"moe-offload: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
