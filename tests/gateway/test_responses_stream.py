"""Streamed Responses events: every event validates as the SDK's stream event type, the
official openai client streams them from a real HTTP server, and failures end in
`response.failed` without storing."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from kvtier.gateway.responses import new_response_id, parse_request, response_object
from kvtier.gateway.responses_stream import stream_events

EVENTS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14,
         "prompt_tokens_details": {"cached_tokens": 8}}  # fmt: skip
HAPPY = [
    "event: response.created",
    "event: response.in_progress",
    "event: response.output_item.added",
    "event: response.content_part.added",
]


def chunks_of(pieces: list[str], finish: str = "stop") -> list[dict[str, Any]]:
    """The chat.completion.chunk dicts a worker streams for `pieces`, then its usage chunk."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    for i, piece in enumerate(pieces):
        last = finish if i == len(pieces) - 1 else None
        choice = {"index": 0, "delta": {"content": piece}, "finish_reason": last}
        out.append({**base, "choices": [choice]})
    out.append({**base, "choices": [], "usage": USAGE})
    return out


async def replay(chunks: list[dict[str, Any]], fail_after: int | None = None) -> AsyncIterator[Any]:
    for i, chunk in enumerate(chunks):
        if i == fail_after:
            raise ConnectionResetError("worker went away")
        yield chunk


def collect(
    chunks: list[dict[str, Any]], body: dict[str, Any], fail_after: int | None = None,
    store_fails: bool = False,
) -> tuple[bytes, list[tuple[dict[str, Any], str]]]:  # fmt: skip
    """The SSE bytes of one stream and the on_done calls it made."""
    done: list[tuple[dict[str, Any], str]] = []

    async def on_done(obj: dict[str, Any], text: str) -> None:
        if store_fails:
            raise OSError("redis down")
        done.append((obj, text))

    async def run() -> bytes:
        req, resp_id = parse_request(body), new_response_id()
        events = stream_events(resp_id, req, replay(chunks, fail_after), 1700000000, on_done)
        return b"".join([event async for event in events])

    return asyncio.run(run()), done


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """The events of an SSE body; the `event:` line must match the data's type."""
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def test_events_validate_and_complete_with_usage() -> None:
    """Each event validates as the SDK's ResponseStreamEvent, numbered from 0; the deltas add
    up to the text; the completed response equals the non-streamed object."""
    body = {"model": "m", "input": "hi", "stream": True}
    raw, done = collect(chunks_of(["Hel", "lo", " 世界"]), body)
    events = parse_sse(raw)
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [f"event: {e['type']}" for e in events[:4]] == HAPPY
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == ["Hel", "lo", " 世界"]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 8
    completion = {"choices": [{"message": {"content": "Hello 世界"}, "finish_reason": "stop"}],
                  "usage": USAGE}  # fmt: skip
    assert final == response_object(final["id"], parse_request(body), completion, 1700000000)
    assert done == [(final, "Hello 世界")]


def test_length_cut_streams_incomplete() -> None:
    """A stream stopped by max_tokens ends with response.incomplete (still stored)."""
    raw, done = collect(chunks_of(["ab"], finish="length"), {"model": "m", "input": "q"})
    last = parse_sse(raw)[-1]
    EVENTS.validate_python(last)
    assert last["type"] == "response.incomplete" and len(done) == 1


@pytest.mark.parametrize("how", ["exception", "error chunk", "store"])
def test_failures_end_with_response_failed(how: str) -> None:
    """A worker failure (raised or in-band) or a failing on_done ends with response.failed
    carrying the partial text; on_done is not left with a stored response."""
    chunks = chunks_of(["par", "tial", "!"])
    fail_after = 3 if how == "exception" else None
    if how == "error chunk":
        chunks[3] = {"error": {"message": "engine dead", "type": "InternalServerError"}}
    raw, done = collect(chunks, {"model": "m", "input": "q"}, fail_after, how == "store")
    events = parse_sse(raw)
    for event in events:
        EVENTS.validate_python(event)
    failed = events[-1]
    assert failed["type"] == "response.failed" and not done
    assert failed["response"]["error"]["code"] == "server_error"
    text = failed["response"]["output"][0]["content"][0]["text"]
    assert text == ("partial!" if how == "store" else "partial")
    assert not any(e["type"] == "response.completed" for e in events)


class _Canned(BaseHTTPRequestHandler):
    """Answers every POST with the server's canned body (JSON or SSE)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        content_type, body = self.server.canned  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def canned_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client_for(server: ThreadingHTTPServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="k")


def test_official_client_parses_a_response(canned_server: ThreadingHTTPServer) -> None:
    """client.responses.create returns a Response with our id, text and usage."""
    req = parse_request({"model": "m", "input": "q"})
    completion = {"choices": [{"message": {"content": "Hi!"}, "finish_reason": "stop"}],
                  "usage": USAGE}  # fmt: skip
    obj = response_object(new_response_id(), req, completion, 1700000000)
    canned_server.canned = ("application/json", json.dumps(obj).encode())  # type: ignore[attr-defined]
    response = client_for(canned_server).responses.create(model="m", input="q")
    assert response.id == obj["id"] and response.output_text == "Hi!"
    assert response.usage is not None and response.usage.input_tokens == 11


def test_official_client_streams_the_events(canned_server: ThreadingHTTPServer) -> None:
    """client.responses.stream yields text deltas and a final response from our events."""
    raw, _ = collect(chunks_of(["One", ", two", ", three."]), {"model": "m", "input": "q"})
    canned_server.canned = ("text/event-stream", raw)  # type: ignore[attr-defined]
    client = client_for(canned_server)
    with client.responses.stream(model="m", input="q") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["One", ", two", ", three."]
    assert final.output_text == "One, two, three." and final.status == "completed"
    assert final.usage is not None and final.usage.total_tokens == 14
    kinds = [e.type for e in client.responses.create(model="m", input="q", stream=True)]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
