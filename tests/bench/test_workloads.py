"""Workload generators: deterministic from a seed, with the stated shapes."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from kvtier.bench import workloads as wl

CHAT = wl.ChatSpec(users=5, rounds=4, system_tokens=300, think_s=5)
AGENT = wl.AgentSpec(sessions=3, steps=6, subagents=2, subagent_steps=2, pause_every=3)
RAG = wl.RagSpec(documents=10, requests=200)


def _same(a: list[wl.Request], b: list[wl.Request]) -> bool:
    return len(a) == len(b) and all(
        x.arrival_s == y.arrival_s
        and x.session == y.session
        and x.output_tokens == y.output_tokens
        and np.array_equal(x.tokens, y.tokens)
        for x, y in zip(a, b, strict=True)
    )


def _sessions(requests: list[wl.Request]) -> dict[str, list[wl.Request]]:
    out: dict[str, list[wl.Request]] = {}
    for r in requests:
        out.setdefault(r.session, []).append(r)
    return out


def test_generators_are_deterministic() -> None:
    """The same spec gives identical requests; another seed gives other tokens."""
    for make, spec in ((wl.chat, CHAT), (wl.agent, AGENT), (wl.rag, RAG)):
        first = list(make(spec))  # type: ignore[operator]
        assert _same(first, list(make(spec)))  # type: ignore[operator]
        other = list(make(dataclasses.replace(spec, seed=1)))  # type: ignore[operator]
        assert not _same(first, other)


def test_requests_are_in_arrival_order_with_int32_tokens() -> None:
    """Every generator yields requests sorted by arrival, prompts as int32 arrays."""
    for make, spec in ((wl.chat, CHAT), (wl.agent, AGENT), (wl.rag, RAG)):
        requests = list(make(spec))  # type: ignore[operator]
        arrivals = [r.arrival_s for r in requests]
        assert arrivals == sorted(arrivals)
        assert all(r.tokens.dtype == np.int32 and r.tokens.ndim == 1 for r in requests)


def test_chat_rounds_extend_one_shared_system_prompt() -> None:
    """users x rounds requests; each round's prompt extends the previous; one system prompt."""
    requests = list(wl.chat(CHAT))
    assert len(requests) == CHAT.users * CHAT.rounds
    system = requests[0].tokens[: CHAT.system_tokens]
    for turns in _sessions(requests).values():
        assert [r.turn for r in turns] == list(range(CHAT.rounds))
        for prev, cur in itertools.pairwise(turns):
            grown = len(cur.tokens) - len(prev.tokens) - prev.output_tokens
            assert 100 <= grown <= 500
            assert np.array_equal(cur.tokens[: len(prev.tokens)], prev.tokens)
            assert cur.arrival_s >= prev.arrival_s
        assert np.array_equal(turns[0].tokens[: CHAT.system_tokens], system)


def test_agent_steps_grow_by_thought_and_observations() -> None:
    """Main sessions start with 5k-20k context; each step adds a 100-300 token thought and
    one or more 1k-4k observations; sub-agents carry the full context; pauses idle."""
    sessions = _sessions(list(wl.agent(AGENT)))
    mains = {s: r for s, r in sessions.items() if "/" not in s}
    assert len(mains) == AGENT.sessions
    for name, steps in mains.items():
        assert 5000 <= len(steps[0].tokens) <= 20000
        for prev, cur in itertools.pairwise(steps):
            assert np.array_equal(cur.tokens[: len(prev.tokens)], prev.tokens)
            assert 100 <= prev.output_tokens <= 300
        gap = steps[AGENT.pause_every].arrival_s - steps[AGENT.pause_every - 1].arrival_s
        assert gap >= AGENT.idle_s
        subs = [s for s in sessions if s.startswith(name + "/")]
        assert len(subs) == AGENT.subagents
        first_sub = sessions[subs[0]][0].tokens
        parent = steps[AGENT.steps // 2 - 1]
        assert len(first_sub) > len(parent.tokens) + parent.output_tokens + 1000
        assert np.array_equal(first_sub[: len(parent.tokens)], parent.tokens)


def test_rag_documents_follow_zipf_popularity() -> None:
    """A request is system prompt + a 2k-8k document + a question; popular docs recur."""
    requests = list(wl.rag(RAG))
    assert len(requests) == RAG.requests
    prefixes: dict[bytes, int] = {}
    for r in requests:
        assert RAG.system_tokens + 2000 + 20 <= len(r.tokens) <= RAG.system_tokens + 8000 + 120
        key = r.tokens[RAG.system_tokens : RAG.system_tokens + 2000].tobytes()
        prefixes[key] = prefixes.get(key, 0) + 1
    counts = sorted(prefixes.values(), reverse=True)
    assert len(counts) <= RAG.documents
    assert counts[0] > 3 * counts[-1]
