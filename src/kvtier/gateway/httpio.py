"""Reading a request body within a bound, giving up on work when the client leaves, and
streaming server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from kvtier.gateway.errors import ApiError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = b"data: [DONE]\n\n"


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


class EventStream(Response):
    """A `text/event-stream` answer relaying `events`, then `done()` however it ends (also if
    it never starts: on GC). A client that leaves cancels the relay (which closes the upstream
    connection, so the worker aborts the request too).

    Starlette's StreamingResponse watches for the client leaving with an anyio task group per
    stream (~60 us of CPU a stream); here one plain task watches and cancels the relay. The
    event ending in `[DONE]` goes out with the end of the body, in one write: after it the
    relay ends without waiting on anything."""

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[bytes], done: Callable[[], None], headers: Mapping[str, str]
    ) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._done = weakref.finalize(events, done)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relaying = asyncio.current_task()
        assert relaying is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            relaying.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._relay(send)
        except asyncio.CancelledError:
            if not left:
                raise
            if sys.version_info >= (3, 11):
                relaying.uncancel()
            # Cancelled in `send` (a backed-up client), the relay is left paused at a yield:
            # close it now, so the upstream closes at once rather than when GC finalizes it.
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        finally:
            watcher.cancel()
            self._done()

    async def _relay(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
        held = b""
        async for event in self.events:
            if held:
                await send({"type": "http.response.body", "body": held, "more_body": True})
                held = b""
            if event.endswith(DONE_EVENT):
                held = event
            else:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": held, "more_body": False})
