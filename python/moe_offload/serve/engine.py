"""One patched model, its tokenizer and one transformers continuous-batching
manager, shared by every request the server admits.

The manager runs the model on its own thread; a dispatcher thread reads its
outputs and hands each to its request's stream on the server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel
from transformers.generation.continuous_batching.model_runner import infer_max_single_request_tokens

from moe_offload._core import MoeOffloadError
from moe_offload.offloader import Offloader
from moe_offload.serve import sampling
from moe_offload.serve.errors import ApiError, bad_request
from moe_offload.serve.latent import fit_latent_attention
from moe_offload.serve.metrics import Metrics
from moe_offload.serve.stream import RequestStream

log = logging.getLogger("moe_offload")

_POLL_S = 0.1  # how often the dispatcher looks up from an empty output queue
_START_TIMEOUT_S = 60.0
_WARMUP_ID = "moe-offload-warm-up"
_BATCHING_LOGGER = "ContinuousBatchingLogger"  # transformers' continuous batching logs here


@dataclass
class EngineConfig:
    max_batch_tokens: int = 256  # tokens in one forward pass (prefill chunks and decodes together)
    kv_cache_tokens: int = 16384  # tokens of KV cache, over all requests
    page_size: int = 32
    max_requests_per_batch: int = 64
    max_queue: int = 256  # requests held at once, running or waiting; more get 429


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Engine:
    def __init__(
        self, model: PreTrainedModel, offloader: Offloader | None, tokenizer: Any, config: EngineConfig
    ) -> None:
        self.model = model
        self.offloader = offloader
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = Metrics()
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.max_request_tokens = 0  # known once the cache exists
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self._trace_lock = threading.Lock()
        self._cancelled: set[str] = set()  # cancelled, their traces not yet ended
        self._generation_thread: threading.Thread | None = None
        self._latent_hooks = fit_latent_attention(model)
        self.manager = model.init_continuous_batching(
            generation_config=GenerationConfig(
                max_new_tokens=16,  # every request passes its own
                do_sample=False,  # sampling is per request, in `sampling`
                eos_token_id=self.eos_ids or -1,
                pad_token_id=_pad_id(model, tokenizer),
            ),
            continuous_batching_config=ContinuousBatchingConfig(
                num_blocks=math.ceil(config.kv_cache_tokens / config.page_size),
                page_size=config.page_size,
                max_batch_tokens=config.max_batch_tokens,
                max_requests_per_batch=config.max_requests_per_batch,
                # Graph replay would skip the offloader's per-layer work.
                use_cuda_graph=False,
                use_async_batching=False,
                allow_block_sharing=False,
            ),
        )
        self.manager.logit_processor = sampling.processors()

    # -- lifecycle -----------------------------------------------------------------------------------

    def launch(self) -> None:
        """Starts the generation thread and checks that the model runs in it
        (a one-token request); raises `MoeOffloadError` if it does not, with
        the generation thread stopped. Idempotent."""
        if self.manager.batch_processor is not None:
            return
        self.manager.start()
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            # The cache is built on the generation thread; its size bounds a request.
            while self.manager.batch_processor is None:
                self._raise_if_dead()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the generation loop did not start within {_START_TIMEOUT_S:.0f} s")
                time.sleep(0.01)
            self.max_request_tokens = infer_max_single_request_tokens(self.manager.batch_processor.cache)
            # transformers' own attribute; without it every pass is taken for the batch's.
            self._install_tracing(getattr(self.manager, "_generation_thread", None))
            self._check_the_model_runs()
        except BaseException:
            self.manager.stop(block=True, timeout=_START_TIMEOUT_S)
            raise

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Launches (if not yet) and starts the dispatcher; outputs go to `loop`."""
        self.launch()
        self._loop = loop
        self._dispatcher = threading.Thread(target=self._dispatch, name="moe-offload-dispatch", daemon=True)
        self._dispatcher.start()

    def stop(self, timeout: float) -> None:
        """Cancels what still runs, stops the generation thread, saves the EAMC."""
        for request_id in list(self._streams):
            self.cancel(request_id)
        self._closing.set()
        self.manager.stop(block=True, timeout=timeout)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=timeout)
        for request_id in sorted(self._cancelled):  # no pass runs any more
            self._end_trace(request_id)
        self._cancelled.clear()
        for hook in self._latent_hooks:
            hook.remove()
        if self.offloader is not None and self.offloader.eamc_path is not None:
            path = self.offloader.save_eamc()
            log.info("moe-offload serve: saved the EAMC (%d requests) to %s", self.offloader.eamc_size, path)

    def healthy(self) -> bool:
        return self.manager.is_running() and self.manager.background_thread_status.fatal_error is None

    # -- requests ------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Admits `request` (on the event loop) or raises an `ApiError`."""
        self._check_fits(request)
        if len(self._streams) >= self.config.max_queue:
            self.metrics.rejected_queue_full += 1
            raise ApiError(
                429,
                f"the server holds {len(self._streams)} requests, its limit (--max-queue); retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        if not self.healthy():
            raise ApiError(503, "the generation loop is not running", code="engine_dead")
        request_id = f"req-{next(self._ids)}"
        stream = RequestStream(self, request_id, request)
        self._streams[request_id] = stream
        kwargs: dict[str, Any] = {}
        if request.temperature > 0:
            seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little")
            kwargs = {"temperature": float(request.temperature), "top_p": float(request.top_p), "seed": seed}
        added = self.manager.add_request(
            list(request.prompt_ids),
            request_id=request_id,
            max_new_tokens=request.max_tokens,
            streaming=True,
            **kwargs,
        )
        if added is None:
            self._streams.pop(request_id, None)
            raise ApiError(503, "the generation loop is stopping", code="engine_stopping")
        self.metrics.requests += 1
        self.metrics.prompt_tokens += len(request.prompt_ids)
        return stream

    def cancel(self, request_id: str) -> None:
        """Stops generating for `request_id` (a client gone, a stop string seen)."""
        if self._streams.pop(request_id, None) is None:
            return
        self.manager.cancel_request(request_id)
        # It may still be in the next pass: its trace ends once it is not.
        with self._trace_lock:
            self._cancelled.add(request_id)

    def finished(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._end_trace(request_id)

    def counts(self) -> tuple[int, int]:
        """(requests in the running batch, requests waiting) as the scheduler sees them now."""
        processor = self.manager.batch_processor
        if processor is None:
            return 0, len(self._streams)
        scheduler = processor.scheduler
        return len(scheduler.active_requests), len(scheduler.waiting_requests)

    def _check_fits(self, request: GenerationRequest) -> None:
        prompt = len(request.prompt_ids)
        total = prompt + request.max_tokens
        if prompt == 0:
            raise bad_request("the prompt is empty", param="prompt")
        vocab = self.model.config.get_text_config().vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise bad_request(f"the prompt holds token ids outside 0..{vocab - 1}", param="prompt")
        if self.context is not None and total > self.context:
            raise bad_request(
                f"the prompt ({prompt} tokens) plus max_tokens ({request.max_tokens}) is {total} tokens, "
                f"more than the model's context of {self.context}; shorten the prompt or lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if total > self.max_request_tokens:
            raise bad_request(
                f"the prompt ({prompt} tokens) plus max_tokens ({request.max_tokens}) is {total} tokens, "
                f"more than the KV cache holds for one request ({self.max_request_tokens}; "
                "the server's --kv-cache-tokens)",
                param="max_tokens",
                code="context_length_exceeded",
            )

    # -- the dispatcher thread ---------------------------------------------------------------------

    def _dispatch(self) -> None:
        assert self._loop is not None
        while not self._closing.is_set():
            output = self.manager.get_result(timeout=_POLL_S)
            if output is None:
                if self.manager.background_thread_status.fatal_error is not None:
                    self._loop.call_soon_threadsafe(self._fail_all)
                    return
                continue
            stream = self._streams.get(output.request_id)
            if stream is not None:
                self._loop.call_soon_threadsafe(stream.push, output)

    def _fail_all(self) -> None:
        error = self.manager.background_thread_status.fatal_error
        for request_id, stream in list(self._streams.items()):
            stream.fail(f"the generation loop died: {error}")
            self.finished(request_id)

    def _check_the_model_runs(self) -> None:
        """Generates one token before any request is admitted, so that a model
        the batching engine cannot run is refused at start, with the reason,
        rather than failing every request. The warm-up's trace never ends, so
        it never joins the EAMC."""
        pad = _pad_id(self.model, self.tokenizer)
        self.manager.add_request([pad], request_id=_WARMUP_ID, max_new_tokens=1)
        deadline = time.monotonic() + _START_TIMEOUT_S
        # transformers logs the failure's traceback; the error below says it.
        with _muted(_BATCHING_LOGGER):
            while time.monotonic() < deadline:
                if self._warm_up_done():
                    return
        raise RuntimeError(f"a one-token request did not finish within {_START_TIMEOUT_S:.0f} s")

    def _warm_up_done(self) -> bool:
        """Whether the one-token request finished; raises if it failed."""
        error = self.manager.background_thread_status.fatal_error
        output = None if error is not None else self.manager.get_result(timeout=_POLL_S)
        if output is not None and output.request_id == _WARMUP_ID and output.is_finished():
            error = output.error
            if error is None:
                return True
        if error is not None:
            model_type = getattr(self.model.config, "model_type", type(self.model).__name__)
            raise MoeOffloadError(
                f"{model_type} cannot be served yet: transformers' continuous batching failed on a "
                f"one-token request ({error}); the model runs with moe_offload.patch or "
                "from_pretrained and generate"
            )
        return False

    def _raise_if_dead(self) -> None:
        error = self.manager.background_thread_status.fatal_error
        if error is not None:
            raise RuntimeError(f"the generation loop died while starting: {error}")

    # -- per-request tracing -----------------------------------------------------------------------

    def _install_tracing(self, generation_thread: threading.Thread | None) -> None:
        """Gives the offloader each pass's packed layout, so that each request
        gets its own activation matrix, matched and joined to the EAMC alone."""
        self._generation_thread = generation_thread
        if self.offloader is not None:
            self.offloader.track_requests(self._batch_layout)

    def _batch_layout(self) -> list[tuple[str, int]] | None:
        """(request id, rows) of each request in the pass about to run, in row
        order; None for a pass that is not the batch's (a `generate` call on
        another thread). Runs on the generation thread, with the pass
        scheduled: a cancelled request missing from the scheduler now never
        runs again, so its trace can end here."""
        layout = self.pass_layout()
        if layout is None:
            return None
        processor = self.manager.batch_processor
        scheduler = processor.scheduler
        with self._trace_lock:
            gone = [r for r in self._cancelled if r not in scheduler.active_requests]
            gone = [r for r in gone if r not in scheduler.waiting_requests]
            self._cancelled.difference_update(gone)
        for request_id in gone:
            self._end_trace(request_id)
        return layout

    def pass_layout(self) -> list[tuple[str, int]] | None:
        """(request id, rows) of each request in the pass about to run, in row
        order; None on a thread other than the batch's."""
        processor = self.manager.batch_processor
        if processor is None or self._generation_thread not in (None, threading.current_thread()):
            return None
        ios = processor.inputs_and_outputs
        return [(fs.state.request_id, fs.query_length) for fs in ios.requests_in_batch]

    def _end_trace(self, request_id: str) -> None:
        if self.offloader is None:
            return
        try:
            self.offloader.end_request(request_id)
        except MoeOffloadError:
            pass  # never in a pass (cancelled while it waited): nothing was traced


@contextlib.contextmanager
def _muted(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> list[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_id(model: PreTrainedModel, tokenizer: Any) -> int:
    pad = getattr(model.config.get_text_config(), "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)
