"""Progress bars for long work (tqdm, which transformers already depends on)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm.auto import tqdm

from moe_offload.sizes import format_size

# Below this many bytes a bar would only flicker.
_WORTH_A_BAR = 1 << 30
# Lines a job prints when stderr is not a terminal (a log): one per quarter.
_PLAIN_STEPS = 4


class Bar(Protocol):
    def update(self, n: int) -> object: ...


@contextmanager
def progress(total_bytes: int, description: str, show: bool | None = None) -> Iterator[Bar]:
    """A byte-counting bar; by default only for large jobs on a terminal.
    Asked for (`show`) where stderr is not a terminal, it prints a few plain
    lines instead, so that logs get no bar redrawn in place."""
    terminal = sys.stderr.isatty()
    if show is None:
        show = total_bytes >= _WORTH_A_BAR and terminal
    if show and not terminal:
        yield _PlainProgress(total_bytes, description)
        return
    with tqdm(
        total=total_bytes, desc=description, unit="B", unit_scale=True, unit_divisor=1024, disable=not show
    ) as bar:
        yield bar


class _PlainProgress:
    """Progress as at most `_PLAIN_STEPS` lines on stderr: 25%, 50%, ..."""

    def __init__(self, total_bytes: int, description: str) -> None:
        self.total = total_bytes
        self.description = description
        self.done = 0
        self.printed = 0

    def update(self, n: int) -> None:
        self.done += n
        if self.total <= 0:
            return
        reached = min(_PLAIN_STEPS, self.done * _PLAIN_STEPS // self.total)
        if reached > self.printed:
            self.printed = reached
            percent = 100 * reached // _PLAIN_STEPS
            print(
                f"{self.description}: {percent}% ({format_size(self.done)} of {format_size(self.total)})",
                file=sys.stderr,
                flush=True,
            )
