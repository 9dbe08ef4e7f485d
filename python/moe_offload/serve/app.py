"""The HTTP side: OpenAI's completions and chat completions routes, models,
health and metrics, on FastAPI."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from moe_offload.serve import protocol
from moe_offload.serve.engine import Engine, GenerationRequest
from moe_offload.serve.errors import ApiError, bad_request
from moe_offload.serve.stream import Delta, RequestStream

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
_DISCONNECT_POLL_S = 0.25


def build_app(
    engine: Engine, model_name: str, api_key: str | None, shutdown_timeout: float = 10.0
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, shutdown_timeout)

    async def require_key(request: Request) -> None:
        if api_key is not None:
            _check_key(request, api_key)

    app = FastAPI(title="moe-offload", lifespan=lifespan, docs_url=None, redoc_url=None)
    api = APIRouter(dependencies=[Depends(require_key)])
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> Response:
        return error_response(e)

    @app.get("/health")
    async def health() -> Response:
        if not engine.healthy():
            return error_response(ApiError(503, "the generation loop is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        running, queued = engine.counts()
        offloader = engine.offloader
        if offloader is None:
            text = engine.metrics.render(running, queued, None)
        else:
            text = engine.metrics.render(running, queued, offloader.stats, lambda: offloader.eamc_size)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models() -> Response:
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "moe-offload"}
        return JSONResponse({"object": "list", "data": [entry]})

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = protocol.parse(protocol.CompletionRequest, await _json(request))
        _check_model(body.model, model_name)
        prompt = _prompt_ids(engine, body.prompt)
        generation = _generation(engine, body, prompt, DEFAULT_COMPLETION_TOKENS)
        return await _respond(
            request, engine, body, generation, _Shape("text_completion", model_name, body.return_token_ids)
        )

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = protocol.parse(protocol.ChatRequest, await _json(request))
        _check_model(body.model, model_name)
        prompt = _chat_ids(engine, body.messages)
        generation = _generation(engine, body, prompt, None)
        return await _respond(
            request, engine, body, generation, _Shape("chat.completion", model_name, body.return_token_ids)
        )

    app.include_router(api)
    return app


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _check_key(request: Request, api_key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise ApiError(
            401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
        )


async def _json(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def _check_model(asked: str, served: str) -> None:
    if asked != served:
        raise ApiError(
            400,
            f"model {asked!r} is not served here; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def _prompt_ids(engine: Engine, prompt: str | list[int] | list[str]) -> list[int]:
    if isinstance(prompt, str):
        return list(engine.tokenizer.encode(prompt, add_special_tokens=True))
    if all(isinstance(p, int) for p in prompt):
        return list(prompt)  # type: ignore[arg-type]
    if len(prompt) == 1:
        return list(engine.tokenizer.encode(prompt[0], add_special_tokens=True))
    raise bad_request("prompt: one prompt per request (a string or a list of token ids)", param="prompt")


def _chat_ids(engine: Engine, messages: list[protocol.ChatMessage]) -> list[int]:
    if getattr(engine.tokenizer, "chat_template", None) is None:
        raise bad_request(
            "this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    turns = [{"role": m.role, "content": _content_text(m.content)} for m in messages]
    try:
        ids = engine.tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=False)
    except Exception as e:  # the template's own error, e.g. roles out of order
        raise bad_request(f"messages: the chat template refused them: {e}", param="messages") from None
    return list(ids)


def _content_text(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request("messages: only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _generation(
    engine: Engine, body: protocol._Sampling, prompt: list[int], default_tokens: int | None
) -> GenerationRequest:
    max_tokens = protocol.requested_max_tokens(body)
    if max_tokens is None:
        # Chat's default is "what remains of the context", as OpenAI's.
        room = min(engine.context or engine.max_request_tokens, engine.max_request_tokens) - len(prompt)
        max_tokens = default_tokens if default_tokens is not None else max(room, 1)
    return GenerationRequest(
        prompt_ids=prompt,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=protocol.stop_strings(body),
    )


class _Shape:
    """How a completion or chat completion response and its chunks look."""

    def __init__(self, kind: str, model: str, token_ids: bool) -> None:
        self.token_ids = token_ids
        self.chat = kind == "chat.completion"
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, delta: Delta) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": delta.finish_reason, "logprobs": None}
        if self.token_ids:
            choice["token_ids"] = delta.token_ids
        return choice

    def response(self, delta: Delta, usage: dict[str, int]) -> dict[str, Any]:
        choice = self._choice(delta)
        if self.chat:
            choice["message"] = {"role": "assistant", "content": delta.text}
        else:
            choice["text"] = delta.text
        return {**self._envelope(self.kind), "choices": [choice], "usage": usage}

    def chunk(self, delta: Delta, first: bool) -> dict[str, Any]:
        choice = self._choice(delta)
        if self.chat:
            choice["delta"] = (
                {"role": "assistant", "content": delta.text} if first else {"content": delta.text}
            )
            kind = "chat.completion.chunk"
        else:
            choice["text"] = delta.text
            kind = "text_completion"
        return {**self._envelope(kind), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": usage}


def _usage(stream: RequestStream) -> dict[str, int]:
    prompt, completion = len(stream.request.prompt_ids), len(stream.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(
    request: Request, engine: Engine, body: protocol._Sampling, generation: GenerationRequest, shape: _Shape
) -> Response:
    stream = engine.submit(generation)
    if body.stream:
        return StreamingResponse(_sse(stream, shape), media_type="text/event-stream")
    return await _whole(request, stream, shape)


async def _whole(request: Request, stream: RequestStream, shape: _Shape) -> Response:
    """The whole completion; a client that leaves before it is done cancels it."""
    work = asyncio.ensure_future(stream.collect())
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=_DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                work.cancel()
                stream.cancel()
                return Response(status_code=499)
        delta = work.result()
    except asyncio.CancelledError:
        work.cancel()
        stream.cancel()
        raise
    return JSONResponse(shape.response(delta, _usage(stream)))


async def _sse(stream: RequestStream, shape: _Shape) -> AsyncIterator[str]:
    """Server-sent events: a chunk per token, a usage chunk, then [DONE]. A
    client that leaves cancels the request (the write fails, or the server
    cancels this generator)."""
    try:
        first = True
        async for delta in stream.deltas():
            yield _event(shape.chunk(delta, first))
            first = False
        yield _event(shape.usage_chunk(_usage(stream)))
    except ApiError as e:
        yield _event(e.body())
    finally:
        stream.cancel()  # a no-op once the request has ended
    yield "data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
