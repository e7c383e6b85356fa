"""How the gateway and the simulated worker see a prompt: text, tokens, and block keys.

The gateway routes without the model's tokenizer. It renders a chat request to one canonical
text and counts 4 UTF-8 bytes as a token (about what BPE tokenizers give for English), so two
requests that share a prefix of messages share a prefix of tokens. `kvtier worker-sim` uses
the same function, so its vLLM-format KV events carry token ids the gateway can rehash.

Block keys chain like vLLM's and kvtier's: each full block's key depends on its tokens and its
parent's key, and the root is seeded with the salt (the tenant's `cache_salt`) and the LoRA
adapter, so two tenants never share a key. Partial tail blocks have no key.

The chain is a polynomial one, so a whole prompt is hashed in a dozen NumPy operations
instead of one xxhash call per block (2,048 blocks: 0.47 ms before, ~0.1 ms now; a short
prompt pays ~10 us more): a block's own hash is `b_i = sum of its tokens * Q^column`; the
chain state is `s_i = s_(i-1) * P + b_i` (mod 2^64, so all of a prompt's states come from one
cumulative sum); its key is `mix(s_i)`, where `mix` (xorshift-multiply-xorshift) is a
bijection, so a parent key gives back its chain state. One changed token, or another parent,
always changes the state (P and Q are odd); other collisions are no likelier than for any
64-bit hash unless crafted. Crafting one is easy within one salt (the difference of two
states does not depend on the root), not across tenants without knowing their salts, and a
crafted one only misroutes: these keys route requests, and the engines' own keys decide what
KV is reused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import xxhash

_U = np.uint64
_C = 0xBF58476D1CE4E5B9  # splitmix64's first multiplier
_P, _Q = 0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93  # odd: invertible mod 2^64
_M64 = (1 << 64) - 1
_C_INVERSE, _P_INVERSE = (pow(c, -1, 1 << 64) for c in (_C, _P))

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


async def byte_prompts(body: Mapping[str, Any]) -> list[np.ndarray]:
    """`request_prompts`, awaitable like a model tokenizer's (which runs in a thread)."""
    return request_prompts(body)


def prompt_tokens(body: Mapping[str, Any]) -> np.ndarray:
    """The prompt of a chat (`messages`) or completion (`prompt`: text or token ids) request
    with one prompt."""
    prompts = request_prompts(body)
    if len(prompts) != 1:
        raise ValueError("'prompt' must be one prompt here, not a batch")
    return prompts[0]


def request_prompts(body: Mapping[str, Any]) -> list[np.ndarray]:
    """Every prompt of a request: a chat's (`messages`), or a completion's `prompt`, which
    OpenAI lets be a string, token ids, or a batch of either."""
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        return [tokenize(render_messages(messages))]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [_one_prompt(p) for p in prompt]
    return [_one_prompt(prompt)]


def _one_prompt(prompt: Any) -> np.ndarray:
    if isinstance(prompt, str):
        return tokenize(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if not all(0 <= t < TOKEN_ID_LIMIT for t in prompt):
            raise ValueError(f"token ids must be in [0, {TOKEN_ID_LIMIT})")
        return np.asarray(prompt, dtype=np.int64)
    raise ValueError(
        "'prompt' must be a string, a list of token ids, or a non-empty list of either"
    )


def root_key(salt: str = "", lora: str | None = None) -> int:
    """The seed of a request's key chain: its salt and LoRA adapter."""
    return xxhash.xxh3_64_intdigest(f"{salt}\0{lora or ''}".encode())


_S32, _S29, _UC = _U(32), _U(29), _U(_C)


def _mix(z: np.ndarray) -> np.ndarray:
    """A bijection of uint64 that spreads every bit of a state over the key's."""
    z = (z ^ (z >> _S32)) * _UC  # (uint64 arrays wrap silently)
    out: np.ndarray = z ^ (z >> _S29)
    return out


def _unmix(key: int) -> int:
    """The chain state whose key is `key` (`_mix` run backwards)."""

    def unshift(z: int, shift: int) -> int:  # inverts z ^= z >> shift
        out = z
        for _ in range(64 // shift):
            out = z ^ (out >> shift)
        return out

    return unshift(unshift(key, 29) * _C_INVERSE & _M64, 32)


class _Powers:
    """P^1..P^n, P^-1..P^-n and Q^0..Q^(B-1), grown on demand."""

    def __init__(self) -> None:
        self.p: np.ndarray = np.zeros(0, _U)
        self.p_inverse: np.ndarray = self.p
        self._columns: dict[int, np.ndarray] = {}

    def chain(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.p) < n:
            size = max(n, 2 * len(self.p), 1024)
            self.p = np.cumprod(np.full(size, _P, _U), dtype=_U)
            self.p_inverse = np.cumprod(np.full(size, _P_INVERSE, _U), dtype=_U)
        return self.p[:n], self.p_inverse[:n]

    def columns(self, block_tokens: int) -> np.ndarray:
        q = self._columns.get(block_tokens)
        if q is None:
            q = np.cumprod(np.concatenate([[_U(1)], np.full(block_tokens - 1, _Q, _U)]), dtype=_U)
            self._columns[block_tokens] = q
        return q


_POWERS = _Powers()


def chain_keys(parent: int, tokens: Sequence[int] | np.ndarray, block_tokens: int) -> list[int]:
    """Keys of the full blocks of `tokens`, chained from `parent`."""
    blocks = len(tokens) // block_tokens
    if blocks == 0:
        return []
    grid = np.asarray(tokens[: blocks * block_tokens], np.int64).view(_U)
    own = grid.reshape(blocks, block_tokens) @ _POWERS.columns(block_tokens)  # (blocks,)
    p, p_inverse = _POWERS.chain(blocks)
    # s_i = P^i s_0 + sum_(j<=i) b_j P^(i-j) = P^i (s_0 + sum_(j<=i) b_j P^-j)
    states = p * (_U(_unmix(int(parent))) + np.cumsum(own * p_inverse, dtype=_U))
    keys: list[int] = _mix(states).tolist()
    return keys


def block_keys(
    tokens: Sequence[int] | np.ndarray,
    block_tokens: int = BLOCK_TOKENS,
    salt: str = "",
    lora: str | None = None,
) -> list[int]:
    """Keys of a prompt's full blocks under a salt and adapter."""
    return chain_keys(root_key(salt, lora), tokens, block_tokens)
