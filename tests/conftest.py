from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

# tiny_models.py lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config: pytest.Config) -> None:
    """The suite tests the installed wheel, never the source tree."""
    import moe_offload

    installed = Path(moe_offload.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if site not in installed.parents and not os.environ.get("MOE_OFFLOAD_TEST_SOURCE"):
        raise pytest.UsageError(
            f"moe_offload was imported from {installed}, not from the installed wheel in {site}; "
            "run the tests through scripts/test.sh, or set MOE_OFFLOAD_TEST_SOURCE=1 to test an editable "
            "install (`maturin develop --release`)"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
