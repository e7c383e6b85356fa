"""Workload generators: multi-turn chat, ReAct agents and RAG, deterministic from a seed.

Every generator yields `Request`s in arrival order. Prompt tokens are built from numbered
segments (a system prompt, a user turn, an observation...); a segment's tokens come from a
NumPy generator seeded by (workload seed, segment number), so the same seed always gives the
same token ids and two segments never share content by accident.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VOCAB = 32_000
Tokens = np.ndarray[Any, np.dtype[np.int32]]


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One inference request: when it arrives, whose it is, its prompt and answer length."""

    arrival_s: float
    session: str
    tokens: Tokens  # (T,) int32 prompt token ids
    output_tokens: int
    turn: int = 0  # round of a chat, step of an agent, 0 for one-shot requests


def segment(seed: int, number: int, length: int) -> Tokens:
    """`length` deterministic token ids for segment `number` of workload `seed`."""
    rng = np.random.default_rng([seed, number])
    return rng.integers(0, VOCAB, length, dtype=np.int32)


class _Segments:
    """Hands out fresh segment numbers so no two segments share tokens."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._next = 0

    def new(self, length: int) -> Tokens:
        self._next += 1
        return segment(self.seed, self._next, length)


def _length(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return int(rng.integers(low, high + 1))


def _sorted(requests: list[Request]) -> Iterator[Request]:
    requests.sort(key=lambda r: (r.arrival_s, r.session, r.turn))
    yield from requests


@dataclass(frozen=True, slots=True)
class ChatSpec:
    """Users x rounds of conversation over one shared system prompt."""

    users: int = 1000  # more sessions than one GPU's KV budget holds: the case kvtier is for
    rounds: int = 6
    system_tokens: int = 2000
    user_tokens: tuple[int, int] = (100, 500)
    answer_tokens: tuple[int, int] = (200, 800)
    think_s: float = 60.0  # mean pause between an answer and the next user turn
    start_window_s: float = 600.0  # users start uniformly within this window
    seed: int = 0


def chat(spec: ChatSpec) -> Iterator[Request]:
    """Round r of a user's prompt: system prompt + every earlier turn and answer + turn r."""
    rng = np.random.default_rng([spec.seed, 1])
    seg = _Segments(spec.seed)
    system = seg.new(spec.system_tokens)
    out: list[Request] = []
    for user in range(spec.users):
        history = [system]
        at = float(rng.uniform(0, spec.start_window_s))
        for turn in range(spec.rounds):
            history.append(seg.new(_length(rng, spec.user_tokens)))
            answer = _length(rng, spec.answer_tokens)
            out.append(Request(at, f"u{user}", np.concatenate(history), answer, turn))
            history.append(seg.new(answer))
            at += float(rng.exponential(spec.think_s))
    return _sorted(out)


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """ReAct sessions: a long tool/role context, thought+observation steps, sub-agents,
    parallel tool calls and pauses."""

    sessions: int = 64
    steps: int = 12
    roles: int = 3
    context_tokens: tuple[int, int] = (5000, 20000)
    thought_tokens: tuple[int, int] = (100, 300)
    observation_tokens: tuple[int, int] = (1000, 4000)
    step_s: float = 4.0  # tool latency between a step's answer and the next step
    parallel_every: int = 3  # every n-th step issues `parallel_calls` tool calls at once
    parallel_calls: int = 3
    subagents: int = 2  # spawned once per session, each carrying the full context
    subagent_steps: int = 2
    pause_every: int = 5  # after every n steps the session idles ...
    idle_s: float = 600.0  # ... this long, then resumes
    start_window_s: float = 300.0
    seed: int = 0


@dataclass(slots=True)
class _Agent:
    """A running session: its prompt so far and the clock of its next step."""

    session: str
    history: list[Tokens]
    at: float
    turn: int = 0
    out: list[Request] = field(default_factory=list)


