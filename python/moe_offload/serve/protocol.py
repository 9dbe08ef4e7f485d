"""The request bodies of the OpenAI completions and chat completions APIs,
as far as the server implements them. Fields the server does not know are
ignored (clients send many); fields it knows must have the right type."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from moe_offload.serve.errors import bad_request

MAX_STOP_STRINGS = 4  # as OpenAI

Model = TypeVar("Model", bound=BaseModel)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: StrictStr
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    user: StrictStr | None = None
    # An extension (as vLLM's): the completion's token ids beside its text.
    return_token_ids: StrictBool = False


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: StrictStr
    content: StrictStr | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def parse(model: type[Model], body: object) -> Model:
    """`body` (decoded JSON) as `model`, or a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}", param=param) from None
    _check_sampling(request)
    return request


def _check_sampling(request: _Sampling) -> None:
    if request.n is not None and request.n != 1:
        raise bad_request(f"n={request.n}: only n=1 is supported", param="n")
    limit = requested_max_tokens(request)
    if limit is not None and limit <= 0:
        raise bad_request(f"max_tokens={limit} must be at least 1", param="max_tokens")
    if len(stop_strings(request)) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} strings", param="stop")
    if any(s == "" for s in stop_strings(request)):
        raise bad_request("stop: an empty string would stop before the first token", param="stop")


def requested_max_tokens(request: _Sampling) -> int | None:
    return request.max_tokens if request.max_tokens is not None else request.max_completion_tokens


def stop_strings(request: _Sampling) -> list[str]:
    if request.stop is None:
        return []
    return [request.stop] if isinstance(request.stop, str) else list(request.stop)
