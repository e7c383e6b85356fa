"""Reading a request body within a bound, and giving up on work when the client leaves."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request

from kvtier.gateway.errors import ApiError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object; 413 past `limit` bytes, 400 when it is not a JSON object."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Awaits `work`, cancelled if the client goes away first (which closes the upstream
    connection, so the worker aborts the request too)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(499, "the client closed the connection")
    return task.result()


async def until_done(
    events: AsyncIterator[bytes], done: Callable[[], None]
) -> AsyncIterator[bytes]:
    """`events`, then `done()` however the stream ends (also if it never started: on GC)."""
    finalizer = weakref.finalize(events, done)
    try:
        async for event in events:
            yield event
    finally:
        finalizer()
