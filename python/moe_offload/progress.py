"""Progress bars for long work (tqdm, which transformers already depends on)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm.auto import tqdm

# Below this many bytes a bar would only flicker.
_WORTH_A_BAR = 1 << 30


class Bar(Protocol):
    def update(self, n: int) -> object: ...


@contextmanager
def progress(total_bytes: int, description: str, show: bool | None = None) -> Iterator[Bar]:
    """A byte-counting bar; by default only for large jobs on a terminal."""
    if show is None:
        show = total_bytes >= _WORTH_A_BAR and sys.stderr.isatty()
    with tqdm(
        total=total_bytes, desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=not show
    ) as bar:
        yield bar
