"""`kvtier worker-sim` as a real process, driven by the official openai client and raw httpx:
prefix reuse by tier, salts, KV events the gateway can rehash, SSE shape, TTFT ordering,
cancellation on disconnect, errors and metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from tests.gateway.procs import SimProcess

from kvtier.gateway.events import MEDIUM_CPU, MEDIUM_GPU, BlockRemoved, BlockStored, Event
from kvtier.gateway.events import subscribe as subscribe_events
from kvtier.gateway.sim import start_sims
from kvtier.gateway.simengine import SimConfig
from kvtier.gateway.tokens import block_keys, chain_keys, prompt_tokens, root_key

BT = 16
TIMEOUT_S = 10.0
_unique = itertools.count()


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def full_block_tokens(body: dict[str, Any]) -> int:
    return len(prompt_tokens(body)) // BT * BT


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT_S)


def chat(url: str, text: str, salt: str | None = None, max_tokens: int = 2) -> dict[str, Any]:
    """The usage of one non-streamed chat request, as a dict (extensions included)."""
    extra = None if salt is None else {"cache_salt": salt}
    reply = client(url).chat.completions.create(
        model="sim", messages=messages(text), max_tokens=max_tokens, extra_body=extra
    )  # type: ignore[call-overload]
    assert reply.usage is not None
    usage: dict[str, Any] = reply.usage.model_dump()
    return usage


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf'^{re.escape(name)}{{model_name="sim"{labels}}} (\S+)$', text, re.M)
    assert match is not None, f"{name} missing from /metrics"
    return float(match.group(1))


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=TIMEOUT_S).text


def wait_idle(url: str, deadline_s: float = 5.0) -> str:
    """/metrics once no request is running or waiting (fails after `deadline_s`)."""
    end = time.monotonic() + deadline_s
    while True:
        text = metrics(url)
        busy = metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")
        if busy == 0:
            return text
        assert time.monotonic() < end, "requests still running: the disconnect did not cancel"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    args = ("--kv-events-port", "0", "--prefill-ms-per-token", "0.02", "--decode-ms-per-token", "2")
    with SimProcess(*args) as proc:
        yield proc


@pytest.fixture(scope="module")
def slow() -> Iterator[SimProcess]:
    with SimProcess("--prefill-ms-per-token", "0.5", "--decode-ms-per-token", "1") as proc:
        yield proc


def test_second_identical_request_reports_its_full_blocks_cached(sim: SimProcess) -> None:
    """A repeated prompt reports every full block as cached, all of it on GPU."""
    text = f"question {next(_unique)}: " + "tell me about prefix caching. " * 5
    first = chat(sim.url, text)
    second = chat(sim.url, text)
    blocks = full_block_tokens({"messages": messages(text)})
    assert first["prompt_tokens"] == len(prompt_tokens({"messages": messages(text)}))
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == blocks > 0
    assert second["kvtier_cached_tokens"] == {"gpu": blocks, "dram": 0, "shared": 0}
    assert (
        second["total_tokens"]
        == second["prompt_tokens"] + second["completion_tokens"]
        == (second["prompt_tokens"] + 2)
    )


def test_cache_salt_isolates_tenants(sim: SimProcess) -> None:
    """The same prompt under another cache_salt reuses nothing; under its own salt it does."""
    text = f"salted {next(_unique)} " * 12
    chat(sim.url, text, salt="a")
    assert chat(sim.url, text, salt="b")["prompt_tokens_details"]["cached_tokens"] == 0
    assert chat(sim.url, text)["prompt_tokens_details"]["cached_tokens"] == 0
    assert chat(sim.url, text, salt="b")["prompt_tokens_details"]["cached_tokens"] > 0


async def _events_of(endpoint: str, url: str, bodies: list[dict[str, Any]]) -> list[Event]:
    """The events published while `bodies` are sent in order (after a probe shows the
    subscription is live), collected until half a second passes without one."""
    queue: asyncio.Queue[Event] = asyncio.Queue()

    async def pump() -> None:
        async for event in subscribe_events(endpoint):
            queue.put_nowait(event)

    task = asyncio.create_task(pump())
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as http:
        try:
            for _ in range(50):  # ZeroMQ drops what is published before a subscriber joins
                probe = {"model": "sim", "prompt": f"probe {next(_unique)} " * 8, "max_tokens": 1}
                await http.post("/v1/completions", json=probe)
                try:
                    await asyncio.wait_for(queue.get(), 0.2)
                    break
                except asyncio.TimeoutError:
                    continue
            await asyncio.sleep(0.1)
            while not queue.empty():
                queue.get_nowait()
            for body in bodies:
                assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            events = []
            while True:
                try:
                    events.append(await asyncio.wait_for(queue.get(), 0.5))
                except asyncio.TimeoutError:
                    return events
        finally:
            task.cancel()


def body_of(text: str, salt: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sim", "messages": messages(text), "max_tokens": 1}
    if salt is not None:
        body["cache_salt"] = salt
    return body


def test_events_rehash_to_the_gateways_keys(sim: SimProcess) -> None:
    """BlockStored token ids, rehashed from root_key(salt), equal the request's block keys."""
    assert sim.events[0] is not None
    body = body_of(f"rehash me {next(_unique)} " * 10, salt="tenant-7")
    events = asyncio.run(_events_of(sim.events[0], sim.url, [body]))
    stored = [e for e in events if isinstance(e, BlockStored) and e.medium == MEDIUM_GPU]
    assert len(stored) == 1
    (event,) = stored
    keys = block_keys(prompt_tokens(body), BT, "tenant-7")
    assert event.parent_block_hash is None and event.block_hashes == keys
    assert chain_keys(root_key("tenant-7"), event.token_ids, event.block_size) == keys
    assert event.extra_keys is not None and event.extra_keys[0] == ("tenant-7",)