def agent(spec: AgentSpec) -> Iterator[Request]:
    """Each step's prompt is the whole context so far; its answer is a thought/action, and
    one or more observations are appended before the next step."""
    rng = np.random.default_rng([spec.seed, 2])
    seg = _Segments(spec.seed)
    tools = seg.new(spec.context_tokens[0] * 3 // 5)  # tool schemas + MCP definitions, shared
    roles = [seg.new(spec.context_tokens[0] // 5) for _ in range(spec.roles)]
    out: list[Request] = []
    for s in range(spec.sessions):
        role = roles[int(rng.integers(spec.roles))]
        fixed = len(tools) + len(role)
        task = seg.new(max(1, _length(rng, spec.context_tokens) - fixed))
        main = _Agent(f"a{s}", [tools, role, task], float(rng.uniform(0, spec.start_window_s)))
        for step in range(spec.steps):
            calls = spec.parallel_calls if (step + 1) % spec.parallel_every == 0 else 1
            _step(main, spec, rng, seg, calls)
            if step == spec.steps // 2 - 1 and spec.subagents:
                _spawn_subagents(main, spec, rng, seg)
            if (step + 1) % spec.pause_every == 0:
                main.at += spec.idle_s
        out += main.out
    return _sorted(out)


def _step(a: _Agent, spec: AgentSpec, rng: np.random.Generator, seg: _Segments, calls: int) -> None:
    thought = _length(rng, spec.thought_tokens)
    a.out.append(Request(a.at, a.session, np.concatenate(a.history), thought, a.turn))
    a.history.append(seg.new(thought))
    a.history += [seg.new(_length(rng, spec.observation_tokens)) for _ in range(calls)]
    a.at += spec.step_s * (1.0 + float(rng.exponential(0.5)))
    a.turn += 1


def _spawn_subagents(
    main: _Agent, spec: AgentSpec, rng: np.random.Generator, seg: _Segments
) -> None:
    """Sub-agents start together from the main context; the main agent resumes with their
    reports once the slowest has finished."""
    done = main.at
    for j in range(spec.subagents):
        sub = _Agent(f"{main.session}/sub{j}", [*main.history, seg.new(200)], main.at, main.turn)
        for _ in range(spec.subagent_steps):
            _step(sub, spec, rng, seg, 1)
        main.out += sub.out
        done = max(done, sub.at)
    main.history.append(seg.new(300 * spec.subagents))
    main.at = done


@dataclass(frozen=True, slots=True)
class RagSpec:
    """Questions about documents drawn with Zipf popularity."""

    documents: int = 400
    requests: int = 1500
    system_tokens: int = 500
    document_tokens: tuple[int, int] = (2000, 8000)
    question_tokens: tuple[int, int] = (20, 120)
    answer_tokens: tuple[int, int] = (100, 400)
    zipf_a: float = 1.1
    rate_per_s: float = 2.0
    seed: int = 0


def rag(spec: RagSpec) -> Iterator[Request]:
    """Prompt: system prompt + one document + a fresh question; Poisson arrivals."""
    rng = np.random.default_rng([spec.seed, 3])
    seg = _Segments(spec.seed)
    system = seg.new(spec.system_tokens)
    docs = [seg.new(_length(rng, spec.document_tokens)) for _ in range(spec.documents)]
    weights = 1.0 / np.arange(1, spec.documents + 1, dtype=np.float64) ** spec.zipf_a
    picks = rng.choice(spec.documents, size=spec.requests, p=weights / weights.sum())
    at = 0.0
    out: list[Request] = []
    for i, doc in enumerate(picks):
        at += float(rng.exponential(1.0 / spec.rate_per_s))
        question = seg.new(_length(rng, spec.question_tokens))
        prompt = np.concatenate([system, docs[int(doc)], question])
        out.append(Request(at, f"q{i}", prompt, _length(rng, spec.answer_tokens)))
    return _sorted(out)
