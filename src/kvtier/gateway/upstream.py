"""Calls to a worker's OpenAI API, streamed or not, through one pooled aiohttp session.

aiohttp rather than httpx on this side: it is the faster client under many concurrent streams
(vLLM's production-stack router uses it the same way) and reads a stream line by line without
buffering. A stream is passed through one SSE line at a time; only the usage chunk is parsed,
to fill `prompt_tokens_details.cached_tokens` when the worker leaves it out and to read the
usage the gateway accounts.

A worker that cannot be reached, drops the connection or answers 502/503/504 before its first
byte raises `Unreachable` (the caller may route the request elsewhere). Any other error status
is the request's own and is passed back with the worker's message, `param` and `code`. A worker
that dies mid-stream, or stalls for `stall_s` once its stream has started (a lost host, a
wedged engine: nothing closes the socket), ends the client's stream with an in-band error
event and `[DONE]`, never a hang. Before the first event a worker may take READ_TIMEOUT_S:
a request can wait that long in a busy engine's queue. Closing the iterator (a client that
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
READ_TIMEOUT_S = 600.0  # between two bytes of a worker's answer, until its first event
STALL_TIMEOUT_S = 60.0  # between two bytes of a stream that has started
LINE_LIMIT = 1 << 24  # longest SSE line accepted from a worker


UNAVAILABLE = (502, 503, 504)  # a worker answering these is down or overloaded, not the request


class Unreachable(Exception):
    """The worker could not be reached or failed before answering."""


def bearer(api_key: str) -> dict[str, str] | None:
    """The headers that send `api_key` to a worker (vLLM's --api-key); None without one."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def new_session(api_key: str = "") -> aiohttp.ClientSession:
    """The session to every worker; `api_key` is sent to them as vLLM's --api-key."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, read_bufsize=1 << 16, headers=bearer(api_key)
    )


def fill_usage(usage: dict[str, Any] | None, cached_estimate: int) -> dict[str, Any] | None:
    """`prompt_tokens_details.cached_tokens`, always: the worker's figure, else the estimate."""
    if not isinstance(usage, dict) or _has_cached_tokens(usage):
        return usage
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        details = usage["prompt_tokens_details"] = {}
    prompt = usage.get("prompt_tokens")
    cap = max(prompt - 1, 0) if isinstance(prompt, int) else cached_estimate
    details["cached_tokens"] = min(cached_estimate, cap)
    return usage


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> aiohttp.ClientResponse:
    try:
        resp = await session.post(url, json=body)
    except aiohttp.ConnectionTimeoutError as exc:
        raise Unreachable(f"{url}: {exc}") from exc
    except asyncio.TimeoutError as exc:  # connected, but no answer in READ_TIMEOUT_S
        raise ApiError(504, "the worker did not answer in time") from exc
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise Unreachable(f"{url}: {exc}") from exc
    except aiohttp.ClientError as exc:
        raise ApiError(502, f"the worker's answer was not HTTP: {exc}") from exc
    if resp.status in UNAVAILABLE:
        resp.release()
        raise Unreachable(f"{url}: HTTP {resp.status}")
    if resp.status != 200:
        try:
            payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError):
            payload = {}
        finally:
            resp.release()
        if resp.status in (401, 403):  # the gateway's key, not the client's: not theirs to fix
            raise ApiError(502, f"a worker refused the gateway (HTTP {resp.status}); its "
                           "operator must set --worker-api-key")  # fmt: skip
        error = payload.get("error") if isinstance(payload, dict) else None
        error = error if isinstance(error, dict) else {}
        message = str(error.get("message") or f"the worker answered HTTP {resp.status}")
        status = resp.status if resp.status < 500 else 502
        code = error.get("code")
        raise ApiError(status, message, error.get("param"), code if isinstance(code, str) else None)
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
    on_end: Callable[[], None] = lambda: None,
    stall_s: float = STALL_TIMEOUT_S,
) -> AsyncIterator[bytes]:
    """The worker's SSE events (`data:` lines), ending in `[DONE]`; `on_end()` once it ends,
    however. The events of one read from the worker go out as one write: under load that is
    many, and each write costs."""
    first, done = True, False
    try:
        async for lines in _reads(resp):
            out = bytearray()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                if first:
                    first = False
                    on_first()
                    _read_timeout(resp, stall_s)
                payload = line[5:].strip()
                done = payload == b"[DONE]"
                if b'"prompt_tokens"' in payload:
                    rewritten = _usage_chunk(payload, cached_estimate, keep_usage_chunk, on_usage)
                    if rewritten is None:
                        continue
                    payload = rewritten
                out += b"data: " + payload + b"\n\n"
                if done:
                    break
            if out:
                yield bytes(out)
            if done:
                return
        yield _error_event("the worker ended its stream without [DONE]")
    except (aiohttp.ClientError, aiohttp.http_exceptions.HttpProcessingError,
            asyncio.TimeoutError, LineTooLong) as exc:  # fmt: skip
        if not done:
            yield _error_event(f"the worker failed mid-stream: {type(exc).__name__}")
    finally:
        resp.release()
        resp.close()
        on_end()


def _read_timeout(resp: aiohttp.ClientResponse, seconds: float) -> None:
    """The longest wait for the worker's next bytes, from now on (aiohttp sets it anew per
    request). Its timer is restarted now, else the one the last read started would run out
    first; not once the answer has ended (then the connection may be reused, and aiohttp has
    dropped the timer)."""
    protocol = resp.connection.protocol if resp.connection is not None else None
    if protocol is not None:
        protocol.read_timeout = seconds
        if not resp.content.is_eof():
            protocol.start_timeout()


class LineTooLong(Exception):
    """A worker sent an SSE line longer than LINE_LIMIT."""


async def _reads(resp: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """The complete lines (without their endings) of each read of the body; a line may be
    up to LINE_LIMIT bytes long and span reads."""
    pending = bytearray()
    async for chunk in resp.content.iter_any():
        if not pending and chunk.endswith(b"\n"):  # whole lines, the usual case: no copies
            *lines, _ = chunk.split(b"\n")
            yield [line.rstrip(b"\r") for line in lines] if b"\r" in chunk else lines
            continue
        pending += chunk
        if b"\n" not in chunk:
            if len(pending) > LINE_LIMIT:
                raise LineTooLong(f"an SSE line longer than {LINE_LIMIT} bytes")
            continue
        *lines, rest = bytes(pending).split(b"\n")
        pending = bytearray(rest)
        yield [line.rstrip(b"\r") for line in lines]
    if pending:
        yield [bytes(pending).rstrip(b"\r")]


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
    if not _has_cached_tokens(usage):  # else the worker's own bytes go on, unchanged
        fill_usage(usage, cached_estimate)
        payload = json.dumps(chunk, separators=(",", ":")).encode()
    if chunk.get("choices"):  # a worker sending usage with every chunk: count the last only
        return payload
    on_usage(usage)
    return payload if keep else None


def _has_cached_tokens(usage: dict[str, Any]) -> bool:
    details = usage.get("prompt_tokens_details")
    return isinstance(details, dict) and isinstance(details.get("cached_tokens"), int)
