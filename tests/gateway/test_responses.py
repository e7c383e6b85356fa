"""Responses API translation: request validation, token-identical prompt rebuilds over 1,000
random conversations, and response objects the official openai SDK parses."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from openai.types.responses import Response

from kvtier.gateway.responses import (
    BadRequest,
    chat_body,
    new_response_id,
    output_text,
    parse_request,
    previous_not_found,
    response_object,
    stored,
    usage_of,
)
from kvtier.gateway.sessions import StoredResponse
from kvtier.gateway.tokens import TOKEN_BYTES, prompt_tokens, render_messages, tokenize

CHAT_USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 7,
    "total_tokens": 47,
    "prompt_tokens_details": {"cached_tokens": 32},
}


def completion(text: str, finish: str = "stop") -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    return {"object": "chat.completion", "choices": [{**choice, "finish_reason": finish}],
            "usage": CHAT_USAGE}  # fmt: skip


def test_string_and_item_inputs_become_chat_messages() -> None:
    """A string is one user message; message items with text part lists become their joined
    text; extra item fields (id, status, annotations) are ignored."""
    assert parse_request({"model": "m", "input": "hi"}).input == (
        {"role": "user", "content": "hi"},
    )
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "c", "annotations": []}]},
    ]  # fmt: skip
    req = parse_request(
        {"model": "m", "input": items, "tools": [], "text": {"format": {"type": "text"}}}
    )
    assert req.input == (
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
    )
    assert req.store and not req.stream


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
        ({"model": "m", "input": "x", "background": True}, "background"),
        ({"model": "m", "input": "x", "n": 2}, "n"),
        ({"model": "m", "input": "x", "previous_response_id": "resp_../x"}, "previous_response_id"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata"),
        ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]},
         "input[0].type"),
        ({"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "http://x"}]}]}, "input[0].content[0]"),
    ],
)  # fmt: skip
def test_unsupported_requests_are_bad_requests(body: dict[str, Any], param: str) -> None:
    """Anything outside the subset raises BadRequest naming the parameter, with an OpenAI
    error body."""
    with pytest.raises(BadRequest) as info:
        parse_request(body)
    error = info.value.body()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_previous_not_found_body() -> None:
    """The 404 body names the missing id and the parameter."""
    error = previous_not_found("resp_" + "0" * 32)["error"]
    assert error["param"] == "previous_response_id" and "resp_" + "0" * 32 in error["message"]


def test_chat_body_passes_sampling_and_streams_usage() -> None:
    """Sampling fields pass through, max_output_tokens becomes max_tokens, a stream asks for
    the usage chunk, and instructions lead as a system message."""
    req = parse_request({
        "model": "m", "input": "q", "instructions": "sys", "max_output_tokens": 9,
        "temperature": 0.5, "top_p": 0.9, "user": "u", "prompt_cache_key": "k", "stream": True,
    })  # fmt: skip
    assert chat_body(req, None) == {
        "model": "m",
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
        "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "user": "u",
        "prompt_cache_key": "k", "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    assert chat_body(parse_request({"model": "m", "input": "q"}), None) == {
        "model": "m", "messages": [{"role": "user", "content": "q"}]}  # fmt: skip


ALPHABET = "abc xyz\n\t\"'{}<|>|:;ÄéØ世界🙂\0"


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))


def random_turn(rng: random.Random) -> tuple[Any, list[dict[str, str]]]:
    """A new turn as the Responses `input`, and as the messages a chat client would send."""
    if rng.random() < 0.4:
        text = random_text(rng)
        return text, [{"role": "user", "content": text}]
    items, messages = [], []
    for _ in range(rng.randint(1, 3)):
        role, text = (
            rng.choice(("user", "user", "system", "developer", "assistant")),
            random_text(rng),
        )
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 3)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        kind = "output_text" if role == "assistant" else rng.choice(("input_text", "text"))
        content: Any = text if rng.random() < 0.5 else [{"type": kind, "text": p} for p in pieces]
        items.append({"type": "message", "role": role, "content": content})
        messages.append({"role": role, "content": text})
    return items, messages


def full_tokens(text: str) -> np.ndarray:
    """The tokens of `text` that no later text can change (the padded tail one excluded)."""
    return tokenize(text)[: len(text.encode()) // TOKEN_BYTES]


def test_rebuilt_prompts_are_token_identical_over_1000_conversations() -> None:
    """For 1,000 random conversations, each turn's rebuilt messages equal the list a client
    keeping its own history sends, and (same instructions each turn) the previous prompt plus
    its answer is a text prefix, and its full tokens a token prefix, of the next prompt."""
    rng = random.Random(1234)
    for _ in range(1000):
        instructions = rng.choice((None, "", "You are terse.", random_text(rng)))
        client_history: list[dict[str, str]] = []
        previous: StoredResponse | None = None
        before = ""  # turn n-1's rendered prompt followed by its answer
        for _turn in range(rng.randint(1, 6)):
            new_input, new_messages = random_turn(rng)
            body = {"model": "m", "input": new_input, "instructions": instructions,
                    "previous_response_id": previous.id if previous else None}  # fmt: skip
            sent = chat_body(parse_request(body), previous)["messages"]
            system = [] if instructions is None else [{"role": "system", "content": instructions}]
            assert sent == system + client_history + new_messages
            rendered = render_messages(sent)
            assert rendered.startswith(before)
            prefix = full_tokens(before)
            assert np.array_equal(prompt_tokens({"messages": sent})[: len(prefix)], prefix)
            answer = random_text(rng)
            resp_id = new_response_id()
            previous = stored(resp_id, "t", parse_request(body), previous, answer, None, 0)
            client_history += [*new_messages, {"role": "assistant", "content": answer}]
            before = rendered + answer


def test_instructions_are_not_carried_over() -> None:
    """A continuation without instructions sends none, even if the previous response had."""
    first = parse_request({"model": "m", "input": "q1", "instructions": "be brief"})
    prev = stored(new_response_id(), "t", first, None, "a1", None, 0)
    second = parse_request({"model": "m", "input": "q2", "previous_response_id": prev.id})
    assert chat_body(second, prev)["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert prev.instructions == "be brief"


def test_response_object_parses_with_the_sdk() -> None:
    """The object validates as the SDK's Response; its output_text and usage carry over."""
    req = parse_request({"model": "m", "input": "q", "instructions": "i", "metadata": {"a": "b"}})
    resp_id = new_response_id()
    obj = response_object(resp_id, req, completion("Hello!"), 1700000000)
    parsed = Response.model_validate(obj)
    assert parsed.id == resp_id and parsed.status == "completed"
    assert parsed.output_text == output_text(obj) == "Hello!"
    assert parsed.usage is not None and parsed.usage.input_tokens_details.cached_tokens == 32
    assert parsed.usage.total_tokens == 47 and parsed.metadata == {"a": "b"}
    assert "output_text" not in obj


def test_length_cut_is_incomplete() -> None:
    """finish_reason 'length' gives status incomplete with reason max_output_tokens."""
    req = parse_request({"model": "m", "input": "q", "max_output_tokens": 3})
    parsed = Response.model_validate(
        response_object(new_response_id(), req, completion("ab", "length"), 1)
    )
    assert parsed.status == "incomplete" and parsed.incomplete_details is not None
    assert parsed.incomplete_details.reason == "max_output_tokens"


def test_usage_without_details() -> None:
    """Missing usage stays None; missing details read 0."""
    assert usage_of(None) is None
    usage = usage_of({"prompt_tokens": 5, "completion_tokens": 2})
    assert usage is not None and usage["total_tokens"] == 7
    assert usage["input_tokens_details"]["cached_tokens"] == 0
