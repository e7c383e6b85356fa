"""`--tokenizer DIR`: the gateway counts prompts in the model's own tokens, as vLLM does.

Without it the gateway counts 4 UTF-8 bytes as a token (`tokens.py`), which keeps routing
keys consistent among its own decisions and with `worker-sim`, but a real vLLM's KV events
name blocks of its tokenizer's ids: they then match only prompts sent as token ids. With the
model's tokenizer (a local directory, as vLLM's `--tokenizer`; transformers needed), a chat
is rendered with the model's chat template and encoded as vLLM's OpenAI server does
(`add_generation_prompt` true unless the request says otherwise, `continue_final_message`,
`chat_template_kwargs`; text parts of a message joined by newlines; no special tokens added
after the template), and a completion's text is encoded with the special tokens vLLM adds
(`add_special_tokens`, true by default). Requests vLLM renders otherwise (tools, documents,
images) may tokenize differently: their blocks then only miss in the index, and routing
falls back on the gateway's own predictions and affinities.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Mapping
from typing import Any

import jinja2
import numpy as np
from transformers import PreTrainedTokenizerBase

from kvtier.errors import ConfigError
from kvtier.gateway.tokens import TOKEN_ID_LIMIT, request_prompts


class ModelTokenizer:
    """Prompts of a request in a Hugging Face tokenizer's ids (`prompts`, the drop-in for
    `tokens.request_prompts`)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--tokenizer {path}: {exc}") from exc

    async def in_thread(self, body: Mapping[str, Any]) -> list[np.ndarray]:
        """`prompts` off the event loop: a long prompt takes milliseconds to encode, and
        the Rust encoder lets the loop run meanwhile."""
        return await asyncio.to_thread(self.prompts, body)

    def prompts(self, body: Mapping[str, Any]) -> list[np.ndarray]:
        if "messages" in body:
            return [self._chat(body)]
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not any(isinstance(t, str) for t in texts):
            return request_prompts(body)  # token ids, or an error to report
        special = body.get("add_special_tokens", True) is not False
        out = []
        for text in texts:
            if not isinstance(text, str):
                raise ValueError("'prompt' must not mix texts and token ids")
            out.append(self._ids(self.tokenizer(text, add_special_tokens=special)["input_ids"]))
        return out

    def _chat(self, body: Mapping[str, Any]) -> np.ndarray:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        if not all(isinstance(m, Mapping) for m in messages):
            raise ValueError("each message must be an object with 'role' and 'content'")
        continue_final = bool(body.get("continue_final_message", False))
        generation = body.get("add_generation_prompt", not continue_final) is not False
        try:
            ids = self.tokenizer.apply_chat_template(
                [{**m, "content": _text(m.get("content"))} for m in messages],
                add_generation_prompt=generation,
                continue_final_message=continue_final,
                tokenize=True,
                **_template_variables(body.get("chat_template_kwargs")),
            )
        except (TypeError, KeyError, jinja2.TemplateError) as exc:
            raise ValueError(f"the chat template failed on these messages: {exc}") from exc
        if isinstance(ids, Mapping):  # transformers 5 answers a BatchEncoding
            ids = ids["input_ids"]
        return self._ids(ids)

    @staticmethod
    def _ids(ids: Any) -> np.ndarray:
        out = np.asarray(ids, dtype=np.int64)
        if out.ndim != 1 or (
            out.size and not 0 <= int(out.min()) <= int(out.max()) < TOKEN_ID_LIMIT
        ):
            raise ValueError("the tokenizer gave no usable token ids for this prompt")
        return out


# apply_chat_template's own parameters: a client must not choose the template, its tools or
# documents, or how it encodes (a template a client sends would run here, in the gateway).
_RESERVED = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)


def _template_variables(kwargs: Any) -> dict[str, Any]:
    """A request's `chat_template_kwargs` that may reach the template: plain variables
    (`enable_thinking`, ...) with scalar values, none of apply_chat_template's parameters."""
    if not isinstance(kwargs, Mapping):
        return {}
    scalars = (str, int, float, bool, type(None))
    return {
        k: v
        for k, v in kwargs.items()
        if isinstance(k, str) and k not in _RESERVED and isinstance(v, scalars)
    }


def _text(content: Any) -> str:
    """A message's content as vLLM gives it to a template that wants a string: its text
    parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    raise ValueError("message content must be a string or a list of text parts")
