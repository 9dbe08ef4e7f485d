"""moe-offload: run Mixture-of-Experts models whose experts do not fit on the GPU.

offloader = moe_offload.patch(model, device="cuda", device_budget="8GiB")
model.generate(...)
offloader.stats()
moe_offload.unpatch(model)
"""

from moe_offload._core import (
    BudgetError,
    DeviceError,
    MoeOffloadError,
    PatchStateError,
    UnsupportedModelError,
)
from moe_offload._core import __version__ as __version__
from moe_offload.adapters import SUPPORTED_FAMILIES
from moe_offload.offloader import Offloader, is_patched, patch, unpatch
from moe_offload.sizes import format_size, parse_size

__all__ = [
    "SUPPORTED_FAMILIES",
    "BudgetError",
    "DeviceError",
    "MoeOffloadError",
    "Offloader",
    "PatchStateError",
    "UnsupportedModelError",
    "format_size",
    "is_patched",
    "parse_size",
    "patch",
    "unpatch",
]
