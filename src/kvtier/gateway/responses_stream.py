"""A streamed chat completion re-emitted as Responses API server-sent events.

Events, numbered from 0 by `sequence_number`, each `event: <type>\\ndata: <json>\\n\\n`:
`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, one `response.output_text.delta` per non-empty content delta,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` (or `response.incomplete` when the worker stopped at `max_tokens`) with
the usage of the worker's usage chunk. An upstream failure (an exception from `chunks` or an
in-band `{"error": ...}` chunk) ends the stream with `response.failed` instead, and so does a
failing `on_done`; `on_done` runs once, before the final event, and only on success.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvtier.gateway.responses import (
    envelope,
    message_id,
    output_message,
    response_object,
)
from kvtier.gateway.responses_request import ResponsesRequest

OnDone = Callable[[dict[str, Any], str], Awaitable[None]]


def sse(event: Mapping[str, Any]) -> bytes:
    """One server-sent event named by the event's `type`."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


@dataclass(slots=True)
class _Events:
    """Numbers events in the order they are made."""

    next_number: int = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.next_number, **fields}
        self.next_number += 1
        return sse(event)


@dataclass(slots=True)
class _Upstream:
    """What the worker's chunks said so far."""

    texts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    failure: str | None = None


def _chunk_deltas(chunk: Mapping[str, Any], upstream: _Upstream) -> list[str]:
    """The content deltas of one chunk; records its usage, finish reason or error."""
    if "error" in chunk or chunk.get("object") == "error":
        error = chunk.get("error", chunk)
        message = error.get("message") if isinstance(error, Mapping) else None
        upstream.failure = str(message or error)
        return []
    if chunk.get("usage"):
        upstream.usage = dict(chunk["usage"])
    deltas = []
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue
        content = (choice.get("delta") or {}).get("content")
        if content:
            deltas.append(content)
        upstream.finish_reason = choice.get("finish_reason") or upstream.finish_reason
    upstream.texts.extend(deltas)
    return deltas


def _failed(resp_id: str, req: ResponsesRequest, created_at: int, up: _Upstream) -> dict[str, Any]:
    obj = envelope(resp_id, req, created_at, "failed")
    obj["error"] = {"code": "server_error", "message": up.failure}
    obj["output"] = [output_message(resp_id, "".join(up.texts), "incomplete")]
    return obj


async def stream_events(
    resp_id: str,
    req: ResponsesRequest,
    chunks: AsyncIterator[dict[str, Any]],
    created_at: int,
    on_done: OnDone,
) -> AsyncIterator[bytes]:
    """The Responses SSE stream for `chunks` (chat.completion.chunk dicts of one choice).
    `on_done(response_object, output_text)` runs once the answer is complete."""
    emit, up, item_id = _Events(), _Upstream(), message_id(resp_id)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield emit("response.created", response=envelope(resp_id, req, created_at, "in_progress"))
    yield emit("response.in_progress", response=envelope(resp_id, req, created_at, "in_progress"))
    item = {**output_message(resp_id, "", "in_progress"), "content": []}
    yield emit("response.output_item.added", output_index=0, item=item)
    empty = output_message(resp_id, "", "in_progress")["content"][0]
    yield emit("response.content_part.added", **where, part=empty)
    try:
        async for chunk in chunks:
            for delta in _chunk_deltas(chunk, up):
                yield emit("response.output_text.delta", **where, delta=delta, logprobs=[])
            if up.failure is not None:
                break
    except Exception as exc:  # an upstream failure ends the stream in-band
        up.failure = f"upstream error: {exc}"
    if up.failure is not None:
        yield emit("response.failed", response=_failed(resp_id, req, created_at, up))
        return
    text = "".join(up.texts)
    completion = {"choices": [{"message": {"content": text}, "finish_reason": up.finish_reason}]}
    obj = response_object(resp_id, req, {**completion, "usage": up.usage}, created_at)
    message = obj["output"][0]
    yield emit("response.output_text.done", **where, text=text, logprobs=[])
    yield emit("response.content_part.done", **where, part=message["content"][0])
    yield emit("response.output_item.done", output_index=0, item=message)
    try:
        await on_done(obj, text)
    except Exception as exc:  # the answer exists but cannot be continued: say so
        up.failure = f"the response could not be stored: {exc}"
        yield emit("response.failed", response=_failed(resp_id, req, created_at, up))
        return
    yield emit(f"response.{obj['status']}", response=obj)
