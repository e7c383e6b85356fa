"""Calls to a worker's OpenAI API, streamed or not, through one pooled aiohttp session.

aiohttp rather than httpx on this side: it is the faster client under many concurrent streams
(vLLM's production-stack router uses it the same way) and reads a stream line by line without
buffering. A stream is passed through one SSE line at a time; only the usage chunk is parsed,
to fill `prompt_tokens_details.cached_tokens` when the worker leaves it out and to read the
usage the gateway accounts. A worker that fails before its first byte raises `Unreachable` (the
caller may route the request elsewhere); one that dies mid-stream ends the client's stream
with an in-band error event and `[DONE]`, never a hang. Closing the iterator (a client that
went away) closes the upstream connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from kvtier.gateway.errors import ApiError, error_body

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # between two bytes of a worker's answer
LINE_LIMIT = 1 << 24  # longest SSE line accepted from a worker


class Unreachable(Exception):
    """The worker could not be reached or failed before answering."""


def new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, read_bufsize=1 << 16, max_line_size=LINE_LIMIT
    )


def fill_usage(usage: dict[str, Any] | None, cached_estimate: int) -> dict[str, Any] | None:
    """`prompt_tokens_details.cached_tokens`, always: the worker's figure, else the estimate."""
    if not isinstance(usage, dict):
        return usage
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        details = usage["prompt_tokens_details"] = {}
    if not isinstance(details.get("cached_tokens"), int):
        prompt = usage.get("prompt_tokens")
        cap = max(prompt - 1, 0) if isinstance(prompt, int) else cached_estimate
        details["cached_tokens"] = min(cached_estimate, cap)
    return usage


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    try:
        resp = await session.post(url, json=body)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise Unreachable(f"{url}: {exc}") from exc
    if resp.status >= 500:
        resp.release()
        raise Unreachable(f"{url}: HTTP {resp.status}")
    if resp.status != 200:
        try:
            payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError):
            payload = {}
        finally:
            resp.release()
        error = payload.get("error") if isinstance(payload, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise ApiError(resp.status, str(message or f"worker answered HTTP {resp.status}"))
    return resp


async def complete(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], cached_estimate: int
) -> dict[str, Any]:
    """A non-streamed completion, usage filled."""
    resp = await _post(session, url, body)
    try:
        result = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise ApiError(502, f"the worker's answer was cut off or not JSON: {exc}") from exc
    finally:
        resp.release()
    if not isinstance(result, dict):
        raise ApiError(502, "the worker's answer was not a JSON object")
    fill_usage(result.get("usage"), cached_estimate)
    return result


async def open_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    """Sends a streamed request; raises Unreachable or ApiError before any byte is relayed."""
    return await _post(session, url, body)


async def relay(
    resp: aiohttp.ClientResponse,
    cached_estimate: int,
    keep_usage_chunk: bool,
    on_first: Callable[[], None],
    on_usage: Callable[[dict[str, Any]], None],
) -> AsyncIterator[bytes]:
    """The worker's SSE events, one `data:` line each, ending in `[DONE]`."""
    first, done = True, False
    try:
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if not line.startswith(b"data:"):
                continue
            if first:
                first = False
                on_first()
            payload = line[5:].lstrip()
            done = payload == b"[DONE]"
            if b'"prompt_tokens"' in payload:
                rewritten = _usage_chunk(payload, cached_estimate, keep_usage_chunk, on_usage)
                if rewritten is None:
                    continue
                payload = rewritten
            yield b"data: " + payload + b"\n\n"
        if not done:
            yield _error_event("the worker ended its stream without [DONE]")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        yield _error_event(f"the worker failed mid-stream: {type(exc).__name__}")
    finally:
        resp.release()
        resp.close()


def _error_event(message: str) -> bytes:
    error = json.dumps(error_body(message, "server_error")).encode()
    return b"data: " + error + b"\n\ndata: [DONE]\n\n"


def _usage_chunk(
    payload: bytes,
    cached_estimate: int,
    keep: bool,
    on_usage: Callable[[dict[str, Any]], None],
) -> bytes | None:
    try:
        chunk = json.loads(payload)
    except ValueError:
        return payload
    usage = chunk.get("usage") if isinstance(chunk, dict) else None
    if not isinstance(usage, dict):
        return payload
    on_usage(fill_usage(usage, cached_estimate) or usage)
    if not keep and not chunk.get("choices"):
        return None
    return json.dumps(chunk, separators=(",", ":")).encode()
