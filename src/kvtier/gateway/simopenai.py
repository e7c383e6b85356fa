"""The OpenAI wire shapes `kvtier worker-sim` speaks, as vLLM's server writes them.

Requests: chat (`messages`) or completion (`prompt`) bodies with `model`, `max_tokens` or
`max_completion_tokens`, `stream`, `stream_options.include_usage` and vLLM's `cache_salt`.
Replies: whole completions, SSE chunks, and errors shaped
`{"error": {"message", "type", "param", "code"}}`. Usage carries `prompt_tokens_details.
cached_tokens` and the extension `kvtier_cached_tokens: {"gpu", "dram", "shared"}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec
import numpy as np

from kvtier.gateway.simengine import DEFAULT_MAX_TOKENS, Prefill
from kvtier.gateway.tokens import prompt_tokens

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError"}


class Kind(Enum):
    CHAT = "chat.completion"
    TEXT = "text_completion"


class RequestError(Exception):
    """A request the worker refuses; `body()` is the OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "InternalServerError")
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass(frozen=True, slots=True)
class SimRequest:
    """A parsed completion request."""

    kind: Kind
    model: str
    prompt: np.ndarray  # (T,) int64 token ids
    salt: str
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_request(raw: bytes, kind: Kind, models: tuple[str, ...]) -> SimRequest:
    """Raises RequestError: 400 for a malformed body, 404 for a model not in `models`."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if model not in models:
        raise RequestError(404, f"The model `{model}` does not exist.", "model")
    if (kind is Kind.CHAT) != ("messages" in body):
        field = "messages" if kind is Kind.CHAT else "prompt"
        raise RequestError(400, f"'{field}' is required", field)
    try:
        prompt = prompt_tokens(body)
    except ValueError as exc:
        raise RequestError(400, str(exc), "messages" if kind is Kind.CHAT else "prompt") from exc
    return SimRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        salt=_string(body, "cache_salt"),
        max_tokens=_max_tokens(body),
        stream=bool(body.get("stream", False)),
        include_usage=bool((body.get("stream_options") or {}).get("include_usage", False)),
    )


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name) or ""
    if not isinstance(value, str):
        raise RequestError(400, f"'{name}' must be a string", name)
    return value


def _max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(400, f"'{name}' must be a positive integer", name)
        return value
    return DEFAULT_MAX_TOKENS


def usage(prefill: Prefill, completion_tokens: int) -> dict[str, Any]:
    """The usage object of a request (cached token counts by tier)."""
    return {
        "prompt_tokens": prefill.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prefill.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": prefill.cached_tokens},
        "kvtier_cached_tokens": {
            "gpu": prefill.gpu_tokens,
            "dram": prefill.dram_tokens,
            "shared": prefill.shared_tokens,
        },
    }


class Reply:
    """The bodies of one request's reply: an id and creation time shared by all chunks."""

    def __init__(self, request: SimRequest) -> None:
        self.request = request
        prefix = "chatcmpl" if request.kind is Kind.CHAT else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, object_name: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.request.model,
        }

    def whole(self, text: str, usage_body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed completion."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if self.request.kind is Kind.CHAT:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(self.request.kind.value), "choices": [choice], "usage": usage_body}

    def chunk(self, text: str | None, finish: bool = False) -> bytes:
        """One SSE event: a content delta (chat: `text=None` is the role delta)."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.request.kind is Kind.CHAT:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            choice["delta"] = delta
            object_name = "chat.completion.chunk"
        else:
            choice["text"] = text or ""
            object_name = "text_completion"
        choice["finish_reason"] = "length" if finish else None
        return sse({**self._head(object_name), "choices": [choice]})

    def usage_chunk(self, usage_body: dict[str, Any]) -> bytes:
        """The final chunk with `stream_options.include_usage`: no choices, the usage."""
        chat = self.request.kind is Kind.CHAT
        head = self._head("chat.completion.chunk" if chat else "text_completion")
        return sse({**head, "choices": [], "usage": usage_body})


DONE = b"data: [DONE]\n\n"


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"
