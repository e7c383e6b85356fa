"""Workloads of `kvtier bench gateway`, as text sessions, and their oracle reuse.

The gateway routes on text (4 UTF-8 bytes a token, `kvtier.gateway.tokens`), so prompts here
are ASCII text built from numbered blocks: block `n` of workload `seed` is `tokens x 4`
deterministic letters, so two requests built from the same blocks in the same order share a
token prefix, and blocks never share content by accident.

A workload is a list of sessions. A session starts at `start_s` (divided by the load factor
when run) and sends its turns one after the other: turn k's messages are the system prompt,
every earlier user turn with the answer the worker gave, then user turn k, sent `think_s`
after the previous answer completed. Workloads:

- `chat` (W1, production-stack multi-round QA): users x rounds over one shared system
  prompt, each user opening with a long private history; users start as a Poisson process.
- `trace` (W2, the agent/tool trace): each Mooncake-format record is a one-turn session at its
  timestamp; hash id h expands to block h (512 tokens, 2048 characters), so equal hash-id
  prefixes are equal token prefixes.
- `noreuse`: one-turn sessions of unique text, Poisson arrivals: nothing to reuse.

Oracle reuse of a request: its longest full-block prefix (at the workers' block size) shared
with any request sent before it in the same run; the block keys chain, so that is the count
of its leading keys already seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kvtier.bench.trace import BLOCK_TOKENS as TRACE_BLOCK_TOKENS
from kvtier.bench.trace import TraceRecord
from kvtier.gateway.tokens import TOKEN_BYTES, block_keys, prompt_tokens

_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      ", dtype=np.uint8)
Messages = list[dict[str, str]]


def text_block(seed: int, number: int, tokens: int) -> str:
    """`tokens` deterministic tokens of ASCII text for block `number` of workload `seed`."""
    rng = np.random.default_rng([seed, number, 0x6777])
    return _LETTERS[rng.integers(0, len(_LETTERS), tokens * TOKEN_BYTES)].tobytes().decode()


@dataclass(frozen=True, slots=True)
class Turn:
    user_text: str
    max_tokens: int
    think_s: float  # pause after the previous answer (0 for a first turn)


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    start_s: float
    system_text: str | None
    turns: tuple[Turn, ...]


class Workload(NamedTuple):
    name: str
    sessions: list[Session]
    context_tokens: int  # distinct prompt tokens the whole workload touches (live context)
    requests: int


@dataclass(frozen=True, slots=True)
class ChatSpec:
    """W1: users x rounds, a shared system prompt, a long private history per user."""

    users: int = 32
    rounds: int = 5
    system_tokens: int = 1024
    history_tokens: int = 2048
    question_tokens: tuple[int, int] = (48, 160)
    answer_tokens: int = 16
    think_s: float = 1.0  # mean pause between an answer and the next turn
    users_per_s: float = 2.0  # session start rate at load 1
    seed: int = 0


def chat(spec: ChatSpec) -> Workload:
    rng = np.random.default_rng([spec.seed, 1])
    system = text_block(spec.seed, 0, spec.system_tokens)
    sessions, number, at, context = [], 1, 0.0, spec.system_tokens
    for user in range(spec.users):
        at += float(rng.exponential(1.0 / spec.users_per_s))
        turns = []
        for r in range(spec.rounds):
            length = int(rng.integers(spec.question_tokens[0], spec.question_tokens[1] + 1))
            length += spec.history_tokens if r == 0 else 0
            think = float(rng.exponential(spec.think_s)) if r else 0.0
            turns.append(Turn(text_block(spec.seed, number, length), spec.answer_tokens, think))
            number += 1
            context += length + spec.answer_tokens
        sessions.append(Session(f"u{user}", at, system, tuple(turns)))
    return Workload("chat", sessions, context, spec.users * spec.rounds)


def trace(records: Sequence[TraceRecord], max_tokens: int, seed: int = 0) -> Workload:
    """W2: one one-turn session per record, at its timestamp (the first at 0 s)."""
    blocks: dict[int, str] = {}
    sessions = []
    first = records[0].timestamp_ms if records else 0.0
    for i, rec in enumerate(records):
        for h in rec.hash_ids:
            if h not in blocks:
                blocks[h] = text_block(seed, 1 << 40 | h, TRACE_BLOCK_TOKENS)
        text = "".join(blocks[h] for h in rec.hash_ids)[: rec.input_length * TOKEN_BYTES]
        turn = Turn(text, max(1, min(rec.output_length, max_tokens)), 0.0)
        sessions.append(Session(f"t{i}", (rec.timestamp_ms - first) / 1000.0, None, (turn,)))
    return Workload("trace", sessions, len(blocks) * TRACE_BLOCK_TOKENS, len(records))


def noreuse(
    requests: int, prompt_tokens_: int, per_s: float, max_tokens: int, seed: int
) -> Workload:
    """Unique prompts, Poisson arrivals at `per_s` (load 1)."""
    rng = np.random.default_rng([seed, 2])
    starts = np.cumsum(rng.exponential(1.0 / per_s, requests))
    turns = [Turn(text_block(seed, 1 << 50 | i, prompt_tokens_), max_tokens, 0.0)
             for i in range(requests)]  # fmt: skip
    sessions = [Session(f"n{i}", float(at), None, (turns[i],)) for i, at in enumerate(starts)]
    return Workload("noreuse", sessions, requests * prompt_tokens_, requests)


def messages(session: Session, turn: int, answers: Sequence[str]) -> Messages:
    """The chat messages of `session`'s turn `turn`, given the answers to earlier turns."""
    out: Messages = []
    if session.system_text is not None:
        out.append({"role": "system", "content": session.system_text})
    for t, answer in zip(session.turns[:turn], answers, strict=True):
        out.append({"role": "user", "content": t.user_text})
        out.append({"role": "assistant", "content": answer})
    out.append({"role": "user", "content": session.turns[turn].user_text})
    return out


def oracle_tokens(prompts: Iterable[Mapping[str, Any]], block_tokens: int) -> list[int]:
    """Per request body, in send order, the tokens of its longest full-block prefix shared
    with an earlier one."""
    seen: set[int] = set()
    out = []
    for body in prompts:
        keys = block_keys(prompt_tokens(body), block_tokens)
        reused = 0
        while reused < len(keys) and keys[reused] in seen:
            reused += 1
        out.append(reused * block_tokens)
        seen.update(keys)
    return out
