"""Routing traces: which experts each token of each request used at every MoE
layer. Read from three formats, written in the native one.

In memory a request's routing is a `(tokens, layers, top_k)` uint32 array
(the layout the core's trace replay takes).

Formats (`format="auto"` tells them apart by name and first line):

- **jsonl** (native, written by `offloader.record_trace`): a header line
  `{"format": "moe-offload-trace", "version": 1, "num_layers": L,
  "num_experts": E, "top_k": K, "source": "..."}`, then one object per
  request, `{"request": NAME, "experts": [[[ids of token 0], [ids of
  token 1], ...] for each layer]}`, i.e. layers x tokens x top_k.
- **moe-beyond**: one (optionally gzip'd) CSV per prompt, header
  `Layer ID,Batch Number,Token,Activated Expert IDs`, rows grouped by layer;
  a directory stands for its `*.csv[.gz]` files in sorted file-name order.
  Layer ids are renumbered from 0 (DeepSeek-V2-Lite logs MoE layers 1..26).
- **speculative-moe**: JSONL, one object per (token, layer):
  `{"dataset", "problem_id", "layer", "experts", "token_idx", ...}`; a
  request is one (dataset, problem_id). Where layers logged different token
  counts, each request is cut to the tokens every layer has.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from moe_offload._core import MoeOffloadError
from moe_offload.files import atomic_write

FORMATS = ("auto", "jsonl", "moe-beyond", "speculative-moe")
NATIVE = "moe-offload-trace"
VERSION = 1


@dataclass
class Request:
    """One request's routing: `routing[t, l]` holds token t's experts at MoE layer l."""

    name: str
    routing: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.routing.shape[0])


@dataclass
class Trace:
    num_layers: int
    num_experts: int
    top_k: int
    source: str
    requests: list[Request] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)


class TraceError(MoeOffloadError):
    """A trace file that cannot be read; the message names the file and line."""


def read_trace(
    paths: str | Path | Iterable[str | Path], format: str = "auto", limit: int | None = None
) -> Trace:
    """The requests of the trace files (or directories) `paths`, in order;
    only the first `limit` when given. In a directory, files that are not
    traces (e.g. a model's outputs beside its routing) are passed over."""
    if format not in FORMATS:
        raise TraceError(f"unknown trace format {format!r}; choose one of {', '.join(FORMATS)}")
    traces: list[Trace] = []
    files: list[Path] = []
    found = 0
    for path, named in _expand([paths] if isinstance(paths, (str, Path)) else paths):
        if limit is not None and found >= limit:
            break
        kind = format if format != "auto" else _detect(path, named)
        if kind is None:
            continue
        trace = _read_file(path, kind)
        traces.append(trace)
        files.append(path)
        found += len(trace.requests)
    if not traces:
        raise TraceError(f"no trace files found in {paths}")
    merged = _concatenate(traces, files)
    if limit is not None:
        del merged.requests[limit:]
    return merged


def write_trace(path: str | Path, trace: Trace) -> None:
    """Writes `trace` in the native JSONL format, atomically (a temporary
    file renamed over `path` once complete)."""
    path = Path(path)
    header = {
        "format": NATIVE,
        "version": VERSION,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "source": trace.source,
    }

    def write(tmp: Path) -> None:
        with open(tmp, "w") as out:
            out.write(json.dumps(header) + "\n")
            for request in trace.requests:
                layers = request.routing.transpose(1, 0, 2).tolist()
                out.write(json.dumps({"request": request.name, "experts": layers}) + "\n")

    atomic_write(path, write)


def _expand(paths: Iterable[str | Path]) -> Iterator[tuple[Path, bool]]:
    """Each file with whether it was named itself (not found in a directory)."""
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.iterdir(), key=lambda f: f.name):
                if f.name.endswith((".csv", ".csv.gz", ".jsonl", ".jsonl.gz")):
                    yield f, False
        elif p.exists():
            yield p, True
        else:
            raise TraceError(f"trace file {p} does not exist")


