"""Expert store benchmarks, one run, one random Mixtral-style model:

1. read: the store read into host memory by the copy workers (direct I/O)
   against `dd` reading the same files, buffered and with iflag=direct —
   like against like: the store's N workers against N `dd` processes at
   once, and the store with one worker against one `dd` at a time;
2. load: `from_pretrained` on the converted store (every expert into host
   memory) and on the checkpoint read in place, against safetensors'
   `load_file` and transformers' `from_pretrained` of the same weights;
3. decode: tokens/s with three tiers (host_budget = a third of the experts)
   against every expert in host memory (`patch`), same device budget;
4. rss: peak RSS with experts = 4 x host_budget, against the baseline of a
   process that only imports torch, transformers and moe-offload.

Every measured step runs in a fresh process after the page cache is dropped
(`echo 3 > /proc/sys/vm/drop_caches`, which needs root; without it the
results say so).

    .venv/bin/python benches/store.py --out benches/results/store-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import moe_offload
from moe_offload import _core
from moe_offload.demo import build_model

BENCHES = Path(__file__).resolve().parent
SHARD = "1GB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "moe-offload-bench")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--io-workers", type=int, default=8)
    parser.add_argument("--device-fraction", type=float, default=0.25, help="device budget / expert bytes")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the read and load steps")
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(STEPS[args.step](args)))
        return 0
    return run_all(args)


# --- the parent: prepare once, then each step in a fresh process


def run_all(args: argparse.Namespace) -> int:
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(args.work),
        "model": model_facts(args),
        "page_cache": "dropped before every step" if can_drop_caches() else "NOT dropped (not root)",
    }
    report["conversion"] = prepare(args)
    # Disk and CPU are shared and noisy: the read and load steps run in
    # interleaved rounds and report medians, the decode steps alternate.
    rounds = [{name: step(args, name) for name in READ_AND_LOAD} for _ in range(args.repeats)]
    decodes = [{name: step(args, name) for name in DECODE} for _ in range(args.decode_repeats)]
    once = {name: step(args, name) for name in ("rss-baseline", "rss-three-tier")}
    limited = [{name: step(args, name, MEMORY_LIMIT) for name in LIMITED} for _ in range(args.decode_repeats)]

    def median(results: list[dict], name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in results)

    def samples(results: list[dict], name: str, key: str) -> list[float]:
        return [round(r[name][key], 3) for r in results]

    read = {name: median(rounds, name, "gb_per_s") for name in READ_AND_LOAD if name.startswith("read-")}
    report["read_gb_per_s"] = {
        "median": read,
        "samples": {name: samples(rounds, name, "gb_per_s") for name in read},
        "store_direct_io": rounds[0]["read-store"]["direct_io"],
        "bytes": rounds[0]["read-store"]["bytes"],
        # Like against like: N workers against N dd processes at once, one
        # worker against one dd at a time.
        "store_fresh_memory / dd_parallel": read["read-store"] / read["read-dd-parallel"],
        "store_fresh_memory / dd_direct_parallel": read["read-store"] / read["read-dd-direct-parallel"],
        "store_reused_slots / dd_parallel": read["read-store-reused"] / read["read-dd-parallel"],
        "store_reused_slots / dd_direct_parallel": (
            read["read-store-reused"] / read["read-dd-direct-parallel"]
        ),
        "store_one_worker / dd": read["read-store-one-worker"] / read["read-dd"],
        "store_one_worker / dd_direct": read["read-store-one-worker"] / read["read-dd-direct"],
    }
    load = {name: median(rounds, name, "seconds") for name in READ_AND_LOAD if name.startswith("load-")}
    touched = median(rounds, "load-safetensors", "touched_seconds")
    report["load_seconds"] = {
        "median": {**load, "load-safetensors + first access": touched},
        "samples": {name: samples(rounds, name, "seconds") for name in load},
        "safetensors / store": load["load-safetensors"] / load["load-store"],
        "safetensors + first access / store": touched / load["load-store"],
        "transformers / store": load["load-transformers"] / load["load-store"],
        "in place / store": load["load-in-place"] / load["load-store"],
    }
    host = median(decodes, "decode-host", "tokens_per_s")
    tiers = median(decodes, "decode-three-tier", "tokens_per_s")
    in_place = median(decodes, "decode-three-tier-in-place", "tokens_per_s")
    report["decode"] = {
        "tokens_per_s": {"host_only": host, "three_tier": tiers, "three_tier_in_place": in_place},
        "samples": {name: samples(decodes, name, "tokens_per_s") for name in DECODE},
        "three_tier / host_only": tiers / host,
        "three_tier_in_place / host_only": in_place / host,
        "same_tokens": all(len({str(d[name]["tokens"]) for name in DECODE}) == 1 for d in decodes),
        "last_run": {name: {k: v for k, v in decodes[-1][name].items() if k != "tokens"} for name in DECODE},
    }
    if all(limited):
        store = median(limited, "decode-limited-store", "tokens_per_s")
        in_place = median(limited, "decode-limited-in-place", "tokens_per_s")
        report["decode_memory_limited"] = {
            "memory_limit_bytes": MEMORY_LIMIT,
            "tokens_per_s": {"store": store, "in_place": in_place},
            "samples": {name: samples(limited, name, "tokens_per_s") for name in LIMITED},
            "store / in_place": store / in_place,
            "last_run": limited[-1],
        }
    base, rss = once["rss-baseline"], once["rss-three-tier"]
    bound = rss["host_budget"] + rss["non_expert_bytes"] + rss["device_budget"]
    report["rss"] = {
        **rss,
        "baseline_peak_rss": base["peak_rss"],
        "overhead_beyond_budgets": rss["peak_rss"] - bound,
        "overhead_beyond_budgets_and_baseline": rss["peak_rss"] - bound - base["peak_rss"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


READ_AND_LOAD = (
    "read-dd",
    "read-dd-direct",
    "read-dd-parallel",
    "read-dd-direct-parallel",
    "read-store",
    "read-store-one-worker",
    "read-store-reused",
    "load-store",
    "load-in-place",
    "load-safetensors",
    "load-transformers",
)
DECODE = ("decode-host", "decode-three-tier", "decode-three-tier-in-place")


# Less memory than the model's experts, so the page cache cannot hold them.
MEMORY_LIMIT = 2 << 30
LIMITED = ("decode-limited-store", "decode-limited-in-place")
CGROUP = Path("/sys/fs/cgroup/memory/moe-offload-bench")


def step(args: argparse.Namespace, name: str, memory_limit: int | None = None) -> dict:
    """Runs one step in a fresh process, optionally inside a memory cgroup
    (which charges the page cache too); {} when no such cgroup can be made."""
    drop_caches()
    command = [sys.executable, __file__, "--step", name, *forwarded(args)]
    if memory_limit is not None:
        if not memory_cgroup(memory_limit):
            return {}
        command = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name}: {result}", file=sys.stderr)
    return result


def memory_cgroup(limit: int) -> bool:
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(f"{limit}\n")
        return True
    except OSError:
        return False


def forwarded(args: argparse.Namespace) -> list[str]:
    names = ("work", "layers", "experts", "hidden", "tokens", "io_workers", "device_fraction")
    return [part for n in names for part in (f"--{n.replace('_', '-')}", str(getattr(args, n)))]


def prepare(args: argparse.Namespace) -> dict:
    """The checkpoint (save_pretrained, sharded) and its store, built once."""
    checkpoint, store = paths(args)
    facts = args.work / "conversion.json"
    if facts.exists() and (store / "moe-store.json").exists():
        return json.loads(facts.read_text())
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.layers, args.experts, args.hidden, seed=0)
    model.save_pretrained(checkpoint, max_shard_size=SHARD)
    del model
    drop_caches()
    done = moe_offload.convert(checkpoint, store, overwrite=True)
    result = {
        "experts": done.experts,
        "expert_bytes": done.expert_bytes,
        "seconds": done.seconds,
        "mb_per_s": done.mb_per_s,
        "note": "cold checkpoint, float32 to float32",
    }
    facts.write_text(json.dumps(result))
    return result


def paths(args: argparse.Namespace) -> tuple[Path, Path]:
    tag = f"mixtral-l{args.layers}-e{args.experts}-h{args.hidden}"
    return args.work / f"{tag}-checkpoint", args.work / f"{tag}-store"


# --- the steps, each in its own process


def read_dd(args: argparse.Namespace, direct: bool = False, parallel: int = 1) -> dict:
    """`dd` of every layer file, `parallel` of them at a time."""
    _, store = paths(args)
    files = sorted(store.glob("layer-*.bin"))
    flags = ["iflag=direct"] if direct else []
    running: list[subprocess.Popen] = []
    started = time.perf_counter()
    for f in files:
        if len(running) == parallel:
            finish(running.pop(0))
        command = ["dd", f"if={f}", "of=/dev/null", "bs=8M", *flags]
        running.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for process in running:
        finish(process)
    seconds = time.perf_counter() - started
    total = sum(f.stat().st_size for f in files)
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9, "parallel": parallel}


def finish(process: subprocess.Popen) -> None:
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(map(str, process.args))} failed")


def read_store(args: argparse.Namespace, host_slots: int | None = None, workers: int | None = None) -> dict:
    """Every blob read into host memory by the copy workers (`workers`,
    default `--io-workers`), through a host cache of `host_slots` slots
    (default: room for all, so every page of it is touched for the first
    time; fewer slots are reused, as in decoding)."""
    workers = workers or args.io_workers
    _, store_dir = paths(args)
    store = _core.ExpertStore.open(store_dir)
    layers = [
        (len(layer["blobs"]), layer["blob_bytes"]) for layer in json.loads(store.index_json())["layers"]
    ]
    slot = -(-max(b for _, b in layers) // 4096) * 4096
    experts = sum(n for n, _ in layers)
    pool = torch.empty(slot, dtype=torch.uint8)
    cache = _core.ExpertCache(
        layers=layers,
        pool_address=pool.data_ptr(),
        pool_owner=pool,
        slot_bytes=slot,
        n_slots=1,
        copy_workers=workers,
        policy="lru",
        store=store,
        host_slots=host_slots or experts,
    )
    pairs = [(layer, e) for layer, (n, _) in enumerate(layers) for e in range(n)]
    started = time.perf_counter()
    cache.preload(pairs)
    seconds = time.perf_counter() - started
    stats = cache.host_stats()
    return {
        "bytes": stats["bytes_from_store"],
        "seconds": seconds,
        "gb_per_s": stats["bytes_from_store"] / seconds / 1e9,
        "direct_io": store.direct_io,
        "workers": workers,
        "host_slots": host_slots or experts,
    }


def load_store(args: argparse.Namespace, in_place: bool = False) -> dict:
    checkpoint, store = paths(args)
    device_budget = int(expert_bytes_of_store(store) * args.device_fraction)
    started = time.perf_counter()
    model, offloader = moe_offload.from_pretrained(
        checkpoint if in_place else store,
        device="cpu",
        device_budget=device_budget,
        host_budget="1TiB",
        io_workers=args.io_workers,
    )
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "host_slots": offloader.stats()["host_slots"], "peak_rss": peak_rss()}


def load_safetensors(args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file

    checkpoint, _ = paths(args)
    started = time.perf_counter()
    tensors = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(shard))
    seconds = time.perf_counter() - started
    # load_file maps the files: the bytes reach this process's memory on
    # first access. One element per 4 KiB page brings them all in.
    for tensor in tensors.values():
        flat = tensor.reshape(-1)
        flat[:: max(1, 4096 // tensor.element_size())].sum()
    touched = time.perf_counter() - started
    return {
        "seconds": seconds,
        "touched_seconds": touched,
        "bytes": sum(t.nbytes for t in tensors.values()),
        "peak_rss": peak_rss(),
    }


def load_transformers(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    checkpoint, _ = paths(args)
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(checkpoint)
    return {"seconds": time.perf_counter() - started, "peak_rss": peak_rss()}


def expert_bytes_of(model: torch.nn.Module) -> int:
    return sum(b.num_experts * b.expert_bytes for b in moe_offload.adapters.find_expert_blocks(model))


def decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> list[float]:
    """Per-token decode latencies through the KV cache (prefill excluded)."""
    latencies = []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        for _ in range(tokens):
            token = out.logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            latencies.append(time.perf_counter() - started)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(latencies) * 1e3,
        "tokens_per_s": len(latencies) / sum(latencies),
    }


def decode(model: torch.nn.Module, offloader: moe_offload.Offloader, args: argparse.Namespace) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    decode_seconds(model, prompt, 4)  # warm the caches and the allocator
    offloader.reset_stats()
    latencies = decode_seconds(model, prompt, args.tokens)
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    stats = offloader.stats()
    keep = ("hit_rate", "stall_seconds", "host_hits", "host_misses", "host_staged", "bytes_from_store")
    return {
        **summary(latencies),
        **{k: stats[k] for k in keep if k in stats},
        "device_budget": stats["budget_bytes"],
        "host_budget": stats.get("host_budget_bytes"),
        "tokens": tokens[0].tolist(),
        "peak_rss": peak_rss(),
    }


def decode_host(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    checkpoint, _ = paths(args)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    budget = int(expert_bytes_of(model) * args.device_fraction)
    offloader = moe_offload.patch(model, device="cpu", device_budget=budget)
    return decode(model, offloader, args)


def decode_three_tier(args: argparse.Namespace, in_place: bool = False) -> dict:
    """host_budget = a third of the experts; disk = the store, or the
    checkpoint read in place."""
    checkpoint, store = paths(args)
    experts = expert_bytes_of_store(store)
    model, offloader = moe_offload.from_pretrained(
        checkpoint if in_place else store,
        device="cpu",
        device_budget=int(experts * args.device_fraction),
        host_budget=experts // 3,
        io_workers=args.io_workers,
    )
    return decode(model, offloader, args)


def decode_limited(args: argparse.Namespace, in_place: bool) -> dict:
    """A model larger than the memory it may use (see MEMORY_LIMIT): host
    cache a quarter of the experts, four device slots."""
    checkpoint, store = paths(args)
    experts = expert_bytes_of_store(store)
    layers = json.loads((store / "moe-store.json").read_text())["layers"]
    model, offloader = moe_offload.from_pretrained(
        checkpoint if in_place else store,
        device="cpu",
        device_budget=4 * max(layer["stride"] for layer in layers),
        host_budget=experts // 4,
        io_workers=args.io_workers,
    )
    result = decode(model, offloader, args)
    return {k: v for k, v in result.items() if k != "tokens"}


def expert_bytes_of_store(store: Path) -> int:
    layers = json.loads((store / "moe-store.json").read_text())["layers"]
    return sum(len(layer["blobs"]) * layer["blob_bytes"] for layer in layers)


def rss_baseline(args: argparse.Namespace) -> dict:
    """What the interpreter, torch, transformers and moe-offload take alone."""
    import transformers  # noqa: F401

    return {"peak_rss": peak_rss()}


def rss_three_tier(args: argparse.Namespace) -> dict:
    """Experts = 4 x host_budget; a device budget of four slots (in host
    memory here, so it counts towards RSS)."""
    _, store = paths(args)
    experts = expert_bytes_of_store(store)
    layers = json.loads((store / "moe-store.json").read_text())["layers"]
    model, offloader = moe_offload.from_pretrained(
        store,
        device="cpu",
        device_budget=4 * max(layer["stride"] for layer in layers),
        host_budget=int(experts / 4),
        io_workers=args.io_workers,
    )
    result = decode(model, offloader, args)
    non_expert = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    return {
        "expert_bytes": experts,
        "host_budget": result["host_budget"],
        "device_budget": result["device_budget"],
        "non_expert_bytes": non_expert,
        "peak_rss": result["peak_rss"],
        "tokens_per_s": result["tokens_per_s"],
    }


STEPS = {
    "read-dd": read_dd,
    "read-dd-direct": lambda args: read_dd(args, direct=True),
    "read-dd-parallel": lambda args: read_dd(args, parallel=args.io_workers),
    "read-dd-direct-parallel": lambda args: read_dd(args, direct=True, parallel=args.io_workers),
    "read-store": read_store,
    "read-store-one-worker": lambda args: read_store(args, workers=1),
    "read-store-reused": lambda args: read_store(args, host_slots=2 * args.io_workers),
    "load-store": load_store,
    "load-in-place": lambda args: load_store(args, in_place=True),
    "load-safetensors": load_safetensors,
    "load-transformers": load_transformers,
    "decode-host": decode_host,
    "decode-three-tier": decode_three_tier,
    "decode-three-tier-in-place": lambda args: decode_three_tier(args, in_place=True),
    "decode-limited-store": lambda args: decode_limited(args, in_place=False),
    "decode-limited-in-place": lambda args: decode_limited(args, in_place=True),
    "rss-baseline": rss_baseline,
    "rss-three-tier": rss_three_tier,
}


# --- facts about the run


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM; getrusage's
    ru_maxrss would carry the parent's peak over fork and exec)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    if can_drop_caches():
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def machine(work: Path) -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    memory = next(
        int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")
    )
    work.mkdir(parents=True, exist_ok=True)
    df = (
        subprocess.run(["df", "-T", str(work)], capture_output=True, text=True)
        .stdout.splitlines()[-1]
        .split()
    )
    device = Path(df[0]).name
    rotational = Path(f"/sys/block/{device}/queue/rotational")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=BENCHES).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "disk": {
            "device": device,
            "filesystem": df[1],
            "rotational_flag": rotational.read_text().strip() if rotational.exists() else None,
        },
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "moe_offload_commit": commit.strip(),
    }


def model_facts(args: argparse.Namespace) -> dict:
    return {
        "family": "Mixtral-style, random weights, float32",
        "layers": args.layers,
        "experts": args.experts,
        "hidden": args.hidden,
        "intermediate": args.hidden * 2,
        "decode_tokens": args.tokens,
        "io_workers": args.io_workers,
        "device_budget_fraction": args.device_fraction,
    }


if __name__ == "__main__":
    sys.exit(main())
