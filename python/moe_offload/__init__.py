"""moe-offload: run Mixture-of-Experts models whose experts do not fit on the GPU.

offloader = moe_offload.patch(model, device="cuda", device_budget="8GiB")
model.generate(...)
offloader.stats()
moe_offload.unpatch(model)

model, offloader = moe_offload.from_pretrained(checkpoint, device="cuda", device_budget="20GiB",
                                               host_budget="48GiB", store_dir="/nvme/moe-store")
"""

from moe_offload._core import (
    BudgetError,
    DeviceError,
    MoeOffloadError,
    PatchStateError,
    StoreError,
    UnsupportedModelError,
)
from moe_offload._core import __version__ as __version__
from moe_offload.adapters import SUPPORTED_FAMILIES
from moe_offload.conversion import ConversionSummary, convert
from moe_offload.loading import from_pretrained
from moe_offload.offloader import Offloader, is_patched, patch, unpatch
from moe_offload.sizes import format_size, parse_size

__all__ = [
    "SUPPORTED_FAMILIES",
    "BudgetError",
    "ConversionSummary",
    "DeviceError",
    "MoeOffloadError",
    "Offloader",
    "PatchStateError",
    "StoreError",
    "UnsupportedModelError",
    "convert",
    "format_size",
    "from_pretrained",
    "is_patched",
    "parse_size",
    "patch",
    "unpatch",
]
