"""The HTTP face of one simulated worker: a plain Starlette app (no FastAPI: nothing here
needs request models), served by uvicorn on uvloop with httptools.

Routes as vLLM's OpenAI server: `POST /v1/chat/completions` and `POST /v1/completions`
(whole or SSE-streamed), `GET /v1/models`, `GET /health`, `GET /metrics`. A client that
disconnects cancels its request: Starlette cancels a stream's body on `http.disconnect`,
and a whole reply races its work against that message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from kvtier.gateway.simengine import Prefill, SimEngine
from kvtier.gateway.simmetrics import render
from kvtier.gateway.simopenai import (
    DONE,
    Kind,
    Reply,
    RequestError,
    SimRequest,
    parse_request,
    usage,
)

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away


def make_app(engine: SimEngine) -> Starlette:
    """The app serving `engine`."""
    h = _Handlers(engine)
    return Starlette(
        routes=[
            Route("/v1/chat/completions", h.chat, methods=["POST"]),
            Route("/v1/completions", h.text, methods=["POST"]),
            Route("/v1/models", h.models, methods=["GET"]),
            Route("/health", h.health, methods=["GET"]),
            Route("/metrics", h.metrics, methods=["GET"]),
        ]
    )


def _json(body: dict[str, Any], status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status, media_type="application/json")


class _Handlers:
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.created = int(time.time())

    async def chat(self, request: Request) -> Response:
        return self._refused(request) or await self._complete(request, Kind.CHAT)

    async def text(self, request: Request) -> Response:
        return self._refused(request) or await self._complete(request, Kind.TEXT)

    def _refused(self, request: Request) -> Response | None:
        """vLLM's 401 for a /v1 route called without the --api-key it was given."""
        key = self.engine.config.api_key
        if not key or request.headers.get("authorization") == f"Bearer {key}":
            return None
        return _json({"error": {"message": "Unauthorized", "type": "invalid_request_error",
                                "param": None, "code": None}}, 401)  # fmt: skip

    async def models(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        model = {
            "id": self.engine.config.model,
            "object": "model",
            "created": self.created,
            "owned_by": "kvtier",
            "max_model_len": self.engine.config.cache_tokens,
        }
        return _json({"object": "list", "data": [model]})

    async def health(self, request: Request) -> Response:
        return Response(b"", 200)

    async def metrics(self, request: Request) -> Response:
        return Response(render(self.engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _complete(self, request: Request, kind: Kind) -> Response:
        try:
            req = parse_request(await request.body(), kind, (self.engine.config.model,))
        except RequestError as exc:
            return _json(exc.body(), exc.status)
        reply = Reply(req)
        if req.stream:
            return StreamingResponse(self._stream(req, reply), media_type="text/event-stream")
        body = await _unless_disconnected(request, self._whole(req, reply))
        return Response(status_code=CLIENT_CLOSED) if body is None else _json(body)

    async def _whole(self, req: SimRequest, reply: Reply) -> dict[str, Any]:
        texts: list[str] = []
        prefill: Prefill | None = None
        tokens = self.engine.generate(req.prompt, req.salt, req.max_tokens)
        async with contextlib.aclosing(tokens):
            async for token in tokens:
                texts.append(token.text)
                prefill = token.prefill
        assert prefill is not None, "max_tokens is at least 1"
        return reply.whole("".join(texts), usage(prefill, len(texts)))

    async def _stream(self, req: SimRequest, reply: Reply) -> AsyncIterator[bytes]:
        """SSE: (chat) a role delta, one chunk per token, the last with its finish reason,
        then the usage chunk if asked for, then `[DONE]`."""
        count = 0
        prefill: Prefill | None = None
        tokens = self.engine.generate(req.prompt, req.salt, req.max_tokens)
        async with contextlib.aclosing(tokens):
            async for token in tokens:
                if count == 0 and req.kind is Kind.CHAT:
                    yield reply.chunk(None)
                count += 1
                prefill = token.prefill
                yield reply.chunk(token.text, finish=count == req.max_tokens)
        if req.include_usage and prefill is not None:
            yield reply.usage_chunk(usage(prefill, count))
        yield DONE


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """The result of `work`, or None (`work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (watch, task):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    return task.result() if not task.cancelled() else None


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
