"""Holds back what other libraries print while the benchmark measures
(accelerate's and transformers' warnings, through `warnings` or `logging`),
so the output is ours; moe-offload's own warnings pass through."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import moe_offload

_OURS = Path(moe_offload.__file__).resolve().parent


def _is_ours(logger_name: str) -> bool:
    return logger_name == "moe_offload" or logger_name.startswith("moe_offload.")


class _HoldBack(logging.Filter):
    """On every handler: lets moe-offload's records through, keeps the rest."""

    def __init__(self, held: list[str]) -> None:
        super().__init__()
        self.held = held
        self.seen: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_ours(record.name):
            return True
        # One record can reach several handlers: hold it back once.
        if id(record) not in self.seen:
            self.seen.add(id(record))
            self.held.append(f"{record.name}: {record.getMessage()}")
        return False


def _handlers() -> set[logging.Handler]:
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    found = {handler for logger in loggers for handler in logger.handlers}
    if logging.lastResort is not None:
        found.add(logging.lastResort)
    return found


@contextmanager
def third_party_output_held_back() -> Iterator[list[str]]:
    """Within the block, other libraries' warnings and log records are
    collected into the yielded list instead of printed."""
    held: list[str] = []
    hold_back = _HoldBack(held)
    handlers = _handlers()
    for handler in handlers:
        handler.addFilter(hold_back)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield held
    finally:
        for handler in handlers:
            handler.removeFilter(hold_back)
    for w in caught:
        if _OURS in Path(w.filename).resolve().parents:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            held.append(f"{w.category.__name__}: {w.message}")
