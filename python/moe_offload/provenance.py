"""Where a result came from: the checkout's commit and the machine, recorded
in every results file the benchmarks and the policy lab write."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def commit() -> str | None:
    """The checkout's commit, marked "-dirty" when its code has uncommitted
    changes (results written under benches/results do not count); None
    outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benches/results")
    return head + ("-dirty" if changed else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict[str, Any]:
    """The CPU side of the machine (the benchmarks add the GPU's)."""
    return {"cpu": cpu_name(), "cores": cores(), "python": platform.python_version()}


def shown_path(path: str | Path) -> str:
    """A path as results show it: relative to the working directory when
    inside it, else by its last two components (where a machine keeps its
    traces says nothing about the run)."""
    path = Path(os.path.normpath(Path(path).absolute()))  # "../x" is outside, not inside
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(Path("...", *path.parts[-2:]))


def command(program: str, paths: set[str]) -> str:
    """This process's command line as `program ARGS`, the arguments in
    `paths` shown by `shown_path`."""
    return " ".join([program, *(shown_path(w) if w in paths else w for w in sys.argv[1:])])
