"""How the gateway and the simulated worker see a prompt: text, tokens, and block keys.

The gateway routes without the model's tokenizer. It renders a chat request to one canonical
text and counts 4 UTF-8 bytes as a token (about what BPE tokenizers give for English), so two
requests that share a prefix of messages share a prefix of tokens. `kvtier worker-sim` uses
the same function, so its vLLM-format KV events carry token ids the gateway can rehash.

Block keys chain like vLLM's and kvtier's: each full block's key hashes its tokens seeded with
its parent's key, and the root is seeded with the salt (the tenant's `cache_salt`) and the
LoRA adapter, so two tenants never share a key. Partial tail blocks have no key.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xxhash

BLOCK_TOKENS = 16  # vLLM's default block size
TOKEN_BYTES = 4
TOKEN_ID_LIMIT = 1 << 31


def message_text(content: Any) -> str:
    """The text of a message's `content`: a string, or a list of `{"type": "text"}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    raise ValueError("message content must be a string or a list of text parts")


def render_messages(messages: Iterable[Mapping[str, Any]]) -> str:
    """One canonical text for a chat: `<|role|>\\ncontent\\n` per message, then the
    assistant's turn. Prefixes of a conversation render to prefixes of its text."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError("each message must be an object with 'role' and 'content'")
        role = message.get("role", "user")
        out.append(f"<|{role}|>\n{message_text(message.get('content'))}\n")
    out.append("<|assistant|>\n")
    return "".join(out)


def tokenize(text: str) -> np.ndarray:
    """Token ids of a text: its UTF-8 bytes, 4 to a token (the tail zero-padded)."""
    raw = text.encode("utf-8")
    raw += b"\0" * (-len(raw) % TOKEN_BYTES)
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)  # (T,)


def prompt_tokens(body: Mapping[str, Any]) -> np.ndarray:
    """The prompt of a chat (`messages`) or completion (`prompt`: text or token ids) request."""
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        return tokenize(render_messages(messages))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return tokenize(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if not all(0 <= t < TOKEN_ID_LIMIT for t in prompt):
            raise ValueError(f"token ids must be in [0, {TOKEN_ID_LIMIT})")
        return np.asarray(prompt, dtype=np.int64)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return tokenize(prompt[0])
    raise ValueError("'prompt' must be a string or a list of token ids")


def root_key(salt: str = "", lora: str | None = None) -> int:
    """The seed of a request's key chain: its salt and LoRA adapter."""
    return xxhash.xxh3_64_intdigest(f"{salt}\0{lora or ''}".encode())


def chain_keys(parent: int, tokens: Sequence[int] | np.ndarray, block_tokens: int) -> list[int]:
    """Keys of the full blocks of `tokens`, chained from `parent`."""
    if isinstance(tokens, list):  # a KV event's token ids: array() reads a list 2x numpy's speed
        view = memoryview(array.array("q", tokens)).cast("B")
    else:
        view = memoryview(np.ascontiguousarray(tokens, dtype=np.int64).data).cast("B")  # (T,)
    step = block_tokens * 8
    keys = []
    for start in range(0, (len(view) // step) * step, step):
        parent = xxhash.xxh3_64_intdigest(view[start : start + step], seed=parent)
        keys.append(parent)
    return keys


def block_keys(
    tokens: Sequence[int] | np.ndarray,
    block_tokens: int = BLOCK_TOKENS,
    salt: str = "",
    lora: str | None = None,
) -> list[int]:
    """Keys of a prompt's full blocks under a salt and adapter."""
    return chain_keys(root_key(salt, lora), tokens, block_tokens)