def test_gpu_eviction_publishes_block_removed_and_dram_serves_those_blocks() -> None:
    """A full GPU cache evicts LRU blocks (GPU BlockRemoved); the DRAM tier, written
    through (CPU BlockStored), then serves them, reported as dram hits."""
    args = ("--cache-tokens", "64", "--kvtier-tokens", "4096", "--kv-events-port", "0")
    with SimProcess(*args) as proc:
        assert proc.events[0] is not None
        a, b = body_of("a" * 180), body_of("b" * 180)  # 3 blocks each; GPU holds 4
        events = asyncio.run(_events_of(proc.events[0], proc.url, [a, b]))
        a_keys = block_keys(prompt_tokens(a), BT)
        removed = [e for e in events if isinstance(e, BlockRemoved) and e.medium == MEDIUM_GPU]
        gone = {k for e in removed for k in e.block_hashes}
        assert set(a_keys[:2]) <= gone and a_keys[2] not in gone  # b's 3 blocks need 2
        cpu = [e for e in events if isinstance(e, BlockStored) and e.medium == MEDIUM_CPU]
        assert set(a_keys) <= {k for e in cpu for k in e.block_hashes}
        usage = chat(proc.url, "a" * 180)
        blocks = full_block_tokens(a)
        assert usage["kvtier_cached_tokens"] == {"gpu": 0, "dram": blocks, "shared": 0}
        text = metrics(proc.url)
        assert metric(text, "kvtier_vllm_hit_tokens_total", ',tier="dram"') == blocks
        assert metric(text, "kvtier_vllm_load_seconds_total", ',tier="dram"') > 0


