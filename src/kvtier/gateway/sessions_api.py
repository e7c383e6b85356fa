"""`POST /v1/responses`: a conversation continued by `previous_response_id`.

The call sequence of `responses.py`: parse, fetch the previous response (404 when this
tenant has none of that id), rebuild the whole conversation as a chat completion, send it
through the gateway's one request path, answer as the Responses API, and store the new
response. The continued conversation is routed with an affinity to the worker the previous
turn went to, and the new response is bound to its own worker for the turn after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvtier.gateway.errors import ApiError
from kvtier.gateway.gateway import affinity_names
from kvtier.gateway.httpio import SSE_HEADERS, EventStream, read_json, until_disconnected
from kvtier.gateway.priority import PRIORITY_HEADER
from kvtier.gateway.responses import (
    BadRequest,
    chat_body,
    new_response_id,
    output_text,
    parse_request,
    previous_not_found,
    response_object,
    stored,
)
from kvtier.gateway.responses_stream import stream_events

if TYPE_CHECKING:
    from kvtier.gateway.gateway import Gateway

CHAT = "/v1/chat/completions"


def response_affinity(response_id: str) -> str:
    return f"response:{response_id}"


async def responses_endpoint(gateway: Gateway, request: Request) -> Response:
    caller = gateway.caller(request.headers.get("authorization"))
    tenant = caller.tenant
    body = await read_json(request, gateway.settings.max_body_bytes)
    try:
        req = parse_request(body)
    except BadRequest as exc:
        return JSONResponse(exc.body(), status_code=400)
    await gateway.check_model(req.model)
    previous = None
    if req.previous_response_id:
        try:
            previous = await gateway.responses.get(tenant, req.previous_response_id)
        except OSError as exc:
            raise ApiError(503, f"stored responses are unavailable: {exc}") from exc
        if previous is None:
            return JSONResponse(previous_not_found(req.previous_response_id), status_code=404)
    chat = chat_body(req, previous)
    resp_id, created_at = new_response_id(), int(time.time())
    # The turn continued is where this conversation's KV is; a user's or cache key's binding
    # may since have moved with their other conversations.
    names = affinity_names({"prompt_cache_key": req.prompt_cache_key, "user": req.user})
    if req.previous_response_id:
        names = (response_affinity(req.previous_response_id), *names)
    bind_as = response_affinity(resp_id)

    async def keep(obj: dict[str, Any], text: str) -> None:
        if req.store:
            record = stored(resp_id, tenant, req, previous, text, obj["usage"], created_at)
            await gateway.responses.put(record, gateway.settings.session_ttl_s)

    gate = gateway.gate
    prompts = await gateway.count(chat)
    entry = await gate.enter(
        tenant, caller.key, chat, request.headers.get(PRIORITY_HEADER), prompts
    )
    try:
        if req.stream:
            usage: dict[str, Any] = {}
            events = await gateway.stream(tenant, CHAT, chat, prompts, names, bind_as, usage.update)
            sse = stream_events(resp_id, req, _chunks(events), created_at, keep)
            headers = {**SSE_HEADERS, **entry.headers}
            return EventStream(sse, lambda: gate.leave(entry, usage), headers)
        work = gateway.complete(tenant, CHAT, chat, prompts, names, bind_as)
        completion = await until_disconnected(request, work)
    except BaseException:
        gate.leave(entry, None)
        raise
    gate.leave(entry, completion.get("usage"))
    obj = response_object(resp_id, req, completion, created_at)
    try:
        await keep(obj, output_text(obj))
    except OSError as exc:
        raise ApiError(503, f"the response could not be stored: {exc}") from exc
    return JSONResponse(obj, headers=entry.headers)


async def _chunks(events: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The chat.completion.chunk objects of a relayed SSE stream (an error event included)."""
    async for event in events:
        payload = event[5:].strip() if event.startswith(b"data:") else b""
        for line in payload.split(b"\n\ndata: "):
            if not line or line == b"[DONE]":
                continue
            try:
                chunk = json.loads(line)
            except ValueError:
                continue
            if isinstance(chunk, dict):
                yield chunk
