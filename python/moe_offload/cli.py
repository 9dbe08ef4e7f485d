"""The `moe-offload` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from moe_offload._core import MoeOffloadError

VERBOSE_HELP = "log what moe-offload does (INFO); twice (-vv) for DEBUG too (default: warnings only)"


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line (exit status 2, as argparse)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from moe_offload import __version__

    parser = _Parser(prog="moe-offload", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moe-offload {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    _demo_parser(commands)
    _convert_parser(commands)
    _replay_parser(commands)
    _bench_parser(commands)
    _serve_parser(commands)
    for command in commands.choices.values():
        # Also after the command (`moe-offload bench -v`); SUPPRESS keeps a
        # flag given before the command.
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def _demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="build a small random Mixtral-style model, offload it, generate",
        description="Builds a small Mixtral-style model with random weights twice, offloads one copy, "
        "generates with both, checks that the tokens are the same and compares their speed.",
    )
    demo.add_argument(
        "--layers", type=int, default=4, metavar="N", help="decoder layers, each MoE (default: 4)"
    )
    demo.add_argument(
        "--experts", type=int, default=8, metavar="E", help="experts per layer, top-2 routed (default: 8)"
    )
    demo.add_argument(
        "--hidden", type=int, default=256, metavar="H", help="hidden size, a multiple of 16 (default: 256)"
    )
    demo.add_argument(
        "--tokens", type=int, default=32, metavar="N", help="tokens per generation (default: 32)"
    )
    demo.add_argument(
        "--runs",
        type=int,
        default=5,
        metavar="N",
        help="timed generations of each model, after one warm-up each; the median is shown (default: 5)",
    )
    demo.add_argument(
        "--budget-fraction",
        type=float,
        default=0.25,
        metavar="F",
        help="device budget as a share of the expert bytes, in (0, 1] (default: 0.25)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt (default: 0)")


def _convert_parser(commands: argparse._SubParsersAction) -> None:
    from moe_offload import quantization

    convert = commands.add_parser(
        "convert", help="write the expert store for a Hugging Face safetensors checkpoint"
    )
    convert.add_argument("checkpoint", help="checkpoint directory (config.json and safetensors shards)")
    convert.add_argument("store", help="directory of the expert store to write")
    quantization.add_arguments(convert, "store every expert matrix quantized")
    convert.add_argument(
        "--dtype", help="convert weights to this dtype, e.g. bfloat16 (default: the config's)"
    )
    convert.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store already in that directory (default: refuse to)",
    )
    convert.add_argument(
        "--verify",
        action="store_true",
        help="first check every checkpoint file against the hash its Hugging Face Hub download recorded "
        "(default: trust the checkpoint)",
    )


def _bench_parser(commands: argparse._SubParsersAction) -> None:
    from moe_offload.bench import e2e

    bench = commands.add_parser(
        "bench",
        help="per-token latency of a real model shape under every system, side by side",
        description=e2e.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e2e.add_arguments(bench)


def _serve_parser(commands: argparse._SubParsersAction) -> None:
    from moe_offload.serve import command

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (completions, chat) over an offloaded model",
        description="Loads the model with its experts offloaded and serves /v1/completions, "
        "/v1/chat/completions, /v1/models, /health and /metrics, batching requests continuously. "
        'Needs the serve extra: pip install "moe-offload[serve]".',
    )
    command.add_arguments(serve)


def _replay_parser(commands: argparse._SubParsersAction) -> None:
    from moe_offload.lab import CPU_EXPERTS, POLICIES, LabParams
    from moe_offload.traces import FORMATS

    defaults = LabParams()
    replay = commands.add_parser(
        "replay",
        help="replay routing traces through the core on a simulated clock and compare cache policies",
        description="Replays recorded routing through the real cache, planner, EAMC and prefetch queue "
        "with a simulated clock: a copy takes expert-bytes / bandwidth, each MoE layer computes for a "
        "fixed time, and a needed expert that has not arrived stalls the clock.",
    )
    replay.add_argument(
        "trace", nargs="+", type=Path, help="trace files, or directories read for their trace files"
    )
    replay.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="trace format; auto tells them apart by file name and first line (default: %(default)s)",
    )
    replay.add_argument(
        "--capacity",
        type=float,
        default=defaults.capacity,
        metavar="FRACTION",
        help="device budget as a share of all experts' unquantized bytes, in (0, 1]: that many experts "
        "in slots, and more with --quantize (default: %(default)s)",
    )
    replay.add_argument(
        "--policy",
        nargs="+",
        choices=POLICIES,
        default=list(POLICIES),
        metavar="NAME",
        help=f"policies to compare, of {', '.join(POLICIES)} (default: all of them)",
    )
    replay.add_argument(
        "--bandwidth-gbps",
        type=float,
        default=defaults.bandwidth_gbps,
        metavar="B",
        help="host-to-device copy bandwidth in GB/s (default: %(default)s, PCIe Gen5)",
    )
    replay.add_argument(
        "--layer-compute-us",
        type=float,
        default=defaults.layer_compute_us,
        metavar="T",
        help="compute time of one MoE layer in microseconds (default: %(default)s)",
    )
    replay.add_argument(
        "--expert-bytes",
        type=int,
        metavar="N",
        help="bytes of one expert (default: the bf16 size of the model the trace's routing shape is "
        "known from: DeepSeek-V2-Lite, Mixtral-8x7B, Qwen3-30B-A3B)",
    )
    replay.add_argument(
        "--quantize",
        choices=("int8", "int4", "fp8"),
        help="simulate that model's experts quantized as `convert --quantize` stores them: their "
        "quantized bytes are copied, the --capacity budget holds more of them, and --cpu-expert-us "
        "shrinks with the bytes (default: bf16)",
    )
    replay.add_argument(
        "--group-size",
        type=int,
        metavar="N",
        help="input features per int8/int4 scale (default: 128; needs --quantize int8 or int4)",
    )
    replay.add_argument(
        "--cpu-expert-us",
        type=float,
        metavar="T",
        help="model the CPU as a second executor: a miss may run there, taking T microseconds "
        "(one expert for one token: its weights read from host memory; the replay steps one token "
        "at a time), the CPU's experts one after another while the device copies and computes "
        "(default: none, every miss is copied)",
    )
    replay.add_argument(
        "--cpu-experts",
        choices=CPU_EXPERTS,
        help="with --cpu-expert-us, where misses run: auto (where the layer ends soonest, from the "
        "copy backlog, T and the copy time), always (on the CPU), never (copied, through the same "
        "placement) (default: auto)",
    )
    replay.add_argument(
        "--copy-chunk-bytes",
        type=int,
        metavar="N",
        help="copy experts in chunks of N bytes: an on-demand copy waits for the chunk in flight, not "
        "for a whole prefetch copy (default: none, whole copies, as the live cache copies)",
    )
    replay.add_argument(
        "--lookahead",
        type=int,
        metavar="D",
        help="simulate a router lookahead: at each layer the planner is told the token's routing at the "
        "next D layers, each expert id right with probability --lookahead-accuracy (traces hold no hidden "
        "states, so a real lookahead cannot run here) (default: none, history alone)",
    )
    replay.add_argument(
        "--lookahead-accuracy",
        type=float,
        default=1.0,
        metavar="A",
        help="with --lookahead, the chance that each predicted expert id is the one the token uses "
        "(default: %(default)s)",
    )
    replay.add_argument(
        "--limit", type=int, metavar="N", help="read only the first N requests (default: all of them)"
    )
    replay.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        metavar="N",
        help="the last N requests read only fill the EAMC; they are not measured (default: %(default)s)",
    )
    replay.add_argument(
        "--eamc-capacity",
        type=int,
        default=1000,
        metavar="K",
        help="entries of the EAMC that activation-aware matches requests against (default: %(default)s)",
    )
    replay.add_argument(
        "--replacement",
        choices=("least-matched", "oldest", "most-similar"),
        default="least-matched",
        help="which EAMC entry a full collection gives up (default: %(default)s)",
    )
    replay.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables (default: tables)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return _run(args)
    except MoeOffloadError as e:
        print(f"moe-offload: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A file or directory the command was pointed at (or one it writes).
        print(f"moe-offload: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-offload: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from moe_offload.demo import run

        return run(
            args.layers, args.experts, args.hidden, args.tokens, args.budget_fraction, args.seed, args.runs
        )
    if args.command == "convert":
        from moe_offload.conversion import convert

        print(
            convert(
                args.checkpoint,
                args.store,
                dtype=args.dtype,
                quantize=args.quantize,
                group_size=args.group_size,
                overwrite=args.overwrite,
                verify=args.verify,
                show_progress=True,
            )
        )
        return 0
    if args.command == "replay":
        return _replay(args)
    if args.command == "bench":
        from moe_offload.bench import e2e

        return e2e.main(args)
    if args.command == "serve":
        from moe_offload.serve import command

        return command.run(args)
    return 1


def _configure_logging(verbosity: int) -> None:
    """--verbose: the `moe_offload` logger's INFO records on stderr; twice, DEBUG too."""
    if verbosity <= 0:
        return
    logger = logging.getLogger("moe_offload")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
    logger.propagate = False


