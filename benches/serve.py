"""The serving benchmark: `moe-offload serve` on a bench model shape, driven
over HTTP by N concurrent streaming clients (N = 1, 4, 16 by default).

The script builds the shape with random weights (on a CPU scaled down as
`moe-offload bench` does: 4 MoE layers, hidden 512, float32), saves it with a
word-level tokenizer to a temporary checkpoint, starts `moe-offload serve` on
it as a subprocess on a free 127.0.0.1 port, and for each N runs N client
threads, each sending streaming greedy completions back to back (a fixed
prompt length and a fixed number of new tokens: the model has no EOS, so
every request generates all of them). Per N it reports output tokens/s over
all clients, time to first token and inter-token latency p50/p99 (timed per
chunk on the client), and the offloader's hit rate and CPU-run experts per
generated token (from /metrics before and after).

With --trace, routing is replayed from a recorded trace, as in `moe-offload
bench`: the server runs as `python -m moe_offload.bench.replayed_server`
(`moe-offload serve` with every MoE layer's routing forced), and each request
follows a trace request of its own token by token, however continuous
batching packs its tokens with other requests'. Without it the model's own
random router routes.

    .venv/bin/python benches/serve.py --model mixtral-8x7b --trace TRACES/mixtral-8x7b
        --out benches/results/serve-cpu-mixtral-8x7b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from moe_offload import provenance
from moe_offload.bench import shapes
from moe_offload.bench.e2e import CPU_HIDDEN, CPU_LAYERS, DTYPES, add_trace_arguments

MODEL_NAME = "bench"
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0
RANDOM_ROUTING = "the model's own (random-weight) router"
REPLAYED = re.compile(r"router replay: forced the routing of (\d+) passes")


@dataclass
class RequestTiming:
    """One streamed request as the client saw it (perf_counter seconds)."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    usage_tokens: int | None = None


# --- the model and the server


