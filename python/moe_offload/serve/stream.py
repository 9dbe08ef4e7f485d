"""One admitted request as the server's handlers see it: its tokens and text
as they come, stop strings, and its end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from moe_offload.serve.errors import ApiError

if TYPE_CHECKING:
    from moe_offload.serve.engine import Engine, GenerationRequest

_REPLACEMENT = "\ufffd"  # what a decoder shows for a character whose bytes have not all come


@dataclass
class Delta:
    """One step of a request: its new token(s), the text they complete, and
    why it ended (None while it runs)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None


class Detokenizer:
    """Text of a growing token list, decoding only its last few tokens per
    step (a whole-list decode per token would be quadratic in its length).
    The tokens before the new ones give the decoder its context (a leading
    space, a multi-byte character split over tokens)."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # the context's first token
        self._read = 0  # the first token whose text is not in `text` yet

    def add(self, new_tokens: list[int]) -> str:
        """Appends `new_tokens`; returns the text they complete (possibly none yet)."""
        self.tokens += new_tokens
        decode = self.tokenizer.decode  # type: ignore[attr-defined]
        before = decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return ""  # nothing printable yet, or a character whose bytes have not all come
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += delta
        return delta


class RequestStream:
    """Lives on the event loop; the engine's dispatcher pushes outputs in."""

    def __init__(self, engine: Engine, request_id: str, request: GenerationRequest) -> None:
        self.engine = engine
        self.request_id = request_id
        self.request = request
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self._outputs: asyncio.Queue[GenerationOutput | str] = asyncio.Queue()
        self._sent = ""  # text already handed out
        self._detokenizer = Detokenizer(engine.tokenizer)
        self._admitted = time.perf_counter()
        self._last_token: float | None = None
        self._hold = max((len(s) for s in request.stop), default=1) - 1

    @property
    def text(self) -> str:
        return self._sent

    def push(self, output: GenerationOutput) -> None:
        """A new output for this request (called on the event loop)."""
        new = len(output.generated_tokens) - len(self.tokens)
        if new > 0:
            now = time.perf_counter()
            metrics = self.engine.metrics
            metrics.generated_tokens += new
            if self._last_token is None:
                metrics.ttft.observe(now - self._admitted)
            else:
                metrics.itl.observe(now - self._last_token)
            self._last_token = now
        self._outputs.put_nowait(output)

    def fail(self, message: str) -> None:
        self._outputs.put_nowait(message)

    def cancel(self) -> None:
        """The client is gone: stop generating for it."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.engine.metrics.cancelled += 1
            self.engine.cancel(self.request_id)

    async def deltas(self) -> AsyncIterator[Delta]:
        """One delta per output (one per generated token), the last one with a finish reason."""
        while self.finish_reason is None:
            output = await self._outputs.get()
            if isinstance(output, str) or output.status == RequestStatus.FAILED:
                self.finish_reason = "error"
                self.engine.metrics.failed += 1
                self.engine.finished(self.request_id)
                message = output if isinstance(output, str) else output.error
                raise ApiError(500, f"generation failed: {message}", code="generation_failed")
            yield self._step(output)

    async def collect(self) -> Delta:
        """The whole completion at once."""
        tokens: list[int] = []
        text = []
        last = Delta([], "")
        async for delta in self.deltas():
            tokens += delta.token_ids
            text.append(delta.text)
            last = delta
        return Delta(tokens, "".join(text), last.finish_reason)

    def _step(self, output: GenerationOutput) -> Delta:
        new_tokens = output.generated_tokens[len(self.tokens) :]
        self.tokens = list(output.generated_tokens)
        self._detokenizer.add(new_tokens)
        text = self._detokenizer.text
        finish = None
        stop_at = _first_stop(text, self.request.stop, max(0, len(self._sent) - self._hold))
        if stop_at is not None:
            text, finish = text[:stop_at], "stop"
            self.engine.cancel(self.request_id)  # no more tokens are needed
        elif output.is_finished():
            finish = "stop" if self.tokens and self.tokens[-1] in self.engine.eos_ids else "length"
            self.engine.finished(self.request_id)
        else:
            text = text[: len(text) - self._hold] if self._hold else text
        if finish is not None:
            self.finish_reason = finish
            self.engine.metrics.finished += 1
        delta = text[len(self._sent) :] if text.startswith(self._sent) else ""
        self._sent += delta
        return Delta(new_tokens, delta, finish)


def _first_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the earliest stop string begins in `text` (searching from `start`), if any does."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None