def test_shared_tier_serves_both_workers_of_one_process() -> None:
    """With --count 2 and --shared-tokens, a prompt one worker saw is a shared hit on the other."""
    with SimProcess("--shared-tokens", "4096", count=2) as proc:
        assert len(set(proc.urls)) == 2
        text = "shared across workers " * 8
        chat(proc.urls[0], text)
        usage = chat(proc.urls[1], text)
        blocks = full_block_tokens({"messages": messages(text)})
        assert usage["kvtier_cached_tokens"] == {"gpu": 0, "dram": 0, "shared": blocks}
        assert usage["prompt_tokens_details"]["cached_tokens"] == blocks
        assert proc.stop() == 0


def sse_events(url: str, path: str, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", url + path, json=body, timeout=TIMEOUT_S) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = reply.read().decode()
    assert raw.endswith("\n\n")
    return [part.removeprefix("data: ") for part in raw.split("\n\n")[:-1]]


def test_chat_stream_shape(sim: SimProcess) -> None:
    """Chat SSE: a role delta, one content delta per token, the last with finish_reason
    "length", a usage chunk without choices, then [DONE]."""
    body = body_of(f"stream {next(_unique)} " * 6)
    body.update(max_tokens=5, stream=True, stream_options={"include_usage": True})
    parts = sse_events(sim.url, "/v1/chat/completions", body)
    assert parts[-1] == "[DONE]"
    chunks = [json.loads(p) for p in parts[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(contents) == 5 and all(len(t) == 4 and t.isascii() for t in contents)
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:-1]] == [None] * 4 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_completion_stream_and_whole_reply_agree(sim: SimProcess) -> None:
    """Completions stream text chunks (text_completion) whose text equals the whole reply's."""
    prompt = f"complete {next(_unique)} " * 6
    body: dict[str, Any] = {"model": "sim", "prompt": prompt, "max_tokens": 4, "stream": True}
    parts = sse_events(sim.url, "/v1/completions", body)
    chunks = [json.loads(p) for p in parts[:-1]]
    assert parts[-1] == "[DONE]" and len(chunks) == 4
    assert all(c["object"] == "text_completion" for c in chunks)
    whole = client(sim.url).completions.create(model="sim", prompt=prompt, max_tokens=4)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == "".join(c["choices"][0]["text"] for c in chunks)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 4


def test_openai_client_streams_with_usage(sim: SimProcess) -> None:
    """The openai client reads the stream: tokens as content, usage with cached tokens."""
    text = f"client stream {next(_unique)} " * 6
    chat(sim.url, text)
    stream = client(sim.url).chat.completions.create(
        model="sim",
        messages=messages(text),  # type: ignore[arg-type]
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(content) == 12
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == full_block_tokens(
        {"messages": messages(text)}
    )


def ttft_s(url: str, text: str) -> float:
    """Seconds from sending a streamed chat request to its first content token."""
    body = body_of(text)
    body.update(stream=True, max_tokens=2)
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - start
    raise AssertionError("no content token")


def test_ttft_grows_with_uncached_tokens(slow: SimProcess) -> None:
    """A long uncached prompt's TTFT exceeds a short one's and its cached repeat's."""
    long_text = f"long {next(_unique)} " * 200  # ~600 tokens at 0.5 ms each
    short = ttft_s(slow.url, f"short {next(_unique)}")
    long_uncached = ttft_s(slow.url, long_text)
    long_cached = ttft_s(slow.url, long_text)
    assert short < long_uncached and long_cached < long_uncached


def test_disconnect_mid_stream_cancels_the_rest(sim: SimProcess) -> None:
    """Closing a stream early stops its decode: it leaves the running set, tokens stop."""
    before = metric(metrics(sim.url), "vllm:generation_tokens_total")
    body = body_of(f"long answer {next(_unique)} " * 4)
    body.update(stream=True, max_tokens=5000)  # 10 s of decode at 2 ms a token
    with httpx.stream("POST", sim.url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S) as r:
        lines = r.iter_lines()
        assert sum(1 for line in itertools.islice(lines, 8) if line.startswith("data:")) >= 3
    generated = metric(wait_idle(sim.url), "vllm:generation_tokens_total") - before
    assert 0 < generated < 5000


def test_disconnect_while_prefilling_drops_the_request(slow: SimProcess) -> None:
    """A whole-reply client that gives up during prefill frees the lane; nothing is admitted."""
    before = metric(metrics(slow.url), "vllm:prompt_tokens_total")
    body = {"model": "sim", "prompt": "x" * 80_000, "max_tokens": 1}  # 20k tokens: 10 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", json=body, timeout=0.5)
    assert metric(wait_idle(slow.url), "vllm:prompt_tokens_total") == before


def test_unknown_model_and_malformed_json_get_openai_errors(sim: SimProcess) -> None:
    """An unknown model is a 404 and a malformed body a 400, both OpenAI-shaped."""
    with pytest.raises(openai.NotFoundError) as caught:
        client(sim.url).chat.completions.create(model="nope", messages=messages("hi"))
    assert caught.value.status_code == 404
    reply = httpx.post(sim.url + "/v1/chat/completions", content=b"{not json", timeout=TIMEOUT_S)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    missing = httpx.post(sim.url + "/v1/completions", json={"model": "sim"}, timeout=TIMEOUT_S)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


def test_models_and_health(sim: SimProcess) -> None:
    """/v1/models lists the served model; /health answers 200."""
    assert [m.id for m in client(sim.url).models.list()] == ["sim"]
    assert httpx.get(sim.url + "/health", timeout=TIMEOUT_S).status_code == 200


def test_metrics_carry_vllm_and_kvtier_names(sim: SimProcess) -> None:
    """/metrics has every scraped name with model_name, and consistent values."""
    text = f"metrics {next(_unique)} " * 8
    chat(sim.url, text)
    chat(sim.url, text)
    page = wait_idle(sim.url)
    prompt = metric(page, "vllm:prompt_tokens_total")
    assert 0 < metric(page, "vllm:prompt_tokens_cached_total") <= prompt
    assert metric(page, "vllm:generation_tokens_total") >= 4
    assert metric(page, "vllm:request_prefill_time_seconds_count") >= 2
    assert metric(page, "vllm:request_prefill_time_seconds_sum") > 0
    for tier in ("dram", "shared"):
        assert metric(page, "kvtier_vllm_hit_tokens_total", f',tier="{tier}"') == 0
        assert metric(page, "kvtier_vllm_load_seconds_total", f',tier="{tier}"') == 0
    assert 0 < metric(page, "vllm:kv_cache_usage_perc") <= 1
    assert "# TYPE vllm:prompt_tokens counter" in page


def test_sigterm_stops_cleanly() -> None:
    """SIGTERM stops the process with status 0, even with a stream open."""
    with SimProcess("--decode-ms-per-token", "50") as proc:
        body = body_of("still talking " * 4)
        body.update(stream=True, max_tokens=1000)
        with httpx.stream("POST", proc.url + "/v1/chat/completions", json=body, timeout=5) as r:
            next(r.iter_lines())
            assert proc.stop() == 0


def test_start_sims_runs_workers_in_process() -> None:
    """start_sims serves workers on this loop sharing one tier; stop() closes them."""

    async def scenario() -> dict[str, Any]:
        config = SimConfig(shared_tokens=4096, prefill_ms_per_token=0.01, decode_ms_per_token=1)
        sims = await start_sims(config, count=2, events_port=0)
        try:
            assert all(s.events_endpoint and s.banner.startswith("worker-sim http") for s in sims)
            body = body_of("in process " * 8)
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
                await http.post(sims[0].url + "/v1/chat/completions", json=body)
                reply = await http.post(sims[1].url + "/v1/chat/completions", json=body)
            usage: dict[str, Any] = reply.json()["usage"]
            return usage
        finally:
            for s in sims:
                await s.stop()

    usage = asyncio.run(scenario())
    assert usage["kvtier_cached_tokens"]["shared"] == full_block_tokens(body_of("in process " * 8))
