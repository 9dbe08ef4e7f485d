"""uvicorn's server, with the exit status `moe-offload serve` promises."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn


class Server(uvicorn.Server):
    """A SIGTERM/SIGINT that shuts the server down cleanly ends the process
    with status 0: uvicorn itself raises the signal again once it has
    stopped, which would kill the process instead."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig in (signal.SIGINT, signal.SIGTERM):
            self._captured_signals.clear()
