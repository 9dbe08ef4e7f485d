"""Every microbenchmark runs once, untimed (`--benchmark-disable`), so that
its set-up and its own assertions (it hit, it missed, the request joined the
EAMC) are checked in the suite and a benchmark cannot rot unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parent.parent / "benches"


@pytest.mark.parametrize("bench", sorted(p.name for p in BENCHES.glob("bench_*.py")))
def test_microbenchmark_runs_once(bench):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", bench],
        cwd=BENCHES,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
