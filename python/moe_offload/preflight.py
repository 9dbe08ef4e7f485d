"""Checks the commands run before they build anything: is the device there,
are the optional packages installed, does the model fit the machine. Each
failure is a `MoeOffloadError` that says which option or package to change."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
import transformers as tf
from torch import nn

from moe_offload._core import MoeOffloadError
from moe_offload.adapters import find_expert_blocks
from moe_offload.sizes import format_size

#: What a plan may count on of the memory reported free: the rest is for
#: activations, the KV cache and allocator slack.
USABLE_SHARE = 0.9


def require(modules: dict[str, str], extra: str) -> None:
    """Imports every module of `modules` (name -> what needs it); names the
    missing ones and the extra that installs them."""
    missing = []
    for module, purpose in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{module} ({purpose})")
    if missing:
        raise MoeOffloadError(
            f"missing optional package{'s' if len(missing) > 1 else ''}: {', '.join(missing)}; "
            f'install them with: pip install "moe-offload[{extra}]"'
        )


def model_bytes(config: tf.PretrainedConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(all parameter bytes, routed-expert bytes) of a model of `config`,
    counted on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model: nn.Module = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = sum(b.num_experts * b.expert_bytes for b in find_expert_blocks(model))
    return total, experts


def available_host_memory() -> int | None:
    """Bytes of memory this process can still take: the kernel's
    MemAvailable, lowered by a cgroup (container) limit; None when unknown."""
    available = _meminfo_available()
    limit = _cgroup_headroom()
    if available is None or limit is None:
        return available if limit is None else limit
    return min(available, limit)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), if limited."""
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        group = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((group / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def check_host_memory(need: int, what: str, shrink: str) -> None:
    """Refuses a plan that needs more than the usable share of free memory."""
    available = available_host_memory()
    if available is not None and need > USABLE_SHARE * available:
        raise MoeOffloadError(
            f"{what} needs about {format_size(need)} of memory; this machine has {format_size(available)} "
            f"available: {shrink}"
        )


def check_device_memory(device: torch.device, need: int, what: str, shrink: str) -> None:
    """As `check_host_memory`, for a CUDA device's free memory."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if need > USABLE_SHARE * free:
        raise MoeOffloadError(
            f"{what} needs about {format_size(need)} on {device}; {format_size(free)} is free there: {shrink}"
        )
