"""Fuzzing the trace readers: random and mutated inputs in every format
(native JSONL, moe-beyond CSV, speculative-moe JSONL, each also gzip'd) only
ever give a valid trace or a TraceError naming the file (and a line of it
that exists) — never another exception, a hang or memory beyond a small bound.
Each format runs for a fixed number of examples."""

from __future__ import annotations

import gzip
import json
import re
import signal
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_offload.traces import MAX_LINE, TraceError, read_trace

# Inputs are at most a few KiB: reading one may take a few MiB (one bounded
# line buffer, parsing), never memory sized from what the file claims.
MEMORY_BOUND = 32 << 20
SECONDS_BOUND = 20
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def native_file(layers: int = 2, experts: int = 4, top_k: int = 2) -> bytes:
    header = {"format": "moe-offload-trace", "version": 1, "num_layers": layers}
    header |= {"num_experts": experts, "top_k": top_k, "source": "fuzz"}
    lines = [json.dumps(header)]
    for r in range(2):
        tokens = [[[(t + i + j) % experts for j in range(top_k)] for t in range(3)] for i in range(layers)]
        lines.append(json.dumps({"request": f"r{r}", "experts": tokens}))
    return ("\n".join(lines) + "\n").encode()


def moe_beyond_file() -> bytes:
    rows = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
    rows += [f'{layer},0,"tok {t}","[{t % 4}, {4 + layer}]"' for layer in (1, 2) for t in range(3)]
    return ("\n".join(rows) + "\n").encode()


def speculative_file() -> bytes:
    rows = [
        {"dataset": "d", "problem_id": p, "layer": layer, "experts": [t % 4, 4 + layer], "token_idx": t}
        for p in range(2)
        for layer in range(2)
        for t in range(3)
    ]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


SEEDS = {"jsonl": native_file(), "moe-beyond": moe_beyond_file(), "speculative-moe": speculative_file()}
NAMES = {"jsonl": "t.jsonl", "moe-beyond": "prompt_1_data.csv", "speculative-moe": "d_routing.jsonl"}

# Fragments that trip parsers: wrong types, huge and negative numbers, deep
# nesting, structure characters, bytes that are not UTF-8.
FRAGMENTS = [
    b"null", b"true", b"1.7", b"-1", b"1e999", b"NaN", b"Infinity", b"18446744073709551616",
    b"9223372036854775808", b"9" * 5000, b'"x"', b"[]", b"{}", b"[" * 3000, b"\n", b"\r\n",
    b",", b'"', b":", b"\x00", b"\xff\xfe", b"\xc3", b'"experts": null', b'"num_layers": 0',
    b'"num_experts": 1e400', b'"top_k": 99999', b'"layer": 5000', b"[1, 1]",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few random edits: byte flips, deleted spans, inserted
    fragments, duplicated lines, a truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "delete", "insert", "duplicate", "truncate"]))
        if edit == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif edit == "insert":
            data[at:at] = draw(st.sampled_from(FRAGMENTS))
        elif edit == "duplicate":
            lines = bytes(data).split(b"\n")
            line = draw(st.sampled_from(lines))
            data[at:at] = line + b"\n"
        elif edit == "truncate":
            del data[at:]
    return bytes(data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=30,
)


