"""The client side of `kvtier bench gateway`: open-loop sessions over streaming requests,
and a sampler of the gateway's in-flight gauges.

Open loop: each session starts at its own time (`start_s / load`) whatever the servers are
doing; within a session a turn is sent `think_s` after the previous answer completed, since
it contains that answer (a pool of users, the session start rate being the knob). TTFT is
client-side: from sending the request to the first SSE `data:` chunk carrying content.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp

from kvtier.bench.gateway_workload import Messages, Session, Workload, messages

MODEL = "sim"
TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=30)


class Result(NamedTuple):
    """One request as the client saw it (times in seconds from the run's start)."""

    session: str
    turn: int
    sent_s: float
    ttft_s: float  # nan when no content came
    done_s: float
    status: int  # HTTP status; 0 when the connection failed
    prompt_tokens: int
    cached_tokens: int
    cached_by_tier: dict[str, int]
    answer: str
    body: dict[str, Any]


def session_client(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False), timeout=TIMEOUT
    )


async def stream(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], t0: float, session: str, turn: int
) -> Result:
    """POST a streaming chat completion to `url` and time it."""
    sent = time.perf_counter()
    first, status = float("nan"), 0
    texts: list[str] = []
    usage: dict[str, Any] = {}
    try:
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            status = resp.status
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if not texts:
                            first = time.perf_counter() - sent
                        texts.append(text)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        status = status if status >= 500 else 0
    details = usage.get("prompt_tokens_details") or {}
    return Result(
        session, turn, sent - t0, first, time.perf_counter() - t0, status,
        int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens", 0)),
        dict(usage.get("kvtier_cached_tokens") or {}), "".join(texts), body,
    )  # fmt: skip


def chat_body(msgs: Messages, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": msgs,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def run_workload(
    url: str, workload: Workload, load: float, done: Callable[[], None] = lambda: None
) -> list[Result]:
    """Every session of `workload` against `url`, starts compressed by `load`."""
    results: list[Result] = []
    async with session_client() as http:
        t0 = time.perf_counter()

        async def one(s: Session) -> None:
            await asyncio.sleep(max(0.0, t0 + s.start_s / load - time.perf_counter()))
            answers: list[str] = []
            for k, turn in enumerate(s.turns):
                if turn.think_s:
                    await asyncio.sleep(turn.think_s)
                body = chat_body(messages(s, k, answers), turn.max_tokens)
                r = await stream(http, url, body, t0, s.name, k)
                results.append(r)
                done()
                if r.status != 200:
                    return
                answers.append(r.answer)

        await asyncio.gather(*(one(s) for s in workload.sessions))
    return sorted(results, key=lambda r: r.sent_s)


class InflightSample(NamedTuple):
    requests: int
    max_over_mean_tokens: float  # the busiest worker's booked tokens / the mean
    tokens: tuple[float, ...]  # each worker's booked tokens


def parse_gauges(text: str, name: str) -> list[float]:
    """Values of a labelled gauge in a Prometheus text page."""
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{")]  # fmt: skip


async def sample_inflight(url: str, interval_s: float, out: list[InflightSample]) -> None:
    """Append the gateway's in-flight balance every `interval_s` until cancelled."""
    async with session_client() as http:
        while True:
            try:
                async with http.get(f"{url}/metrics") as resp:
                    text = await resp.text()
                tokens = parse_gauges(text, "kvtier_gateway_worker_tokens")
                requests = parse_gauges(text, "kvtier_gateway_worker_requests")
                mean = sum(tokens) / len(tokens) if tokens else 0.0
                if mean > 0:
                    ratio = max(tokens) / mean
                    out.append(InflightSample(int(sum(requests)), ratio, tuple(tokens)))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, IndexError):
                pass
            await asyncio.sleep(interval_s)