def build_checkpoint(args: argparse.Namespace, where: Path) -> dict[str, Any]:
    """Saves the shape with random weights and a word-level tokenizer to
    `where`; returns the model's facts for the report."""
    config = shapes.config_for(args.model, args.layers, args.hidden, args.experts)
    # No end-of-sequence token: every request generates exactly --new-tokens.
    config.eos_token_id = None
    model = shapes.build(config, DTYPES[args.dtype], args.seed)
    model.generation_config.eos_token_id = None
    model.save_pretrained(where)
    word_tokenizer(config.vocab_size).save_pretrained(where)
    return {
        "shape": args.model,
        "moe_layers": shapes.moe_layers(config, args.model),
        "hidden": config.hidden_size,
        "experts": shapes.routing_shape(config, args.model)[1],
        "top_k": config.num_experts_per_tok,
        "vocab": config.vocab_size,
        "dtype": args.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer of `vocab_size` words (`<pad>`, then w1 …),
    made offline, with no end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>"] + [f"w{i}" for i in range(1, vocab_size)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<pad>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, checkpoint: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "moe_offload.cli", "serve"]
    if args.trace:
        command = [sys.executable, "-m", "moe_offload.bench.replayed_server"]
        command += ["--trace", *map(str, args.trace)]
        command += ["--format", args.trace_format]
        command += ["--request-tokens", str(args.prompt_tokens + args.new_tokens)]
    command += [str(checkpoint), "--device", args.device]
    command += ["--port", str(port), "--served-model-name", MODEL_NAME, "--cpu-experts", args.cpu_experts]
    command += ["--max-queue", str(max(256, max(args.clients)))]
    for option in ("device_budget", "host_budget", "max_batch_tokens"):
        value = getattr(args, option)
        if value is not None:
            command += ["--" + option.replace("_", "-"), str(value)]
    env = {k: v for k, v in os.environ.items() if k != "MOE_OFFLOAD_API_KEY"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; its log:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(
        f"the server did not answer /health within {START_TIMEOUT_S:.0f} s; its log:\n{log.read_text()}"
    )


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(moe_offload_\w+) (\S+)$", text, re.M)}


# --- the clients


def stream_one(client: httpx.Client, url: str, prompt: list[int], new_tokens: int) -> RequestTiming:
    """One streaming greedy completion; every token chunk's arrival time."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    timing = RequestTiming(sent=time.perf_counter())
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            body = response.read().decode()
            hint = " (its generation loop died: the server's log says why)" if "engine_dead" in body else ""
            raise RuntimeError(f"the server answered {response.status_code}{hint}: {body}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                timing.usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                ids = choice.get("token_ids") or []
                if ids:
                    timing.chunks.append(time.perf_counter())
                    timing.tokens += len(ids)
    return timing


def run_clients(url: str, clients: int, requests: int, prompts: list[list[int]], new_tokens: int) -> list:
    """`clients` threads, each sending `requests` requests back to back;
    returns every request's timing (raises the first client's error)."""
    results: list[list[RequestTiming]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client_loop(index: int) -> None:
        try:
            with httpx.Client() as client:
                for r in range(requests):
                    prompt = prompts[(index * requests + r) % len(prompts)]
                    results[index].append(stream_one(client, url, prompt, new_tokens))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [timing for per_client in results for timing in per_client]


# --- the figures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Round:
    """One run of N clients: what they saw and the server's metrics around it."""

    timings: list[RequestTiming]
    before: dict[str, float]
    after: dict[str, float]

    def delta(self, name: str) -> float:
        key = f"moe_offload_{name}"
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    def tokens_per_s(self) -> float:
        started = min(t.sent for t in self.timings)
        ended = max(t.chunks[-1] for t in self.timings if t.chunks)
        return sum(t.tokens for t in self.timings) / (ended - started)


def summarize(rounds: list[Round], new_tokens: int) -> dict[str, Any]:
    """Output tokens/s: the median over rounds (each round's tokens over its
    span, first request sent to last token); latencies pooled over rounds."""
    timings = [t for r in rounds for t in r.timings]
    ttft = [t.chunks[0] - t.sent for t in timings if t.chunks]
    itl = [b - a for t in timings for a, b in zip(t.chunks, t.chunks[1:], strict=False)]

    def delta(name: str) -> float:
        return sum(r.delta(name) for r in rounds)

    hits, misses = delta("offload_hits_total"), delta("offload_misses_total")
    generated = delta("generation_tokens_total")
    samples = [r.tokens_per_s() for r in rounds]
    return {
        "requests": len(timings),
        "output_tokens": sum(t.tokens for t in timings),
        "every_request_full_length": all(t.tokens == new_tokens for t in timings),
        "server_generated_tokens": generated,
        "tokens_per_s": statistics.median(samples),
        "tokens_per_s_rounds": [round(x, 2) for x in samples],
        "ttft_ms": {"p50": ms(percentile(ttft, 0.5)), "p99": ms(percentile(ttft, 0.99))},
        "itl_ms": {"p50": ms(percentile(itl, 0.5)), "p99": ms(percentile(itl, 0.99))},
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        # The offloader counts one per expert run per forward pass, whatever
        # the rows in it: batching lowers this figure.
        "cpu_experts_per_token": delta("offload_cpu_experts_total") / generated if generated else None,
        "stall_s": delta("offload_stall_seconds_total"),
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the run


def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    vocab = args.vocab
    count = max(args.clients) * args.requests_per_client
    # Ids from 1: 0 is the pad token.
    prompts = [
        torch.randint(1, vocab, (args.prompt_tokens,), generator=generator).tolist() for _ in range(count)
    ]
    # Warm-up, unmeasured: one request alone, then one round at the largest N.
    run_clients(url, 1, 1, prompts, args.new_tokens)
    run_clients(url, max(args.clients), 1, prompts[1:], args.new_tokens)
    rounds: dict[int, list[Round]] = {n: [] for n in args.clients}
    # The machine's speed drifts: every N in every round, every other round
    # in reverse order, so that a steady drift affects them alike.
    for index in range(args.rounds):
        order = args.clients if index % 2 == 0 else args.clients[::-1]
        for n in order:
            before = metrics(url)
            timings = run_clients(url, n, args.requests_per_client, prompts, args.new_tokens)
            rounds[n].append(Round(timings, before, metrics(url)))
            print(f"round {index + 1}, N={n}: {rounds[n][-1].tokens_per_s():.1f} tokens/s", file=sys.stderr)
    per_n = {str(n): summarize(rounds[n], args.new_tokens) for n in args.clients}
    one = per_n.get("1", {}).get("tokens_per_s")
    for figures in per_n.values():
        figures["ratio_to_1_client"] = figures["tokens_per_s"] / one if one else None
    return per_n


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "command": provenance.command(
            Path(sys.argv[0]).name, {str(p) for p in [*args.trace, *([args.out] if args.out else [])]}
        ),
        "commit": provenance.commit(),
        "machine": {**provenance.machine(), "torch": torch.__version__, "device": args.device},
        "load_before": load(),
        "routing": _routing(args),
        "workload": {
            "clients": args.clients,
            "requests_per_client": args.requests_per_client,
            "rounds": args.rounds,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "sampling": "greedy, streaming",
            "cpu_experts": args.cpu_experts,
        },
    }
    with tempfile.TemporaryDirectory(prefix="moe-offload-serve-bench-") as tmp:
        checkpoint, log = Path(tmp) / "checkpoint", Path(tmp) / "server.log"
        report["model"] = build_checkpoint(args, checkpoint)
        args.vocab = report["model"]["vocab"]
        process, url = start_server(args, checkpoint, log)
        try:
            report["clients"] = measure(args, url)
        except BaseException:
            print(f"the server's log:\n{log.read_text()}", file=sys.stderr)
            raise
        finally:
            stop_server(process)
        if args.trace:
            report["replayed_passes"] = replayed_passes(log)
    report["load_after"] = load()
    return report


def _routing(args: argparse.Namespace) -> str:
    if not args.trace:
        return RANDOM_ROUTING
    return "replayed from " + ", ".join(p.name for p in args.trace) + " (each request its own trace request)"


def replayed_passes(log: Path) -> int:
    """The passes whose routing the server forced, from its log at shutdown."""
    found = REPLAYED.findall(log.read_text(errors="replace"))
    if not found:
        raise SystemExit(f"the server did not report its router replay; its log:\n{log.read_text()}")
    return int(found[-1])


def markdown(report: dict[str, Any]) -> str:
    m, w = report["model"], report["workload"]
    lines = [
        f"{m['shape']}: {m['moe_layers']} MoE layers, hidden {m['hidden']}, "
        f"{m['experts']} experts top-{m['top_k']}, "
        f"{m['parameters'] / 1e9:.2f} B parameters, {m['dtype']} on {report['machine']['device']} "
        f"({report['machine']['cpu']}, {report['machine']['cores']} cores); commit {report['commit']}; "
        f"load average {report['load_before']} before, {report['load_after']} after",
        "",
        f"Each client sends {w['requests_per_client']} streaming greedy requests back to back, "
        f"in each of {w['rounds']} interleaved rounds (tokens/s: the median round), "
        f"{w['prompt_tokens']} prompt tokens and {w['new_tokens']} new tokens each. "
        f"Routing: {report['routing']}"
        + (f"; {report['replayed_passes']} passes forced." if "replayed_passes" in report else "."),
        "",
        "| clients | output tokens/s | x 1 client | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| hit rate | CPU experts/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, f in report["clients"].items():
        hit = "–" if f["hit_rate"] is None else f"{f['hit_rate']:.3f}"
        cpu = "–" if f["cpu_experts_per_token"] is None else f"{f['cpu_experts_per_token']:.1f}"
        ratio = "–" if f["ratio_to_1_client"] is None else f"{f['ratio_to_1_client']:.2f}"
        lines.append(
            f"| {n} | {f['tokens_per_s']:.1f} | {ratio} "
            f"| {f['ttft_ms']['p50']:.0f} | {f['ttft_ms']['p99']:.0f} "
            f"| {f['itl_ms']['p50']:.1f} | {f['itl_ms']['p99']:.1f} | {hit} | {cpu} |"
        )
    lines += ["", f"`{report['command']}`"]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=list(shapes.SHAPES),
        default="mixtral-8x7b",
        help="model shape (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="the server's --device (default: %(default)s)")
    add_trace_arguments(parser)
    parser.add_argument(
        "--layers", type=int, help=f"MoE layers (default: {CPU_LAYERS} on a CPU, else the model's)"
    )
    parser.add_argument(
        "--hidden", type=int, help=f"hidden size (default: {CPU_HIDDEN} on a CPU, else the model's)"
    )
    parser.add_argument("--experts", type=int, help="routed experts per layer (default: the model's)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on a CPU, else bfloat16")
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        metavar="N",
        help="concurrent clients, one run each",
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=8, metavar="R", help="default: %(default)s"
    )
    parser.add_argument("--prompt-tokens", type=int, default=16, metavar="T", help="default: %(default)s")
    parser.add_argument("--new-tokens", type=int, default=32, metavar="T", help="default: %(default)s")
    parser.add_argument(
        "--cpu-experts", default="auto", help="the server's --cpu-experts (default: %(default)s)"
    )
    parser.add_argument("--device-budget", metavar="SIZE", help="the server's --device-budget")
    parser.add_argument("--host-budget", metavar="SIZE", help="the server's --host-budget")
    parser.add_argument("--max-batch-tokens", type=int, metavar="N", help="the server's --max-batch-tokens")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="K",
        help="runs of every N, interleaved (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write results.json and results.md here")
    args = parser.parse_args()
    on_cpu = args.device.partition(":")[0] == "cpu"
    if on_cpu and args.layers is None and args.hidden is None:
        args.layers, args.hidden = CPU_LAYERS, CPU_HIDDEN
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    if (
        min(*args.clients, args.requests_per_client, args.prompt_tokens, args.rounds) < 1
        or args.new_tokens < 2
    ):
        parser.error(
            "--clients, --requests-per-client, --prompt-tokens and --rounds must be at least 1, "
            "--new-tokens at least 2"
        )
    return args


def main() -> int:
    args = parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    table = markdown(report)
    print(table)
    if args.out is not None:
        (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "results.md").write_text(table)
        print(f"wrote {args.out}/results.json, results.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