def _maybe(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the valid value, sometimes any JSON value, sometimes missing."""
    return st.one_of(valid, valid, JSON_VALUES, st.just(...))


def _object(fields: dict[str, object]) -> str:
    return json.dumps({k: v for k, v in fields.items() if v is not ...})


@st.composite
def native_structured(draw: st.DrawFn) -> bytes:
    """Native files whose header counts and routing are drawn from any JSON,
    valid values included."""
    small = st.integers(1, 4)
    header = {
        "format": _maybe(st.just("moe-offload-trace")),
        "version": _maybe(st.just(1)),
        "num_layers": _maybe(small | st.sampled_from([0, 4097, 2**64])),
        "num_experts": _maybe(small | st.sampled_from([0, 65537, 2**64])),
        "top_k": _maybe(small),
    }
    lines = [_object({k: draw(v) for k, v in header.items()})]
    ids = st.integers(0, 5) | JSON_VALUES
    for _ in range(draw(st.integers(0, 3))):
        routing = st.lists(st.lists(st.lists(ids, max_size=4), max_size=4), max_size=4)
        lines.append(
            _object({"request": draw(_maybe(st.text(max_size=4))), "experts": draw(_maybe(routing))})
        )
    return ("\n".join(lines) + "\n").encode()


@st.composite
def speculative_structured(draw: st.DrawFn) -> bytes:
    """Speculative-moe records with fields drawn from any JSON, valid values included."""
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        record = {
            "dataset": draw(_maybe(st.sampled_from(["d", "e"]))),
            "problem_id": draw(_maybe(st.integers(0, 2))),
            "layer": draw(_maybe(st.integers(0, 2))),
            "token_idx": draw(_maybe(st.integers(0, 3))),
            "experts": draw(_maybe(st.lists(st.integers(0, 5) | JSON_VALUES, max_size=3))),
        }
        lines.append(_object(record))
    return ("\n".join(lines) + "\n").encode()


@st.composite
def csv_structured(draw: st.DrawFn) -> bytes:
    """moe-beyond rows whose cells are drawn from fragments and any JSON."""
    cell = st.sampled_from(["1", "2", "-1", "1.5", "", "x", "99999999999"]) | JSON_VALUES.map(json.dumps)
    rows = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
    for _ in range(draw(st.integers(0, 6))):
        cells = [draw(cell), "0", draw(st.text(max_size=5)), draw(cell)]
        rows.append(",".join('"' + c.replace('"', '""') + '"' for c in cells))
    return ("\n".join(rows) + "\n").encode()


@contextmanager
def bounded() -> Iterator[None]:
    """Fails the example if reading takes longer than SECONDS_BOUND or
    allocates more than MEMORY_BOUND."""

    def timeout(*_: object) -> None:
        raise AssertionError(f"reading a trace took over {SECONDS_BOUND} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(SECONDS_BOUND)
    tracemalloc.start()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        # Checked on every path: a refusal must be cheap too.
        assert peak < MEMORY_BOUND, f"reading a trace took {peak} bytes"


def read_or_refuse(path: Path, data: bytes, format: str) -> None:
    """Reads `data` as a trace at `path`: a valid trace, or a TraceError that
    names the file and (if any) a line the file has."""
    path.write_bytes(data)
    try:
        with bounded():
            trace = read_trace(path, format)
    except TraceError as e:
        message = str(e)
        assert message.startswith(str(path)), message
        line = re.match(re.escape(str(path)) + r":(\d+):", message)
        if line:
            assert 1 <= int(line[1]) <= _text(path, data).count(b"\n") + 1, message
        return
    assert trace.requests and 1 <= trace.num_layers and 1 <= trace.top_k <= trace.num_experts
    for request in trace.requests:
        r = request.routing
        assert r.dtype == np.uint32 and r.shape[1:] == (trace.num_layers, trace.top_k)
        assert r.size == 0 or int(r.max()) < trace.num_experts
        ordered = np.sort(r, axis=2)
        assert not (ordered[..., 1:] == ordered[..., :-1]).any(), "a token names an expert twice"


def _text(path: Path, data: bytes) -> bytes:
    """The text of the file: `data`, or as much of it as gunzips."""
    if not path.name.endswith(".gz"):
        return data
    try:
        return zlib.decompressobj(wbits=31).decompress(data)
    except zlib.error:
        return b""


def inputs(format: str) -> st.SearchStrategy[bytes]:
    structured = {"jsonl": native_structured(), "moe-beyond": csv_structured()}
    return st.one_of(
        st.binary(max_size=512),
        mutated(SEEDS[format]),
        structured.get(format, speculative_structured()),
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fuzz(format: str, gz: bool):
    @FUZZ
    @given(data=inputs(format), auto=st.booleans(), damage=st.integers(0, 3))
    def run(workdir: Path, data: bytes, auto: bool, damage: int) -> None:
        name = NAMES[format]
        if gz:
            # Valid gzip of fuzzed text, or (damage 0) the gzip bytes cut short.
            data = gzip.compress(data)
            data = data[: len(data) * 2 // 3] if damage == 0 else data
            name += ".gz"
        read_or_refuse(workdir / name, data, "auto" if auto else format)

    return run


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_native_jsonl_readers_refuse_bad_input_cleanly(workdir, gz):
    _fuzz("jsonl", gz)(workdir)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_moe_beyond_csv_readers_refuse_bad_input_cleanly(workdir, gz):
    _fuzz("moe-beyond", gz)(workdir)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_speculative_moe_readers_refuse_bad_input_cleanly(workdir, gz):
    _fuzz("speculative-moe", gz)(workdir)


@pytest.mark.parametrize("format", ["auto", "jsonl", "moe-beyond", "speculative-moe"])
def test_a_file_without_line_breaks_is_refused_at_its_first_line(format):
    """/dev/zero never ends and has no newline: reading must stop at the
    line limit, not grow until the OOM killer steps in."""
    zero = Path("/dev/zero")
    if not zero.exists():
        pytest.skip("needs /dev/zero")
    with bounded(), pytest.raises(TraceError, match=rf"^/dev/zero:1: line longer than {MAX_LINE:,} bytes"):
        read_trace(zero, format)
