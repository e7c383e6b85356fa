"""OpenAI's Responses API on top of chat completions: pure translations, no I/O.

How the app serves `POST /v1/responses` (`tenant` is the caller's tenant):

    req = parse_request(body)                    # BadRequest -> 400 with e.body()
    previous = None
    if req.previous_response_id:
        previous = await store.get(tenant, req.previous_response_id)
        if previous is None: 404 with previous_not_found(req.previous_response_id)
    chat = chat_body(req, previous)              # forward to a worker's /v1/chat/completions
    resp_id, created_at = new_response_id(), int(time.time())
    not streaming:
        obj = response_object(resp_id, req, completion, created_at)   # the 200 body
        if req.store: await store.put(stored(resp_id, tenant, req, previous,
                                              output_text(obj), obj["usage"], created_at), ttl_s)
    streaming (`chunks`: the worker's chat.completion.chunk dicts, `data: {"error"}` included):
        async def on_done(obj, text):
            if req.store: await store.put(stored(resp_id, tenant, req, previous,
                                                  text, obj["usage"], created_at), ttl_s)
        return SSE: stream_events(resp_id, req, chunks, created_at, on_done)
        (kvtier.gateway.responses_stream; on_done runs before `response.completed` is sent,
        so a client that sees it can continue at once; it is not called on failure.)

Token-identical rule. The rebuilt `messages` are exactly those a client keeping the history
itself would send to /v1/chat/completions: `[{"role": "system", "content": instructions}]`
(this request's instructions only: they are never carried over, as in OpenAI), then every
earlier input message and assistant answer (`{"role": "assistant", "content": output_text}`)
verbatim, then the new input. Rendered by `kvtier.gateway.tokens`, turn n-1's prompt followed
by its answer is a text prefix of turn n's prompt whenever both turns carry the same
instructions, so every full token of it is a token prefix and the worker's cached blocks hit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvtier.gateway.responses_request import (
    BadRequest,
    ResponsesRequest,
    parse_request,
    previous_not_found,
)
from kvtier.gateway.sessions import StoredResponse, new_response_id

__all__ = [
    "BadRequest",
    "ResponsesRequest",
    "chat_body",
    "envelope",
    "message_id",
    "new_response_id",
    "output_message",
    "output_text",
    "parse_request",
    "previous_not_found",
    "response_object",
    "stored",
    "usage_of",
]


def chat_body(req: ResponsesRequest, previous: StoredResponse | None) -> dict[str, Any]:
    """The /v1/chat/completions request that answers `req` continuing `previous`."""
    messages: list[dict[str, str]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    if previous is not None:
        messages.extend(dict(m) for m in previous.history)
    messages.extend(dict(m) for m in req.input)
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    optional = {
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
        "prompt_cache_key": req.prompt_cache_key,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def message_id(resp_id: str) -> str:
    """The id of a response's output message, derived from the response id."""
    return "msg_" + resp_id.removeprefix("resp_")


def usage_of(chat_usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A chat completion's `usage` as a Responses `usage` (None stays None).
    `cache_write_tokens` is not measured and reads 0."""
    if not chat_usage:
        return None
    details = chat_usage.get("prompt_tokens_details") or {}
    input_tokens = int(chat_usage.get("prompt_tokens") or 0)
    output_tokens = int(chat_usage.get("completion_tokens") or 0)
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {
            "cached_tokens": int(details.get("cached_tokens") or 0),
            "cache_write_tokens": 0,
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": int(reasoning or 0)},
        "total_tokens": int(chat_usage.get("total_tokens") or input_tokens + output_tokens),
    }


def output_message(resp_id: str, text: str, status: str) -> dict[str, Any]:
    """The assistant message output item holding `text`."""
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": message_id(resp_id),
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def envelope(resp_id: str, req: ResponsesRequest, created_at: int, status: str) -> dict[str, Any]:
    """A response object without output or usage (as sent in `response.created`)."""
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": req.model,
        "output": [],
        "parallel_tool_calls": True,
        "previous_response_id": req.previous_response_id,
        "prompt_cache_key": req.prompt_cache_key,
        "store": req.store,
        "temperature": req.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": req.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def response_object(
    resp_id: str, req: ResponsesRequest, completion: Mapping[str, Any], created_at: int
) -> dict[str, Any]:
    """The Responses API object for a chat completion (`choices[0].message.content`).
    A completion cut by `max_tokens` (`finish_reason: "length"`) gives status `incomplete`."""
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    cut = choice.get("finish_reason") == "length"
    status = "incomplete" if cut else "completed"
    obj = envelope(resp_id, req, created_at, status)
    obj["output"] = [output_message(resp_id, text, status)]
    obj["usage"] = usage_of(completion.get("usage"))
    if cut:
        obj["incomplete_details"] = {"reason": "max_output_tokens"}
    return obj


def output_text(obj: Mapping[str, Any]) -> str:
    """The text of a response object's output messages (what the SDK's `output_text` is)."""
    return "".join(
        part["text"]
        for item in obj.get("output") or []
        if item.get("type") == "message"
        for part in item.get("content") or []
        if part.get("type") == "output_text"
    )


def stored(
    resp_id: str,
    tenant: str,
    req: ResponsesRequest,
    previous: StoredResponse | None,
    output_text: str,
    usage: Mapping[str, Any] | None,
    created_at: int,
) -> StoredResponse:
    """What to store for a finished response: the previous history, this input, this answer."""
    earlier = previous.history if previous is not None else ()
    answer = {"role": "assistant", "content": output_text}
    return StoredResponse(
        id=resp_id,
        tenant=tenant,
        model=req.model,
        created_at=created_at,
        history=(*earlier, *req.input, answer),
        output_text=output_text,
        usage=dict(usage or {}),
        previous_response_id=req.previous_response_id,
        instructions=req.instructions,
    )
