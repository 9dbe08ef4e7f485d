"""`moe-offload serve`: the arguments and the process around the server."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from moe_offload._core import MoeOffloadError

if TYPE_CHECKING:
    from moe_offload.serve.engine import Engine

log = logging.getLogger("moe_offload")

API_KEY_ENV = "MOE_OFFLOAD_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moe_offload import quantization
    from moe_offload.offloader import CPU_EXPERTS, POLICIES
    from moe_offload.serve.engine import EngineConfig

    defaults = EngineConfig()
    parser.add_argument("path", help="checkpoint directory (config, safetensors, tokenizer) or expert store")
    parser.add_argument(
        "--device", help="where the model runs: cpu, cuda, cuda:N (default: cuda if available)"
    )
    parser.add_argument("--device-budget", metavar="SIZE", help="bytes of device expert slots, e.g. 20GiB")
    parser.add_argument("--host-budget", metavar="SIZE", help="bytes of the host expert cache, e.g. 48GiB")
    parser.add_argument(
        "--store-dir", metavar="DIR", help="expert store of the checkpoint (converted on first use)"
    )
    parser.add_argument(
        "--policy", choices=POLICIES, default=POLICIES[0], help="cache policy (default: %(default)s)"
    )
    parser.add_argument("--eamc-path", metavar="FILE", help="EAMC file, read at start and saved at shutdown")
    parser.add_argument(
        "--cpu-experts", choices=CPU_EXPERTS, default="auto", help="where misses run (default: %(default)s)"
    )
    quantization.add_arguments(
        parser,
        "keep the experts quantized (converted into --store-dir on first use; a quantized store is "
        "served as it is)",
    )
    parser.add_argument(
        "--lookahead",
        type=int,
        default=0,
        metavar="D",
        help="router lookahead: the routers of the next D MoE layers score each layer's hidden state for the "
        "prefetch planner (default: %(default)s, off)",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: PATH)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--served-model-name", metavar="NAME", help="the model's name in the API (default: PATH's name)"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=defaults.max_queue,
        metavar="N",
        help="requests held at once, running or waiting; more get 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=defaults.max_batch_tokens,
        metavar="N",
        help="tokens in one forward pass, prefill and decode together (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=defaults.kv_cache_tokens,
        metavar="N",
        help="tokens the KV cache holds over all requests (default: %(default)s)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="serve N replicas on Ray Serve, each with its own model, offloader and EAMC file "
        "(needs the ray extra; default: one process, no Ray)",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds running requests get to finish after SIGTERM/SIGINT before they are cancelled "
        "(default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        from moe_offload.serve import replicas  # checks the options before it starts Ray

        return replicas.run(args)
    check_extras()
    check_numbers(args)
    return serve(args, build_engine(args, args.eamc_path))


def check_extras() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MoeOffloadError(
            'moe-offload serve needs FastAPI and uvicorn: pip install "moe-offload[serve]"'
        ) from None


def serve(args: argparse.Namespace, engine: Engine) -> int:
    """Serves `engine` on --host/--port until SIGTERM/SIGINT; the exit status."""
    import uvicorn

    from moe_offload.serve.app import build_app
    from moe_offload.serve.server import Server

    engine.launch()  # a model that cannot be served is refused before the port opens
    name = args.served_model_name or Path(args.path).resolve().name
    app = build_app(engine, name, resolve_api_key(args), shutdown_timeout=args.shutdown_grace)
    server = Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=max(1, round(args.shutdown_grace)),
        )
    )
    log.warning("moe-offload serve: %s on http://%s:%d/v1", name, args.host, args.port)
    server.run()
    return 0 if server.started else 1


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the environment's, else none."""
    return args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None


def build_engine(args: argparse.Namespace, eamc_path: str | None) -> Engine:
    """The model (experts offloaded), its tokenizer and the batching engine
    the options describe, the EAMC read from and saved to `eamc_path`."""
    from transformers import AutoTokenizer

    import moe_offload
    from moe_offload.serve.engine import Engine, EngineConfig

    tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizer or args.path), local_files_only=True)
    model, offloader = moe_offload.from_pretrained(
        args.path,
        device=args.device,
        device_budget=args.device_budget,
        host_budget=args.host_budget,
        store_dir=args.store_dir,
        policy=args.policy,
        eamc_path=eamc_path,
        cpu_experts=args.cpu_experts,
        quantize=args.quantize,
        group_size=args.group_size,
        lookahead=args.lookahead,
    )
    if model.config.is_encoder_decoder:
        raise MoeOffloadError(
            f"{model.config.model_type} is an encoder-decoder model; moe-offload serve runs decoder-only "
            "models (an encoder-decoder runs with moe_offload.from_pretrained and generate)"
        )
    config = EngineConfig(
        max_batch_tokens=args.max_batch_tokens, kv_cache_tokens=args.kv_cache_tokens, max_queue=args.max_queue
    )
    return Engine(model, offloader, tokenizer, config)


def check_numbers(args: argparse.Namespace) -> None:
    for option, value in (
        ("--max-queue", args.max_queue),
        ("--max-batch-tokens", args.max_batch_tokens),
        ("--kv-cache-tokens", args.kv_cache_tokens),
    ):
        if value < 1:
            raise MoeOffloadError(f"{option} {value} must be at least 1")
    if args.replicas is not None and args.replicas < 1:
        raise MoeOffloadError(f"--replicas {args.replicas} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise MoeOffloadError(f"--port {args.port} must be in 0..65535")
    if not args.shutdown_grace >= 0:
        raise MoeOffloadError(
            f"--shutdown-grace {args.shutdown_grace} must be a number of seconds, at least 0"
        )
