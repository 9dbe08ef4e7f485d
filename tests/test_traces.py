"""Routing trace formats: the native JSONL round-trips, the two third-party
formats parse into the same in-memory shape, and broken files are errors
that name the file and line."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from moe_offload.traces import Request, Trace, TraceError, read_trace, write_trace


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


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json at all\n", "not a trace in a known format"),
        ('{"format": "moe-offload-trace", "version": 9}\n', "version-1"),
        (
            '{"format": "moe-offload-trace", "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 1}\n'
            '{"request": "a", "experts": [[[1]], [[7]]]}\n',
            r"t.jsonl:2: .*outside 0..3",
        ),
        (
            '{"format": "moe-offload-trace", "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 1}\n'
            "{broken\n",
            "t.jsonl:2: not JSON",
        ),
    ],
)
def test_broken_traces_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_missing_files_and_unknown_formats_are_errors(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        read_trace(tmp_path / "nope.jsonl")
    with pytest.raises(TraceError, match="no trace files"):
        read_trace(tmp_path)
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(tmp_path, format="parquet")