def _replay(args: argparse.Namespace) -> int:
    from moe_offload import lab
    from moe_offload.offloader import check_eamc_fits
    from moe_offload.traces import read_trace

    _check_replay_numbers(args)
    trace = read_trace(args.trace, args.format, args.limit)
    check_eamc_fits(
        args.eamc_capacity, trace.num_layers, trace.num_experts, f"--eamc-capacity {args.eamc_capacity}"
    )
    params = lab.LabParams(
        capacity=args.capacity,
        bandwidth_gbps=args.bandwidth_gbps,
        layer_compute_us=args.layer_compute_us,
        expert_bytes=args.expert_bytes,
        warmup=args.warmup,
        cpu_expert_us=args.cpu_expert_us,
        cpu_experts=args.cpu_experts or "auto",
        quantize=args.quantize,
        group_size=args.group_size,
        copy_chunk_bytes=args.copy_chunk_bytes,
        lookahead=args.lookahead,
        lookahead_accuracy=args.lookahead_accuracy,
    )
    measured = max(len(trace.requests) - args.warmup, 0)
    with _replay_progress(args.policy, measured) as progress:
        report = lab.run(
            trace,
            args.policy,
            params,
            eamc_capacity=args.eamc_capacity,
            replacement=args.replacement,
            progress=progress,
        )
    if args.json:
        from moe_offload import provenance

        report["run"] = {
            "command": provenance.command("moe-offload", {str(p) for p in args.trace}),
            "commit": provenance.commit(),
            "machine": provenance.machine(),
        }
        print(json.dumps(report, indent=2))
        return 0
    t, p = report["trace"], report["params"]
    print(
        f"trace {t['source']}: {t['requests']} requests, {t['tokens']} tokens measured "
        f"({t['warmup_requests']} warm-up requests), {t['layers']} MoE layers x {t['experts']} experts, "
        f"top-{t['top_k']}; next_token_reuse {t['next_token_reuse']:.3f} (share of a token's experts "
        "at a layer that the previous token used there)"
    )
    cpu = ""
    if p["cpu_expert_us"] is not None:
        cpu = f"; CPU {p['cpu_expert_us']:g} us per expert ({p['cpu_experts']})"
        if p["quantize"] is not None:
            cpu = (
                f"; CPU {p['cpu_expert_us']:g} us per bf16 expert, {p['cpu_expert_us_simulated']:.0f} us "
                f"per {p['quantize']} one ({p['cpu_experts']})"
            )
    budget = f"{p['capacity']:.0%}"
    if p["quantize"] is not None:
        budget = f"{p['quantize']}, in the budget of {p['capacity']:.0%} of the bf16 experts"
    print(
        f"cache: {p['slots']} of {p['total_experts']} experts ({budget}); "
        f"expert {p['expert_bytes'] / 1e6:.1f} MB ({p['expert_bytes_from']}) "
        f"at {p['bandwidth_gbps']:g} GB/s, "
        f"{p['layer_compute_us']:g} us per MoE layer{cpu}\n"
    )
    print(lab.table(report))
    return 0


