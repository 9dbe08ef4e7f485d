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

Reading is bounded: every line is read with a length limit (a file without
line breaks, such as `/dev/zero`, fails at its first line), and every count
and id is checked against the limits below before anything is sized from it.
Anything malformed raises `TraceError` naming the file and, where one line is
at fault, the line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from moe_offload._core import MoeOffloadError
from moe_offload.files import atomic_write

FORMATS = ("auto", "jsonl", "moe-beyond", "speculative-moe")
NATIVE = "moe-offload-trace"
VERSION = 1
SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz")

# Limits on what a trace may claim. Real MoE models have under 100 MoE layers
# and a few hundred experts per layer; these leave ample room, and bound what
# the replay allocates per expert (layers x experts entries, times the EAMC
# capacity for the collection).
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
# A header, a CSV row or a speculative-moe record is one token at one layer
# (about 100 bytes in the real traces).
MAX_LINE = 1 << 20
# A native request line holds a whole request: 65,536 tokens of a 48-layer
# top-8 model (Qwen3-30B-A3B) take about 125 MB as `write_trace` writes them.
MAX_REQUEST_LINE = 1 << 27


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
    if limit is not None and (type(limit) is not int or limit < 1):
        raise TraceError(f"limit={limit!r}: read at least one request (a positive integer)")
    named = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not named:
        raise TraceError("no trace file or directory given")
    traces: list[Trace] = []
    files: list[Path] = []
    found = 0
    for path, given in _expand(named):
        if limit is not None and found >= limit:
            break
        kind = format if format != "auto" else _detect(path, given)
        if kind is None:
            continue
        trace = _read_file(path, kind, None if limit is None else limit - found)
        traces.append(trace)
        files.append(path)
        found += len(trace.requests)
    if not traces:
        raise TraceError(
            f"no trace files found in {', '.join(map(str, named))}: a directory is read for its "
            f"{', '.join('*' + s for s in SUFFIXES)} trace files, not its subdirectories"
        )
    merged = _concatenate(traces, files)
    if not merged.requests:
        raise TraceError(f"{', '.join(map(str, files))}: no requests, only a header")
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


def _expand(paths: list[Path]) -> Iterator[tuple[Path, bool]]:
    """Each file with whether it was named itself (not found in a directory)."""
    for p in paths:
        if p.is_dir():
            try:
                entries = sorted(p.iterdir(), key=lambda f: f.name)
            except OSError as e:
                raise TraceError(f"{p}: cannot list the directory ({e.strerror})") from None
            for f in entries:
                if f.name.endswith(SUFFIXES) and not f.is_dir():
                    yield f, False
        elif p.exists():
            yield p, True
        else:
            raise TraceError(f"trace file {p} does not exist")


class _Lines:
    """A trace file's lines, each read with a length limit and decoded as
    UTF-8; `number` is the line last read (1-based). Every read error
    becomes a TraceError naming the file and line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.number = 0
        try:
            raw = open(path, "rb")  # noqa: SIM115 (closed by __exit__)
        except OSError as e:
            raise TraceError(f"{path}: cannot open it ({e.strerror})") from None
        # A BufferedReader over gzip: its readline runs in C, not GzipFile's Python.
        gz = path.name.endswith(".gz")
        self._file: IO[bytes] = io.BufferedReader(gzip.GzipFile(fileobj=raw)) if gz else raw
        self._raw = raw

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self._raw.close()

    def read(self, limit: int = MAX_LINE) -> str | None:
        """The next line, or None at the end of the file."""
        try:
            raw = self._file.readline(limit + 1)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise TraceError(f"{self.path}:{self.number + 1}: cannot read it ({e})") from None
        if not raw:
            return None
        self.number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise TraceError(
                f"{self.where}: line longer than {limit:,} bytes; not a trace in this format "
                "(or a damaged file)"
            )
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TraceError(
                f"{self.where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                "is it a binary file?"
            ) from None

    def __iter__(self) -> Iterator[str]:
        while (line := self.read()) is not None:
            yield line

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


def _detect(path: Path, named: bool = True) -> str | None:
    """The file's format; for a file found in a directory, None when it is
    not a trace."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".csv"):
        return "moe-beyond"
    with _Lines(path) as lines:
        first = lines.read() or ""
    head = _loads(first)
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


