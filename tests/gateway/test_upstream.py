"""The relay of a worker's SSE stream, against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from aiohttp import web

from kvtier.gateway import upstream

Writer = Callable[[web.StreamResponse], Coroutine[Any, Any, None]]


async def _serve(write: Writer) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await write(resp)
        return resp

    return await _serve_handler(handler)


async def _serve_handler(
    handler: Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]],
) -> tuple[web.AppRunner, str]:
    """An aiohttp server on 127.0.0.1 (any free port) answering the chat route."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions"


async def _relayed(write: Writer, keep_usage: bool = False) -> list[bytes]:
    runner, url = await _serve(write)
    session = upstream.new_session()
    usages: list[dict[str, Any]] = []
    try:
        resp = await upstream.open_stream(session, url, {"stream": True})
        events: AsyncIterator[bytes] = upstream.relay(
            resp, 7, keep_usage, lambda: None, usages.append
        )
        return [e async for e in events]
    finally:
        await session.close()
        await runner.cleanup()


def test_a_long_line_arrives_whole_and_the_usage_chunk_is_kept_back() -> None:
    """A 300 KiB chunk (past aiohttp's line reader) is relayed intact; the usage chunk the
    client did not ask for is read and dropped, with cached_tokens filled."""
    big = json.dumps({"choices": [{"delta": {"content": "x" * 300_000}}]}).encode()
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 20}}).encode()

    async def write(resp: web.StreamResponse) -> None:
        for part in (b"data: " + big[:1000], big[1000:] + b"\n\n", b"data: " + usage + b"\n\n"):
            await resp.write(part)
        await resp.write(b"data: [DONE]\n\n")

    events = asyncio.run(_relayed(write))
    assert b"".join(events) == b"data: " + big + b"\n\ndata: [DONE]\n\n"


def test_a_usage_chunk_is_rewritten_only_to_fill_cached_tokens() -> None:
    """A usage chunk with cached_tokens goes on as the worker wrote it; one without gets
    them (the estimate, below the prompt)."""
    full = b'{"choices": [], "usage": {"prompt_tokens": 20, "prompt_tokens_details": '
    full += b'{"cached_tokens": 3}}}'
    bare = b'{"choices": [], "usage": {"prompt_tokens": 5}}'
    for usage in (full, bare):

        async def write(resp: web.StreamResponse, usage: bytes = usage) -> None:
            await resp.write(b"data: " + usage + b"\n\ndata: [DONE]\n\n")

        relayed = b"".join(asyncio.run(_relayed(write, keep_usage=True)))
        chunk = relayed.split(b"\n\n")[0][6:]
        if usage is full:
            assert chunk == full
        else:
            assert json.loads(chunk)["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}


def test_a_stream_cut_before_done_ends_with_an_error_event() -> None:
    """A worker that stops without [DONE] gives the client an error event, then [DONE]."""

    async def write(resp: web.StreamResponse) -> None:
        await resp.write(b'data: {"choices": []}\n\n')

    relayed = b"".join(asyncio.run(_relayed(write)))
    first, error, done, _ = relayed.split(b"\n\n")
    assert first == b'data: {"choices": []}' and done == b"data: [DONE]"
    assert json.loads(error[6:])["error"]["type"] == "server_error"


@pytest.mark.parametrize("status", [400, 500])
def test_a_worker_error_status_is_the_requests_own(status: int) -> None:
    """4xx keeps its status and the worker's message; 500 becomes 502; neither is
    'unreachable' (which would retry it on every worker and mark them all down)."""

    async def main() -> upstream.ApiError:
        async def handler(request: web.Request) -> web.Response:
            body = {"error": {"message": "bad thing", "param": "top_p", "code": "x"}}
            return web.json_response(body, status=status)

        runner, url = await _serve_handler(handler)
        session = upstream.new_session()
        try:
            with pytest.raises(upstream.ApiError) as caught:
                await upstream.open_stream(session, url, {})
            return caught.value
        finally:
            await session.close()
            await runner.cleanup()

    error = asyncio.run(main())
    assert error.status == (400 if status == 400 else 502)
    assert error.message == "bad thing" and error.param == "top_p"