def _open(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return open(path, encoding="utf-8")


def _detect(path: Path, named: bool = True) -> str | None:
    """The file's format; for a file found in a directory, None when it is
    not a trace."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".csv"):
        return "moe-beyond"
    with _open(path) as f:
        first = f.readline()
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        head = None
    if isinstance(head, dict) and head.get("format") == NATIVE:
        return "jsonl"
    if isinstance(head, dict) and {"problem_id", "layer", "experts"} <= head.keys():
        return "speculative-moe"
    if not named:
        return None
    keys = sorted(head)[:6] if isinstance(head, dict) else "none: it is not a JSON object"
    raise TraceError(
        f"{path}: not a trace in a known format (first-line keys: {keys}); formats: {', '.join(FORMATS[1:])}"
    )


def _read_file(path: Path, format: str) -> Trace:
    try:
        if format == "jsonl":
            return _read_native(path)
        if format == "moe-beyond":
            return _read_moe_beyond(path)
        return _read_speculative_moe(path)
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise TraceError(f"{path}: cannot read it as a {format} trace: {e}") from None


def _read_native(path: Path) -> Trace:
    with _open(path) as f:
        lines = enumerate(f, start=1)
        _, first = next(lines, (1, ""))
        header = _json(path, 1, first)
        if header.get("format") != NATIVE or header.get("version") != VERSION:
            raise TraceError(f"{path}: not a version-{VERSION} {NATIVE} file (header {first.strip()[:80]})")
        trace = Trace(header["num_layers"], header["num_experts"], header["top_k"], header.get("source", ""))
        for number, line in lines:
            if not line.strip():
                continue
            record = _json(path, number, line)
            try:
                routing = np.asarray(record["experts"], dtype=np.int64).transpose(1, 0, 2)
            except (KeyError, ValueError) as e:
                raise TraceError(
                    f"{path}:{number}: 'experts' must be layers x tokens x top_k ids ({e})"
                ) from None
            request = Request(str(record.get("request", f"request-{number - 1}")), routing)
            _check(path, number, request, trace)
            trace.requests.append(request)
    return trace


def _read_moe_beyond(path: Path) -> Trace:
    by_layer: dict[int, list[list[int]]] = {}
    with _open(path) as f:
        rows = csv.reader(f)
        header = next(rows, [])
        if [h.strip() for h in header[:1] + header[-1:]] != ["Layer ID", "Activated Expert IDs"]:
            raise TraceError(f"{path}: not a moe-beyond CSV (header {header})")
        for number, row in enumerate(rows, start=2):
            try:
                ids = [int(x) for x in row[-1].strip("[] ").split(",")]
                by_layer.setdefault(int(row[0]), []).append(ids)
            except (ValueError, IndexError):
                raise TraceError(f"{path}:{number}: cannot read the row {row}") from None
    if not by_layer:
        raise TraceError(f"{path}: no routing rows")
    layers = [by_layer[k] for k in sorted(by_layer)]
    request = Request(path.name.split(".")[0], _stack(path, layers))
    return _single(path, request)


def _read_speculative_moe(path: Path) -> Trace:
    sequences: dict[tuple[str, int], dict[int, dict[int, list[int]]]] = {}
    with _open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            r = _json(path, number, line)
            try:
                key = (str(r["dataset"]), int(r["problem_id"]))
                sequences.setdefault(key, {}).setdefault(int(r["layer"]), {})[int(r["token_idx"])] = [
                    int(e) for e in r["experts"]
                ]
            except (KeyError, TypeError, ValueError):
                raise TraceError(f"{path}:{number}: not a speculative-moe routing record") from None
    requests = []
    for (dataset, problem), layers in sorted(sequences.items()):
        ordered = [[tokens[t] for t in sorted(tokens)] for _, tokens in sorted(layers.items())]
        requests.append(Request(f"{dataset}-{problem}", _stack(path, ordered)))
    return _concatenate([_single(path, r) for r in requests], [path] * len(requests))


def _stack(path: Path, layers: list[list[list[int]]]) -> np.ndarray:
    """(tokens, layers, top_k) from per-layer token lists, cut to the tokens
    every layer has."""
    tokens = min(len(t) for t in layers)
    try:
        return np.asarray([t[:tokens] for t in layers], dtype=np.int64).transpose(1, 0, 2)
    except ValueError:
        raise TraceError(f"{path}: tokens route to different numbers of experts") from None


def _single(path: Path, request: Request) -> Trace:
    experts = int(request.routing.max()) + 1 if request.routing.size else 0
    trace = Trace(request.routing.shape[1], experts, request.routing.shape[2], path.name)
    _check(path, 0, request, trace)
    trace.requests.append(request)
    return trace


def _check(path: Path, line: int, request: Request, trace: Trace) -> None:
    where = f"{path}:{line}" if line else str(path)
    r = request.routing
    if r.ndim != 3 or r.shape[1:] != (trace.num_layers, trace.top_k):
        raise TraceError(
            f"{where}: request {request.name!r} has routing of shape {r.shape}, "
            f"expected (tokens, {trace.num_layers} layers, top_k {trace.top_k})"
        )
    if r.size and (r.min() < 0 or r.max() >= trace.num_experts):
        raise TraceError(
            f"{where}: request {request.name!r} names experts outside 0..{trace.num_experts - 1}"
        )
    request.routing = np.ascontiguousarray(r, dtype=np.uint32)


def _concatenate(traces: list[Trace], files: list[Path]) -> Trace:
    first = traces[0]
    shape = (first.num_layers, first.top_k)
    merged = Trace(first.num_layers, max(t.num_experts for t in traces), first.top_k, first.source)
    for trace, f in zip(traces, files, strict=True):
        if (trace.num_layers, trace.top_k) != shape:
            raise TraceError(
                f"{f}: {trace.num_layers} layers with top-{trace.top_k} routing, but {files[0]} has "
                f"{shape[0]} layers with top-{shape[1]}; replay one model's traces at a time"
            )
        merged.requests.extend(trace.requests)
    if len({f.parent for f in files}) == 1 and len(files) > 1:
        merged.source = str(files[0].parent.name)
    return merged


def _json(path: Path, number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}:{number}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path}:{number}: expected a JSON object")
    return value