def _read_file(path: Path, format: str, wanted: int | None) -> Trace:
    with _Lines(path) as lines:
        if format == "jsonl":
            return _read_native(lines, wanted)
        if format == "moe-beyond":
            return _read_moe_beyond(lines)
        return _read_speculative_moe(lines)


def _read_native(lines: _Lines, wanted: int | None) -> Trace:
    """The header, then request lines until the end or `wanted` requests."""
    header = _json(lines.path, 1, lines.read() or "")
    if header.get("format") != NATIVE or header.get("version") != VERSION:
        raise TraceError(
            f"{lines.where}: not a version-{VERSION} {NATIVE} file "
            f"(format {_shown(header.get('format'))}, version {_shown(header.get('version'))})"
        )
    num_layers = _header_count(lines, header, "num_layers", MAX_LAYERS)
    num_experts = _header_count(lines, header, "num_experts", MAX_EXPERTS)
    top_k = _header_count(lines, header, "top_k", num_experts)
    trace = Trace(num_layers, num_experts, top_k, str(header.get("source", "")))
    while wanted is None or len(trace.requests) < wanted:
        line = lines.read(MAX_REQUEST_LINE)
        if line is None:
            break
        if not line.strip():
            continue
        record = _json(lines.path, lines.number, line)
        routing = _native_routing(lines.where, record, trace)
        request = Request(str(record.get("request", f"request-{lines.number - 1}")), routing)
        _check(lines.where, request, trace)
        trace.requests.append(request)
    return trace


def _header_count(lines: _Lines, header: dict, key: str, upper: int) -> int:
    value = header.get(key)
    if type(value) is not int or not 1 <= value <= upper:
        got = "it is missing" if key not in header else f"got {_shown(value)}"
        raise TraceError(f"{lines.path}:1: header field {key!r} must be an integer in 1..{upper} ({got})")
    return value


