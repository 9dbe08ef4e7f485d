from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def pytest_configure(config: pytest.Config) -> None:
    from moe_offload import _core

    if _core.debug_build:
        pytest.exit("refusing to benchmark a debug build of moe_offload._core; build with --release", 2)
