"""The subset of OpenAI's Responses API request the gateway serves, parsed and validated.

Supported: `model`, `input` (a string, or a list of messages `{"role", "content"}` or
`{"type": "message", ...}` items whose content is a string or a list of `input_text`,
`output_text` or `text` parts), `instructions`, `previous_response_id`, `store` (default
true), `stream`, `max_output_tokens`, `temperature`, `top_p`, `user`, `prompt_cache_key`,
`metadata`. Fields the SDK may send with their default values (`tools: []`,
`background: false`, `truncation: "disabled"`, a plain-text `text.format`, ...) are accepted
and ignored; anything else raises `BadRequest`, which the app answers with an OpenAI 400.

Normalisation rule (what keeps rebuilt prompts token-identical): a content part list becomes
the concatenation of its parts' `text`, with nothing between them, which is also the string a
client would send to /v1/chat/completions; string contents are kept verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvtier.gateway.sessions import is_response_id

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
SUPPORTED = frozenset(
    {
        "model", "input", "instructions", "previous_response_id", "store", "stream",
        "max_output_tokens", "temperature", "top_p", "user", "prompt_cache_key", "metadata",
        "stream_options",
    }
)  # fmt: skip
# Fields accepted only with one of these values (their defaults): they change nothing here.
DEFAULTS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "auto", "none"),
    "parallel_tool_calls": (None, True, False),
    "background": (None, False),
    "truncation": (None, "disabled"),
    "include": (None, []),
    "text": (None, {}, {"format": {"type": "text"}}),
    "reasoning": (None, {}),
    "conversation": (None,),
}


class BadRequest(ValueError):
    """A request outside the supported subset; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI error body for an HTTP 400."""
        error = {"message": self.message, "type": "invalid_request_error"}
        return {"error": {**error, "param": self.param, "code": self.code}}


def previous_not_found(response_id: str) -> dict[str, Any]:
    """The OpenAI error body for an HTTP 404 on an unknown `previous_response_id`."""
    message = f"Previous response with id '{response_id}' not found."
    return BadRequest(message, "previous_response_id", "previous_response_not_found").body()


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A validated Responses request; `input` holds the new turn as chat messages with string
    contents, in order (never empty)."""

    model: str
    input: tuple[dict[str, str], ...]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None


def parse_request(body: Any) -> ResponsesRequest:
    """The request in `body` (parsed JSON); raises `BadRequest` on anything unsupported."""
    if not isinstance(body, Mapping):
        raise BadRequest("The request body must be a JSON object.")
    _reject_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    previous = _optional(body, "previous_response_id", str)
    if previous is not None and not is_response_id(previous):
        raise BadRequest(f"Invalid 'previous_response_id': '{previous}'.", "previous_response_id")
    return ResponsesRequest(
        model=model,
        input=parse_input(body.get("input")),
        instructions=_optional(body, "instructions", str),
        previous_response_id=previous,
        store=_flag(body, "store", default=True),
        stream=_flag(body, "stream", default=False),
        max_output_tokens=_positive_int(body, "max_output_tokens"),
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        user=_optional(body, "user", str),
        prompt_cache_key=_optional(body, "prompt_cache_key", str),
        metadata=_metadata(body),
    )


def parse_input(value: Any) -> tuple[dict[str, str], ...]:
    """`input` as chat messages: a string is one user message; a list holds message items."""
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string or a non-empty list of messages.", "input")
    return tuple(_message(item, f"input[{i}]") for i, item in enumerate(value))


def _message(item: Any, where: str) -> dict[str, str]:
    if not isinstance(item, Mapping):
        raise BadRequest(f"'{where}' must be a message object.", where)
    kind = item.get("type", "message")
    if kind != "message":
        raise BadRequest(f"Unsupported input item type '{kind}' in '{where}'.", f"{where}.type")
    role = item.get("role")
    if role not in ROLES:
        raise BadRequest(f"'{where}.role' must be one of {', '.join(ROLES)}.", f"{where}.role")
    return {"role": role, "content": _content(item.get("content"), f"{where}.content")}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or a list of text parts.", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in TEXT_PARTS:
            raise BadRequest(
                f"Unsupported content part type '{kind}' (text only).", f"{where}[{j}]"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"'{where}[{j}].text' must be a string.", f"{where}[{j}].text")
        texts.append(text)
    return "".join(texts)


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if name in SUPPORTED:
            continue
        if name not in DEFAULTS:
            raise BadRequest(f"Unsupported parameter: '{name}'.", name, "unsupported_parameter")
        if value not in DEFAULTS[name]:
            raise BadRequest(f"Unsupported value for '{name}'.", name, "unsupported_value")


def _optional(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be a {kind.__name__}.", name)
    return value


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = _optional(body, name, bool)
    return default if value is None else bool(value)


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number.", name)
    return float(value)


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"'{name}' must be a positive integer.", name)
    return value


def _metadata(body: Mapping[str, Any]) -> dict[str, str] | None:
    value = body.get("metadata")
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest("'metadata' must be an object of string values.", "metadata")
    return dict(value)