# An expert far larger than any model's (Mixtral-8x7B: 352 MB) that still
# keeps a long replay's byte counters (copies x expert bytes) within 64 bits.
MAX_EXPERT_BYTES = 1 << 36


def _check_replay_numbers(args: argparse.Namespace) -> None:
    """`replay`'s numbers, checked before anything is read or sized from
    them. The clock sums copy and compute times over every layer of every
    token: the bounds keep it finite (NaN fails every comparison)."""
    from moe_offload import lab

    checks = (
        ("--capacity", args.capacity, 0 < args.capacity <= 1, "a share of the experts in (0, 1]"),
        (
            "--bandwidth-gbps",
            args.bandwidth_gbps,
            1e-6 <= args.bandwidth_gbps < math.inf,
            "a finite number of GB/s, at least 1e-6",
        ),
        (
            "--layer-compute-us",
            args.layer_compute_us,
            0 < args.layer_compute_us <= 1e9,
            "a number of microseconds in (0, 1e9]",
        ),
        (
            "--expert-bytes",
            args.expert_bytes,
            args.expert_bytes is None or 1 <= args.expert_bytes <= MAX_EXPERT_BYTES,
            f"a byte count in 1..{MAX_EXPERT_BYTES} (64 GiB)",
        ),
        (
            "--cpu-expert-us",
            args.cpu_expert_us,
            args.cpu_expert_us is None or 0 < args.cpu_expert_us <= 1e9,
            "a number of microseconds in (0, 1e9]",
        ),
        (
            "--copy-chunk-bytes",
            args.copy_chunk_bytes,
            args.copy_chunk_bytes is None or 1 <= args.copy_chunk_bytes <= MAX_EXPERT_BYTES,
            f"a byte count in 1..{MAX_EXPERT_BYTES} (64 GiB), e.g. 1048576",
        ),
        (
            "--lookahead",
            args.lookahead,
            args.lookahead is None or 1 <= args.lookahead <= 4096,
            "a number of layers, at least 1 (and below the trace's layer count)",
        ),
        (
            "--lookahead-accuracy",
            args.lookahead_accuracy,
            0 <= args.lookahead_accuracy <= 1,
            "a probability in [0, 1]",
        ),
        ("--limit", args.limit, args.limit is None or args.limit >= 1, "a number of requests, at least 1"),
        ("--warmup", args.warmup, args.warmup >= 0, "a number of requests, at least 0"),
        ("--eamc-capacity", args.eamc_capacity, args.eamc_capacity >= 1, "a number of entries, at least 1"),
        (
            "--group-size",
            args.group_size,
            args.group_size is None or 1 <= args.group_size <= 1 << 20,
            f"a number of input features in 1..{1 << 20}, e.g. 128",
        ),
    )
    for option, value, ok, what in checks:
        if not ok:
            raise MoeOffloadError(f"{option} {value} must be {what}")
    if args.group_size is not None and args.quantize not in ("int8", "int4"):
        raise MoeOffloadError(f"--group-size {args.group_size} needs --quantize int8 or int4")
    lab.check_sizing(args.expert_bytes, args.quantize)
    if args.cpu_experts is not None and args.cpu_expert_us is None:
        raise MoeOffloadError(
            f"--cpu-experts {args.cpu_experts} needs --cpu-expert-us T, the CPU's time per expert"
        )
    if args.lookahead is None and args.lookahead_accuracy != 1.0:
        raise MoeOffloadError(
            f"--lookahead-accuracy {args.lookahead_accuracy} needs --lookahead D, the layers looked ahead"
        )


@contextmanager
def _replay_progress(policies: list[str], requests: int) -> Iterator[Callable[[str, int], None]]:
    """Requests replayed so far, on stderr: a bar on a terminal; elsewhere
    (a log) one line as each policy finishes."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    terminal = sys.stderr.isatty()
    bar = tqdm(
        total=len(policies) * requests, unit="request", desc="replay", leave=False, disable=not terminal
    )

    def report(policy: str, done: int) -> None:
        bar.set_description(f"replay {policy}", refresh=False)
        bar.update(1)
        if done == requests and not terminal:
            print(
                f"replay: {policy} done ({policies.index(policy) + 1} of {len(policies)} policies, "
                f"{requests} requests, {time.monotonic() - started:.1f} s so far)",
                file=sys.stderr,
                flush=True,
            )

    try:
        yield report
    finally:
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
