"""A queued task's one call to its engine: `POST {engine}/v1/chat/completions`, not streamed.

Which failures are worth another delivery:
- retryable (`EngineError.retryable`): the engine cannot be reached or drops the connection;
  no answer within the task timeout; 408, 429 and any 5xx; a 200 that is not a JSON object.
  The engine, not the request, is at fault (or the request is too slow for the timeout, which
  a few retries will show): the task is handed back for another delivery, at most
  `max_deliveries` in all.
- permanent: any other 4xx (400 malformed body, 401/403, 404 unknown model, 413, 422). The
  request itself is wrong and would fail on every engine: the task fails at once (one
  delivery) and goes to the dead-letter stream with the engine's message.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from kvtier.gateway.upstream import bearer

RETRYABLE_STATUS = frozenset({408, 429})
CONNECT_TIMEOUT_S = 5.0


class EngineError(Exception):
    """A task's engine call failed; `retryable` says whether another delivery may succeed."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def engine_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body as sent: never streamed (the worker stores one whole completion)."""
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


class Engine:
    """One engine's OpenAI API through one pooled aiohttp session (open it in a loop)."""

    def __init__(self, url: str, timeout_s: float, api_key: str = "") -> None:
        self.url = url.rstrip("/") + "/v1/chat/completions"
        timeout = aiohttp.ClientTimeout(total=timeout_s, connect=CONNECT_TIMEOUT_S)
        self._session = aiohttp.ClientSession(timeout=timeout, headers=bearer(api_key))

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """The engine's completion of `body`; raises EngineError."""
        try:
            async with self._session.post(self.url, json=engine_body(body)) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            kind = "timed out" if isinstance(exc, asyncio.TimeoutError) else "failed"
            raise EngineError(f"the engine call {kind}: {exc!r}", retryable=True) from exc
        if status != 200:
            retryable = status in RETRYABLE_STATUS or status >= 500
            raise EngineError(f"the engine answered {status}: {_message(raw)}", retryable)
        try:
            completion = json.loads(raw)
        except ValueError as exc:
            raise EngineError(f"the engine's answer is not JSON: {exc}", True) from exc
        if not isinstance(completion, dict):
            raise EngineError("the engine's answer is not a JSON object", retryable=True)
        return completion

    async def close(self) -> None:
        await self._session.close()


def _message(raw: bytes) -> str:
    """The error message of an OpenAI-style error body, else the body's start."""
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return raw[:200].decode(errors="replace")
