"""`moe-offload serve --replicas N`: the same server as N Ray Serve replicas
behind Ray Serve's HTTP proxy.

Each replica is a Ray actor that loads its own model, offloader and
continuous-batching engine, and serves the very FastAPI app the
single-process server serves (same routes, errors and metrics). Which
replica answers a request is Ray Serve's choice. Every response carries the
header `x-moe-offload-replica: <id>`, the replica's id: its rank in the
deployment (0..N-1). Each replica keeps its own EAMC: with `--eamc-path P`
replica i reads and saves `P.replica-<i>`, so a restart with the same
replica count gives each replica the file it saved.

For people who write their own Ray Serve setup:

    from ray import serve
    from moe_offload.serve.replicas import deployment

    serve.run(deployment("demo-model", replicas=2, device="cpu", eamc_path="eamc.bin"))

or, with Ray's application-builder convention,
`serve run moe_offload.serve.replicas:app_builder path=demo-model replicas=2 device=cpu`.

Needs the `ray` extra: pip install "moe-offload[serve,ray]"."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from moe_offload._core import MoeOffloadError

try:
    import ray
    from ray import serve
except ImportError:
    raise MoeOffloadError(
        'moe-offload serve --replicas needs Ray Serve: pip install "moe-offload[serve,ray]"'
    ) from None

log = logging.getLogger("moe_offload")

APP_NAME = "moe-offload"
REPLICA_HEADER = "x-moe-offload-replica"
_SHUTDOWN_MARGIN_S = 10.0  # beyond --shutdown-grace, for the EAMC save and the engine's threads

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# -- inside a replica ----------------------------------------------------------------------------


class _ReplicaApp:
    """The ASGI app Ray Serve's ingress calls in each replica: it forwards to
    the app the replica's constructor built. The ingress app is fixed (and
    pickled) when the deployment class is defined, before any replica has a
    model; a Serve replica is a Ray actor, one per process, so the process's
    one built app is the replica's."""

    app: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _ReplicaApp.app is None:
            raise RuntimeError("the replica's app is not built: the constructor did not finish")
        await _ReplicaApp.app(scope, receive, send)


class _ReplicaHeader:
    """ASGI middleware: each HTTP response says which replica sent it."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # the lifespan: starts and stops the engine
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment(name="MoeOffload")
@serve.ingress(_ReplicaApp())
class Replica:
    """One replica: its own model, offloader, engine and EAMC file."""

    def __init__(self, args: argparse.Namespace, api_key: str | None, name: str) -> None:
        from moe_offload.serve.app import build_app
        from moe_offload.serve.command import build_engine

        self.replica = replica_id()
        eamc_path = replica_eamc_path(args.eamc_path, self.replica)
        self.engine = build_engine(args, eamc_path)
        app = build_app(self.engine, name, api_key, shutdown_timeout=args.shutdown_grace)
        _ReplicaApp.app = _ReplicaHeader(app, self.replica)
        log.warning("moe-offload serve: replica %s ready (EAMC: %s)", self.replica, eamc_path)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose generation loop died is replaced."""
        error = self.engine.manager.background_thread_status.fatal_error
        if error is not None:
            raise RuntimeError(f"replica {self.replica}: the generation loop died: {error}")


def replica_id() -> str:
    """The replica's rank in its deployment (0..N-1, reused when a replica is
    replaced), else, on a Ray without ranks, its unique tag."""
    context = serve.get_replica_context()
    rank = getattr(context, "rank", None)
    rank = getattr(rank, "rank", rank)  # a ReplicaRank on newer Ray, an int on older
    return str(rank) if isinstance(rank, int) else str(context.replica_tag)


def replica_eamc_path(eamc_path: str | None, replica: str) -> str | None:
    """`P.replica-<id>`: each replica reads and saves its own EAMC file."""
    return None if eamc_path is None else f"{eamc_path}.replica-{replica}"


# -- building the deployment ---------------------------------------------------------------------


