"""Routing trace formats: the native JSONL round-trips, the two third-party
formats parse into the same in-memory shape, and broken files are errors
that name the file and line."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from moe_offload.traces import MAX_LINE, Request, Trace, TraceError, read_trace, write_trace


def test_native_traces_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    requests = [
        Request(f"r{i}", rng.integers(0, 16, size=(tokens, 3, 2)).astype(np.uint32))
        for i, tokens in enumerate([5, 1, 9])
    ]
    path = tmp_path / "t.jsonl"
    write_trace(path, Trace(3, 16, 2, "unit", requests))
    back = read_trace(path)
    assert (back.num_layers, back.num_experts, back.top_k, back.source) == (3, 16, 2, "unit")
    assert [r.name for r in back.requests] == ["r0", "r1", "r2"]
    for a, b in zip(requests, back.requests, strict=True):
        np.testing.assert_array_equal(a.routing, b.routing)
    # Layers x tokens x ids on disk, as documented.
    record = json.loads(path.read_text().splitlines()[1])
    assert record["experts"][2][4] == requests[0].routing[4, 2].tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "the mode a plain open would give"


def test_moe_beyond_csv_is_read_in_file_name_order(tmp_path):
    def write(name, layers):
        lines = ["Layer ID,Batch Number,Token,Activated Expert IDs"]
        for layer, tokens in layers.items():
            for token, ids in tokens:
                lines.append(f'{layer},0,"{token}","{ids}"')
        with gzip.open(tmp_path / name, "wt") as f:
            f.write("\n".join(lines) + "\n")

    # MoE layers are logged as 1 and 2; a token may hold a comma.
    write("prompt_2_data.csv.gz", {1: [("a,b", [3, 1]), ("c", [0, 2])], 2: [("a,b", [1, 2]), ("c", [3, 0])]})
    write("prompt_10_data.csv.gz", {1: [("x", [2, 3])], 2: [("x", [0, 1])]})
    trace = read_trace(tmp_path)
    assert [r.name for r in trace.requests] == ["prompt_10_data", "prompt_2_data"]
    assert (trace.num_layers, trace.top_k, trace.num_experts) == (2, 2, 4)
    np.testing.assert_array_equal(trace.requests[1].routing, [[[3, 1], [1, 2]], [[0, 2], [3, 0]]])
    assert read_trace(tmp_path, limit=1).requests[0].name == "prompt_10_data"


def test_speculative_moe_sequences_are_cut_to_the_tokens_every_layer_has(tmp_path):
    rows = []
    for problem, tokens in ((0, 3), (1, 2)):
        for layer in range(2):
            # Layer 1 of problem 0 logged one token fewer.
            for t in range(tokens - (problem == 0 and layer == 1)):
                rows.append(
                    {
                        "dataset": "d",
                        "problem_id": problem,
                        "layer": layer,
                        "experts": [t % 4, 4 + layer],
                        "gating_probs": [0.6, 0.4],
                        "token_idx": t,
                    }
                )
    (tmp_path / "d_routing.jsonl").write_text("\n".join(json.dumps(r) for r in reversed(rows)) + "\n")
    (tmp_path / "d_outputs.jsonl").write_text(json.dumps({"problem_id": 0, "generated": "hi"}) + "\n")
    trace = read_trace(tmp_path)
    assert [(r.name, r.tokens) for r in trace.requests] == [("d-0", 2), ("d-1", 2)]
    np.testing.assert_array_equal(trace.requests[0].routing[:, 1], [[0, 5], [1, 5]])


HEADER = {"format": "moe-offload-trace", "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 1}


def native(experts: str = "[[[1]], [[2]]]", **header: object) -> str:
    """A native trace of one request with `experts` as written; header
    fields set to None are left out."""
    fields = {k: v for k, v in (HEADER | header).items() if v is not None}
    return json.dumps(fields) + "\n" + '{"request": "a", "experts": ' + experts + "}\n"


CSV_HEADER = "Layer ID,Batch Number,Token,Activated Expert IDs\n"
SPECULATIVE = '{"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2]}\n'


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("t.jsonl", "not json at all\n", "not a trace in a known format"),
        ("t.jsonl", '{"format": "moe-offload-trace", "version": 9}\n', "version-1"),
        (
            "t.jsonl",
            native("[[[1]], [[7]]]"),
            r"t.jsonl:2: layer 1, token 0: expert id 7 is not an integer in 0\.\.3",
        ),
        ("t.jsonl", json.dumps(HEADER) + "\n{broken\n", "t.jsonl:2: not JSON"),
        # Binary data, a .gz that is not gzip, a gzip cut short.
        ("t.jsonl", bytes(range(128, 256)) * 8, r"t.jsonl:1: not UTF-8 text \(byte 0x80 at column 1\)"),
        ("t.jsonl.gz", b"plain text\n", r"t.jsonl.gz:1: cannot read it \(Not a gzipped file"),
        ("t.jsonl.gz", gzip.compress(native().encode())[:-12], r"t.jsonl.gz:\d: cannot read it"),
        # Header counts missing, of the wrong type or beyond the limits.
        ("t.jsonl", native(num_layers=None), r"t.jsonl:1: header field 'num_layers' .* \(it is missing\)"),
        (
            "t.jsonl",
            native(num_experts=2**64),
            r"t.jsonl:1: header field 'num_experts' must be an integer in 1\.\.65536",
        ),
        ("t.jsonl", native(top_k=True), r"t.jsonl:1: header field 'top_k' .* \(got True\)"),
        # Routing of the wrong shape or with ids that are not ids.
        ("t.jsonl", native("null"), r"t.jsonl:2: 'experts' must be a list of 2 layers"),
        (
            "t.jsonl",
            native("[[[1]], [[2], [3]]]"),
            r"t.jsonl:2: layer 1 of 'experts' is not a list of 1 tokens",
        ),
        (
            "t.jsonl",
            native("[[[1]], [[9223372036854775808]]]"),
            r"t.jsonl:2: layer 1, token 0: expert id 9223372036854775808",
        ),
        (
            "t.jsonl",
            native("[[[1.7]], [[2]]]"),
            r"t.jsonl:2: layer 0, token 0: expert id 1\.7 is not an integer",
        ),
        (
            "t.jsonl",
            native("[[[true]], [[2]]]"),
            r"t.jsonl:2: layer 0, token 0: expert id True is not an integer",
        ),
        ("t.jsonl", native("[[[1, 1]], [[2, 3]]]", top_k=2), r"t.jsonl:2: .* names expert 1 twice"),
        ("t.jsonl", json.dumps(HEADER) + "\n", r"t.jsonl: no requests"),
        # moe-beyond rows.
        ("p.csv", CSV_HEADER + '1,0,a,"[1.7, 2]"\n', r"p.csv:2: expert id 1\.7 is not an integer"),
        ("p.csv", CSV_HEADER + '1,0,a,"[3, 3]"\n', r"p.csv:2: expert ids \[3, 3\] name an expert twice"),
        ("p.csv", CSV_HEADER + 'x,0,a,"[1, 2]"\n', r"p.csv:2: Layer ID 'x' is not a non-negative integer"),
        ("p.csv", CSV_HEADER + '1,0,"[1, 2]"\n', r"p.csv:2: 3 columns, the header has 4"),
        ("p.csv.gz", b"not gzip", r"p.csv.gz:1: cannot read it"),
        # speculative-moe records.
        ("d.jsonl", SPECULATIVE.replace("[1, 2]", "null"), r"d.jsonl:1: 'experts' must be a list"),
        ("d.jsonl", SPECULATIVE.replace("[1, 2]", "[1, 2.0]"), r"d.jsonl:1: expert id 2\.0 is not"),
        ("d.jsonl", SPECULATIVE.replace('"layer": 0', '"layer": 1.5'), r"d.jsonl:1: 'layer' must be"),
        ("d.jsonl", SPECULATIVE * 2, r"d.jsonl:2: token 0 of layer 0 of d-0 is logged twice"),
    ],
)
def test_broken_traces_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_a_native_request_may_be_longer_than_a_row_of_the_other_formats(tmp_path):
    """A native line holds a whole request: longer than the 1 MiB bound on
    the other formats' lines (one token at one layer each)."""
    routing = np.arange(300_000, dtype=np.uint32).reshape(-1, 2, 2) % 64
    path = tmp_path / "long.jsonl"
    write_trace(path, Trace(2, 64, 2, "long", [Request("a", routing)]))
    assert path.stat().st_size > MAX_LINE
    np.testing.assert_array_equal(read_trace(path).requests[0].routing, routing)


def test_missing_files_and_unknown_formats_are_errors(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        read_trace(tmp_path / "nope.jsonl")
    (tmp_path / "a").mkdir()
    (tmp_path / "b.jsonl").mkdir()
    with pytest.raises(TraceError, match="no trace files") as error:
        read_trace(tmp_path)
    assert str(error.value).startswith(
        f"no trace files found in {tmp_path}: a directory is read for its *.csv"
    )
    with pytest.raises(TraceError, match="limit=0: read at least one request"):
        read_trace(tmp_path, limit=0)
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(tmp_path, format="parquet")