def _native_routing(where: str, record: dict, trace: Trace) -> np.ndarray:
    """A request line's `experts` (layers x tokens x top_k ids) as a
    (tokens, layers, top_k) array, every id an integer below num_experts."""
    layers = record.get("experts")
    shape = (
        f"a list of {trace.num_layers} layers, each a list of tokens, each a list of {trace.top_k} expert ids"
    )
    if not isinstance(layers, list) or len(layers) != trace.num_layers:
        raise TraceError(f"{where}: 'experts' must be {shape} (got {_shown(layers)})")
    tokens = len(layers[0]) if isinstance(layers[0], list) else 0
    flat: list[Any] = []
    for layer, per_token in enumerate(layers):
        if not isinstance(per_token, list) or len(per_token) != tokens:
            raise TraceError(
                f"{where}: layer {layer} of 'experts' is not a list of {tokens} tokens like layer 0"
            )
        for token, ids in enumerate(per_token):
            if not isinstance(ids, list) or len(ids) != trace.top_k:
                raise TraceError(
                    f"{where}: layer {layer}, token {token}: expected a list of {trace.top_k} expert ids, "
                    f"got {_shown(ids)}"
                )
            flat.extend(ids)
    bad = _first_bad_id(flat, trace.num_experts)
    if bad is not None:
        layer, token = divmod(bad // trace.top_k, tokens)
        raise TraceError(
            f"{where}: layer {layer}, token {token}: expert id {_shown(flat[bad])} is not an integer "
            f"in 0..{trace.num_experts - 1}"
        )
    routing = np.array(flat, dtype=np.uint32).reshape(trace.num_layers, tokens, trace.top_k)
    return routing.transpose(1, 0, 2)


def _first_bad_id(ids: list[Any], num_experts: int) -> int | None:
    """Index of the first id that is not an int in 0..num_experts-1 (bools,
    floats such as 1.7 and strings are not ids), or None."""
    if set(map(type, ids)) <= {int} and (not ids or (min(ids) >= 0 and max(ids) < num_experts)):
        return None
    return next(i for i, e in enumerate(ids) if type(e) is not int or not 0 <= e < num_experts)


def _read_moe_beyond(lines: _Lines) -> Trace:
    path = lines.path
    by_layer: dict[int, list[list[int]]] = {}
    layer_of: dict[str, int] = {}  # Layer ID cells as written: a few distinct ones
    rows = csv.reader(lines)
    try:
        header = next(rows, [])
        if [h.strip() for h in header[:1] + header[-1:]] != ["Layer ID", "Activated Expert IDs"]:
            raise TraceError(f"{path}:1: not a moe-beyond CSV (header {_shown(header)})")
        for row in rows:
            if not row:
                continue
            if len(row) != len(header):
                raise TraceError(f"{lines.where}: {len(row)} columns, the header has {len(header)}")
            layer = layer_of.get(row[0])
            if layer is None:
                layer = layer_of[row[0]] = _csv_layer(lines, row[0])
            if layer not in by_layer and len(by_layer) == MAX_LAYERS:
                raise TraceError(f"{lines.where}: more than {MAX_LAYERS} layers")
            by_layer.setdefault(layer, []).append(_csv_ids(lines, row[-1]))
    except csv.Error as e:
        raise TraceError(f"{lines.where}: not a CSV row ({e})") from None
    if not by_layer:
        raise TraceError(f"{path}: no routing rows")
    layers = [by_layer[k] for k in sorted(by_layer)]
    request = Request(path.name.split(".")[0], _stack(path, layers))
    return _single(path, request)


def _csv_layer(lines: _Lines, text: str) -> int:
    text = text.strip()
    # Plain ASCII digits only: int() would also take "1_0", "+1" and other scripts' digits.
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise TraceError(f"{lines.where}: Layer ID {_shown(text)} is not a non-negative integer")
    return int(text)


# An Activated Expert IDs cell as the traces write it, "[8, 26, 56]": read
# without a JSON parse (a million rows per 400 prompts); any other cell goes
# through JSON, for a precise error.
_ID_LIST = re.compile(r"\[ *\d{1,9}(?: *, *\d{1,9})* *\]", re.ASCII)


def _csv_ids(lines: _Lines, text: str) -> list[int]:
    """The Activated Expert IDs cell: a JSON list of distinct expert ids."""
    text = text.strip()
    if _ID_LIST.fullmatch(text):
        ids: Any = list(map(int, text[1:-1].split(",")))
        if max(ids) < MAX_EXPERTS and len(set(ids)) == len(ids):
            return ids
    else:
        ids = _loads(text)
    if not isinstance(ids, list) or not ids:
        raise TraceError(f"{lines.where}: Activated Expert IDs {_shown(text)} is not a list of expert ids")
    return _record_ids(lines, ids)


def _record_ids(lines: _Lines, ids: list[Any]) -> list[int]:
    """One token's expert ids at one layer (the line last read): distinct
    ints below MAX_EXPERTS."""
    bad = _first_bad_id(ids, MAX_EXPERTS)
    if bad is not None:
        raise TraceError(
            f"{lines.where}: expert id {_shown(ids[bad])} is not an integer in 0..{MAX_EXPERTS - 1}"
        )
    if len(set(ids)) != len(ids):
        raise TraceError(
            f"{lines.where}: expert ids {_shown(ids)} name an expert twice; top-k experts are distinct"
        )
    return ids


def _read_speculative_moe(lines: _Lines) -> Trace:
    path = lines.path
    sequences: dict[tuple[str, int], dict[int, dict[int, list[int]]]] = {}
    layer_ids: set[int] = set()
    for line in lines:
        if not line.strip():
            continue
        r = _json(path, lines.number, line)
        dataset, problem, layer, token = (r.get(k) for k in ("dataset", "problem_id", "layer", "token_idx"))
        if not isinstance(dataset, str) or type(problem) is not int:
            raise TraceError(
                f"{lines.where}: not a speculative-moe routing record (needs a string 'dataset' and an "
                f"integer 'problem_id'; got {_shown(dataset)}, {_shown(problem)})"
            )
        for key, value in (("layer", layer), ("token_idx", token)):
            if type(value) is not int or value < 0:
                raise TraceError(
                    f"{lines.where}: {key!r} must be a non-negative integer (got {_shown(value)})"
                )
        experts = r.get("experts")
        if not isinstance(experts, list) or not experts:
            raise TraceError(f"{lines.where}: 'experts' must be a list of expert ids (got {_shown(experts)})")
        layer_ids.add(layer)
        if len(layer_ids) > MAX_LAYERS:
            raise TraceError(f"{lines.where}: more than {MAX_LAYERS} layers")
        tokens = sequences.setdefault((dataset, problem), {}).setdefault(layer, {})
        if token in tokens:
            raise TraceError(
                f"{lines.where}: token {token} of layer {layer} of {dataset}-{problem} is logged twice"
            )
        tokens[token] = _record_ids(lines, experts)
    requests = []
    for (dataset, problem), layers in sorted(sequences.items()):
        if layers.keys() != layer_ids:
            missing = sorted(layer_ids - layers.keys())[:5]
            raise TraceError(f"{path}: request {dataset}-{problem} logged no token at layers {missing}")
        ordered = [[tokens[t] for t in sorted(tokens)] for _, tokens in sorted(layers.items())]
        requests.append(Request(f"{dataset}-{problem}", _stack(path, ordered)))
    if not requests:
        raise TraceError(f"{path}: no routing records")
    return _concatenate([_single(path, r) for r in requests], [path] * len(requests))


def _stack(path: Path, layers: list[list[list[int]]]) -> np.ndarray:
    """(tokens, layers, top_k) from per-layer token lists of checked ids, cut
    to the tokens every layer has."""
    tokens = min(len(t) for t in layers)
    top_k = len(layers[0][0])
    if any(len(ids) != top_k for per_layer in layers for ids in per_layer[:tokens]):
        raise TraceError(f"{path}: tokens route to different numbers of experts (the first to {top_k})")
    return np.asarray([t[:tokens] for t in layers], dtype=np.uint32).transpose(1, 0, 2)


def _single(path: Path, request: Request) -> Trace:
    experts = int(request.routing.max()) + 1 if request.routing.size else 1
    trace = Trace(request.routing.shape[1], experts, request.routing.shape[2], path.name)
    _check(str(path), request, trace)
    trace.requests.append(request)
    return trace


def _check(where: str, request: Request, trace: Trace) -> None:
    """The request's routing fits the trace's shape and ids, and no token
    names one expert twice at a layer."""
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
    ordered = np.sort(r, axis=2)
    twice = np.argwhere(ordered[..., 1:] == ordered[..., :-1])
    if len(twice):
        token, layer, j = twice[0]
        raise TraceError(
            f"{where}: request {request.name!r}, token {token}, layer {layer} names expert "
            f"{ordered[token, layer, j]} twice; top-k experts are distinct"
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


def _loads(text: str) -> Any:
    """The JSON value of `text`, or None when it is not JSON (including
    numbers beyond Python's digit limit and nesting beyond its recursion
    limit)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json(path: Path, number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as e:
        reason = e if isinstance(e, ValueError) else "nested too deeply"
        raise TraceError(f"{path}:{number}: not JSON ({reason})") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path}:{number}: expected a JSON object, got {_shown(value)}")
    return value


def _shown(value: object, width: int = 60) -> str:
    """`value`'s repr, cut to `width` characters for messages."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