def deployment(path: str | Path, *, replicas: int = 1, **options: Any) -> serve.Application:
    """The server as a Ray Serve application of `replicas` replicas, for
    `serve.run`. `options` are `moe-offload serve`'s options with
    underscores: device="cuda", device_budget="20GiB", eamc_path="eamc.bin",
    served_model_name=..., api_key=..., max_queue=256, ... (`--host` and
    `--port` belong to Ray Serve's proxy: `serve.start(http_options=...)`)."""
    argv = [str(path), "--replicas", str(replicas)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return from_args(_parse(argv))


def app_builder(args: dict[str, str]) -> serve.Application:
    """Ray's application-builder convention, for `serve run
    moe_offload.serve.replicas:app_builder path=DIR replicas=2 device=cpu`
    and Serve config files (`import_path` and `args`)."""
    args = dict(args)
    if "path" not in args:
        raise MoeOffloadError("app_builder: give the checkpoint as path=DIR")
    path = args.pop("path")
    return deployment(path, **{key.replace("-", "_"): value for key, value in args.items()})


def from_args(args: argparse.Namespace) -> serve.Application:
    """The application `moe-offload serve ... --replicas N` deploys."""
    from moe_offload.serve.command import resolve_api_key

    _check(args)
    replicas = args.replicas or 1
    device = args.device
    gpu = device == "cuda" or (device is None and _cluster_has_gpus())
    actor_options: dict[str, Any] = {"num_gpus": 1} if gpu else {"num_cpus": 1}
    args = _absolute_paths(args)
    if gpu and device is None:
        args.device = "cuda"
    # The key and the name are resolved here: a replica on another node has
    # neither this environment nor, necessarily, the same path spelling.
    api_key = resolve_api_key(args)
    name = args.served_model_name or Path(args.path).resolve().name
    log.info("moe-offload serve: %d replicas, each with %s", replicas, actor_options)
    return Replica.options(
        num_replicas=replicas,
        ray_actor_options=actor_options,
        # Continuous batching wants every admitted request in the replica at
        # once; --max-queue (429 beyond it) is the replica's own limit.
        max_ongoing_requests=args.max_queue,
        graceful_shutdown_timeout_s=args.shutdown_grace + _SHUTDOWN_MARGIN_S,
    ).bind(args, api_key, name)


def _absolute_paths(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` whose paths are absolute: a replica's working
    directory is Ray's, not this process's (and on another node, another
    machine's, where the files must lie at the same absolute paths)."""
    args = argparse.Namespace(**vars(args))
    for option in ("path", "tokenizer", "store_dir", "eamc_path"):
        value = getattr(args, option)
        if value is not None:
            setattr(args, option, str(Path(value).absolute()))
    return args


def _check(args: argparse.Namespace) -> None:
    from moe_offload.serve.command import check_numbers

    check_numbers(args)
    if args.device is not None and args.device.startswith("cuda:"):
        raise MoeOffloadError(
            f"--device {args.device}: with --replicas, Ray gives each replica its own GPU; use --device cuda"
        )


def _parse(argv: list[str]) -> argparse.Namespace:
    from moe_offload.serve.command import add_arguments

    parser = argparse.ArgumentParser(prog="moe_offload.serve.replicas", exit_on_error=False)
    add_arguments(parser)
    try:
        return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise MoeOffloadError(f"moe_offload.serve.replicas: bad options {argv[1:]}: {e}") from None


def _cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


# -- the process -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Joins the Ray cluster RAY_ADDRESS names or `ray start` runs on this
    machine (else starts a local Ray), deploys the replicas behind Ray
    Serve's proxy on --host/--port, and serves until SIGTERM/SIGINT; then
    deletes the application (each replica saves its EAMC) and, if it started
    Ray itself, stops Ray Serve and Ray."""
    _check(args)  # before starting Ray, which takes seconds
    ray.init(logging_level=logging.WARNING)
    own_cluster = _started_here()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(from_args(args), name=APP_NAME, route_prefix="/")
        log.warning(
            "moe-offload serve: %d replicas on http://%s:%d/v1 (Ray Serve; %s Ray)",
            args.replicas,
            args.host,
            args.port,
            "a local" if own_cluster else "the cluster's",
        )
        stop.wait()
        log.warning("moe-offload serve: stopping the replicas")
        serve.delete(APP_NAME)
    finally:
        if own_cluster:
            serve.shutdown()
        ray.shutdown()
    return 0


def _started_here() -> bool:
    """Whether `ray.init` started a new local Ray (its head node lives in this
    process's session) rather than joining a running one."""
    node = ray._private.worker._global_node
    return node is not None and bool(node.head)
