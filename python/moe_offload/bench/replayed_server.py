"""`moe-offload serve` with router replay, for the serving benchmark.

    python -m moe_offload.bench.replayed_server --trace TRACE [--format F] \\
        --request-tokens N PATH [serve options]

The server is `moe-offload serve` itself (the same engine, app and shutdown);
before it starts, every MoE layer's routing is forced from the trace: each
request the batching engine runs takes the next trace request of at least
N tokens (round robin) and follows it token by token, however its tokens are
packed with other requests' into a pass. Weights stay random; the experts the
model touches, and so the cache's hits and misses, are the real model's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moe_offload._core import MoeOffloadError
from moe_offload.bench.router_replay import BatchRouterReplay
from moe_offload.traces import FORMATS, read_trace

log = logging.getLogger("moe_offload")


def _parser() -> argparse.ArgumentParser:
    from moe_offload.serve import command

    parser = argparse.ArgumentParser(
        prog="python -m moe_offload.bench.replayed_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--trace", nargs="+", type=Path, required=True, metavar="TRACE")
    parser.add_argument("--format", dest="trace_format", choices=FORMATS, default="auto")
    parser.add_argument(
        "--request-tokens",
        type=int,
        required=True,
        metavar="N",
        help="a request's prompt plus new tokens: trace requests shorter than this are not used",
    )
    command.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from moe_offload.serve import command

    args = _parser().parse_args(argv)
    try:
        command.check_extras()
        command.check_numbers(args)
        trace = read_trace(args.trace, args.trace_format)
        routings = [r.routing for r in trace.requests if r.tokens >= args.request_tokens]
        if not routings:
            raise MoeOffloadError(
                f"the trace has no request of at least {args.request_tokens} tokens to replay"
            )
        engine = command.build_engine(args, args.eamc_path)
        replay = BatchRouterReplay(engine.model, routings, engine.pass_layout)
        replay.check(trace.num_layers, trace.num_experts, trace.top_k)
        log.warning(
            "router replay: %d trace requests of at least %d tokens", len(routings), args.request_tokens
        )
        try:
            return command.serve(args, engine)
        finally:
            log.warning("router replay: forced the routing of %d passes", replay.forced_passes)
    except MoeOffloadError as e:
        print(f"moe-offload: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
