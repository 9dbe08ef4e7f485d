from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_generates_the_same_tokens():
    result = subprocess.run(
        [sys.executable, "-m", "moe_offload.cli", "demo", "--layers", "2", "--tokens", "6", "--hidden", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "same tokens as the unpatched model: yes" in result.stdout
    assert "tokens/s" in result.stdout and "hit_rate" in result.stdout


def test_version_and_help():
    result = subprocess.run(
        [sys.executable, "-m", "moe_offload.cli", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("moe-offload ")
