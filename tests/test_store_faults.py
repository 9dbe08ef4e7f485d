"""`convert` killed at random points: the store's directory always holds one
complete, valid store (the old or the new), or none before the first one,
and nothing a dead writer left blocks the next conversion.

The conversions run in processes forked from one that imported moe-offload
once (importing torch takes seconds, a tiny conversion a fraction of one), so
that many kills fit in a small, fixed budget."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build

import moe_offload
from moe_offload import StoreError

# Kills per mode (first conversion, --overwrite): about 0.5 s each here.
TRIALS = 12

# Per mode, forks conversions, kills each after a random delay and checks
# the store. Prints one JSON object: per mode, the outcome of every trial
# and the problems found.
KILLER = r"""
import json, os, random, shutil, signal, sys, time, traceback, zlib
from pathlib import Path
import moe_offload
from moe_offload._core import ExpertStore, StoreError

first, second, root, trials, seed = sys.argv[1:]
checkpoints = [Path(first), Path(second)]
trials = int(trials)
rng = random.Random(int(seed))


def run(checkpoint, delay):
    # The conversion in a child; returns its exit status as a string.
    pid = os.fork()
    if pid == 0:
        try:
            moe_offload.convert(checkpoint, store, overwrite=mode == "overwrite")
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed"
    return "finished" if os.WEXITSTATUS(status) == 0 else "failed"


def whole(directory):
    # The source of the complete, valid store in `directory`, checking every
    # byte against the index; raises if it is not one.
    store_files = ExpertStore.open(directory)  # sizes, headers, small files' CRC-32
    index = json.loads(store_files.index_json())
    for layer in index["layers"]:
        data = (directory / layer["file"]).read_bytes()
        for blob in layer["blobs"]:
            chunk = data[blob["offset"] : blob["offset"] + layer["blob_bytes"]]
            assert zlib.crc32(chunk) == blob["crc32"], f"{layer['file']}: a damaged blob"
    for entry in index["files"]:
        if entry["check"] == "reader":
            data = (directory / entry["name"]).read_bytes()
            assert zlib.crc32(data) == entry["crc32"], f"{entry['name']}: damaged"
    return index["meta"]["source"]["path"]


def state():
    # (source of the store | "none" | problem, leftovers beside the store)
    leftovers = sorted(p.name for p in store.parent.iterdir() if p.name != store.name)
    if not store.exists():
        return "none", leftovers
    try:
        return whole(store), leftovers
    except (AssertionError, StoreError, OSError) as e:
        return f"not a complete store: {e}", leftovers


def trial_runs():
    problems, outcomes = [], []
    started = time.perf_counter()
    assert run(checkpoints[0], None) == "finished"
    full = time.perf_counter() - started
    if mode == "first":
        shutil.rmtree(store)
    for trial in range(trials):
        problems += one_trial(trial, full, outcomes)
    # The next run succeeds and leaves nothing but the store.
    status = run(checkpoints[0], None)
    after, leftovers = state()
    if status != "finished" or after != str(checkpoints[0].resolve()) or leftovers:
        problems.append(f"the final conversion: {status}, store {after!r}, leftovers {leftovers}")
    return {"problems": problems, "outcomes": outcomes, "conversion_seconds": full}


def one_trial(trial, full, outcomes):
    problems = []
    new = checkpoints[(trial + 1) % 2]
    before, _ = state()
    # Spread over the whole conversion, and a little past its end.
    delay = (trial + rng.random()) / trials * full * 1.2
    status = run(new, delay)
    after, leftovers = state()
    if status == "failed":
        problems.append(f"trial {trial}: the conversion failed (a leftover blocked it?)")
    allowed = {before, str(new.resolve())}
    if mode == "first":
        allowed = {"none", str(new.resolve())}
    if after not in allowed:
        problems.append(f"trial {trial}: killed after {delay:.3f} s, the store is {after!r}, not {allowed}")
    outcomes.append({"status": status, "store": "none" if after == "none" else Path(after).name})
    if mode == "first" and store.exists():
        shutil.rmtree(store)  # the next trial converts afresh; leftovers stay
    return problems


report = {}
for mode in ("first", "overwrite"):
    store = Path(root, mode, "store")
    store.parent.mkdir(parents=True)
    report[mode] = trial_runs()
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    for seed in (0, 1):
        build("mixtral", seed=seed).save_pretrained(root / f"seed-{seed}")
    return root / "seed-0", root / "seed-1"


def test_a_conversion_killed_anywhere_leaves_one_complete_store_or_none(checkpoints, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    result = subprocess.run(
        [sys.executable, "-c", KILLER, *map(str, checkpoints), str(tmp_path), str(TRIALS), str(seed)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for mode in ("first", "overwrite"):
        assert report[mode]["problems"] == [], f"{mode}, seed {seed}: {report[mode]}"
        statuses = [o["status"] for o in report[mode]["outcomes"]]
        assert "killed" in statuses, f"{mode}, seed {seed}: no conversion was interrupted: {report[mode]}"


def test_a_leftover_named_after_a_live_process_does_not_block_a_conversion(checkpoints, tmp_path):
    """Item: a dead writer's staging directory whose process id now belongs
    to an unrelated live process (here: this one, and process 1)."""
    store = tmp_path / "store"
    for pid in (os.getpid(), 1):
        leftover = tmp_path / f".store.partial-{pid}"
        leftover.mkdir()
        (leftover / "layer-000.bin").write_bytes(b"half")
    moe_offload.convert(checkpoints[0], store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    # --overwrite too.
    (tmp_path / f".store.partial-{os.getpid()}").mkdir()
    moe_offload.convert(checkpoints[1], store, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_conversion_is_refused_while_another_holds_the_store_lock(checkpoints, tmp_path):
    store = tmp_path / "store"
    with open(tmp_path / ".store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match="another conversion .*is writing this store"):
            moe_offload.convert(checkpoints[0], store)
    assert not store.exists()
    moe_offload.convert(checkpoints[0], store)  # the lock died with its holder
