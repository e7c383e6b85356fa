"""The gateway as users meet it: a real uvicorn process in front of real worker-sim
processes, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from tests.gateway.procs import GatewayProcess, SimProcess

TIMEOUT_S = 20.0
MESSAGES = [{"role": "user", "content": "x"}]
LONG = "the quick brown fox jumps over the lazy dog " * 40  # ~450 tokens


def client(gw: GatewayProcess, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


def chat(c: openai.OpenAI, text: str, **extra: object) -> openai.types.chat.ChatCompletion:
    messages = [{"role": "user", "content": text}]
    return c.chat.completions.create(model="sim", messages=messages, max_tokens=4, **extra)  # type: ignore[arg-type, call-overload]


def cached(completion: openai.types.chat.ChatCompletion) -> int:
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    tokens = completion.usage.prompt_tokens_details.cached_tokens
    assert isinstance(tokens, int)
    return tokens


@pytest.fixture(scope="module")
def sims() -> Iterator[SimProcess]:
    args = ("--kv-events-port", "0", "--prefill-ms-per-token", "0.02", "--decode-ms-per-token", "1")
    with SimProcess(*args, count=2) as proc:
        yield proc


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "keys"
    path.write_text("alice key-alice-123\nbob key-bob-4567\n")
    return path


@pytest.fixture(scope="module")
def gateway(sims: SimProcess, auth_file: Path) -> Iterator[GatewayProcess]:
    events = ",".join(e or "" for e in sims.events)
    args = ("--kv-events", events, "--auth-file", str(auth_file), "--max-body", "65536")
    with GatewayProcess(sims.urls, *args) as gw:
        yield gw


def test_chat_completion_reuses_through_the_gateway(gateway: GatewayProcess) -> None:
    """The second identical prompt goes where its KV is and reports it cached."""
    c = client(gateway, "key-alice-123")
    first = chat(c, LONG + "one")
    second = chat(c, LONG + "one")
    assert cached(first) == 0
    assert cached(second) >= (first.usage.prompt_tokens // 16 - 1) * 16  # type: ignore[union-attr]
    assert second.choices[0].message.content == first.choices[0].message.content


def test_stream_relays_every_chunk_then_usage_then_done(gateway: GatewayProcess) -> None:
    """SSE through the gateway: role, one delta per token, usage with cached_tokens, [DONE]."""
    body = {
        "model": "sim", "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": LONG + "stream"}],
    }  # fmt: skip
    headers = {"Authorization": "Bearer key-alice-123"}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT_S
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([d for d in deltas if d]) == 5
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 5
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)


def test_without_include_usage_the_usage_chunk_is_not_sent(gateway: GatewayProcess) -> None:
    """The gateway asks the worker for usage for itself; a client that did not gets none."""
    c = client(gateway, "key-alice-123")
    stream = c.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert all(ch.usage is None for ch in chunks) and all(ch.choices for ch in chunks)


def test_legacy_completions_whole_and_streamed(gateway: GatewayProcess) -> None:
    """/v1/completions through the gateway: text, usage with cached_tokens, a stream; a
    batch of prompts is the worker's to take or refuse (the sim serves one prompt)."""
    c = client(gateway, "key-alice-123")
    whole = c.completions.create(model="sim", prompt=LONG + "legacy", max_tokens=3)
    assert whole.choices[0].text and whole.usage is not None
    again = c.completions.create(model="sim", prompt=LONG + "legacy", max_tokens=3)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # type: ignore[union-attr]
    chunks = list(
        c.completions.create(
            model="sim", prompt=LONG + "legacy", max_tokens=3, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError, match="not a batch"):
        c.completions.create(model="sim", prompt=["one", "two"], max_tokens=3)


def test_tenants_never_share_kv(gateway: GatewayProcess) -> None:
    """Bob's copy of Alice's prompt computes from scratch; a client's cache_salt is ignored."""
    alice, bob = client(gateway, "key-alice-123"), client(gateway, "key-bob-4567")
    prompt = LONG + "secret"
    chat(alice, prompt)
    assert cached(chat(alice, prompt)) > 0
    assert cached(chat(bob, prompt, extra_body={"cache_salt": "anything"})) == 0
    assert cached(chat(bob, prompt)) > 0


@pytest.mark.parametrize("key", [None, "wrong-key-0000"])
def test_a_missing_or_wrong_key_gets_401(gateway: GatewayProcess, key: str | None) -> None:
    """401 with OpenAI's error object on every route, before anything is routed."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    bodies = {
        "/v1/chat/completions": {"model": "sim", "messages": [{"role": "user", "content": "x"}]},
        "/v1/completions": {"model": "sim", "prompt": "x"},
        "/v1/responses": {"model": "sim", "input": "x"},
        "/v1/models": None,
    }
    for path, body in bodies.items():
        url = gateway.url + path
        if body is None:
            resp = httpx.get(url, headers=headers)
        else:
            resp = httpx.post(url, json=body, headers=headers)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["code"] == "invalid_api_key", path
    c = client(gateway, key or "none")
    with pytest.raises(openai.AuthenticationError):
        chat(c, "x")
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (
            json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "model",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), 400, "model"),
        (json.dumps({"model": "sim", "messages": "not a list"}), 400, "messages"),
        (json.dumps({"model": "sim", "prompt": "x" * 70000}), 413, None),
        (json.dumps({"model": "sim", "messages": ["hi"]}), 400, "messages"),
        (json.dumps({"model": "sim", "prompt": [2**70]}), 400, "prompt"),
        (
            json.dumps({"model": "sim", "prompt": "x", "stream": True, "stream_options": "x"}),
            400,
            "stream_options",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(
    gateway: GatewayProcess, body: bytes | str, status: int, param: str | None
) -> None:
    """Malformed JSON, a non-object, an unknown model, no model, bad messages, too big."""
    headers = {"Authorization": "Bearer key-alice-123", "Content-Type": "application/json"}
    resp = httpx.post(gateway.url + "/v1/chat/completions", content=body, headers=headers)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_models_health_and_metrics(gateway: GatewayProcess) -> None:
    """/v1/models lists the workers' models; /healthz and /metrics answer."""
    chat(client(gateway, "key-alice-123"), "count me")
    models = client(gateway, "key-alice-123").models.list()
    assert [m.id for m in models.data] == ["sim"]
    health = httpx.get(gateway.url + "/healthz").json()
    assert health == {"workers": 2, "healthy": 2}
    text = httpx.get(gateway.url + "/metrics").text
    assert 'kvtier_gateway_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "kvtier_gateway_route_seconds_bucket" in text and "kvtier_gateway_index_blocks" in text
    assert "kvtier_gateway_kv_events_total" in text


def test_many_concurrent_streams_all_complete(gateway: GatewayProcess) -> None:
    """200 streams at once: every one ends in [DONE], no 5xx."""

    async def one(http: httpx.AsyncClient, i: int) -> bool:
        body = {
            "model": "sim", "max_tokens": 3, "stream": True,
            "messages": [{"role": "user", "content": f"{i} " + LONG}],
        }  # fmt: skip
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        return resp.status_code == 200 and lines[-1] == "data: [DONE]"

    async def main() -> list[bool]:
        limits = httpx.Limits(max_connections=300)
        headers = {"Authorization": "Bearer key-bob-4567"}
        async with httpx.AsyncClient(
            base_url=gateway.url, headers=headers, limits=limits, timeout=60
        ) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    assert all(asyncio.run(main()))


def test_workers_run_with_an_api_key_are_called_with_it() -> None:
    """--worker-api-key goes to the workers (vLLM's --api-key), not to the clients."""
    with (
        SimProcess("--api-key", "worker-key") as sim,
        GatewayProcess(sim.urls, "--worker-api-key", "worker-key") as gw,
    ):
        c = client(gw)
        assert [m.id for m in c.models.list().data] == ["sim"]
        assert chat(c, "hello").choices[0].message.content
        stream = c.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
        )
        assert len([ch for ch in stream if ch.choices]) >= 3
        assert httpx.get(sim.url + "/v1/models").status_code == 401  # the key is needed
        with GatewayProcess(sim.urls) as keyless:
            resp = httpx.post(keyless.url + "/v1/chat/completions", json=CHAT_BODY)
            assert resp.status_code == 503
            assert "--worker-api-key" in resp.json()["error"]["message"]


CHAT_BODY = {"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


def test_a_dead_worker_is_tried_once_per_request() -> None:
    """When the only worker serving a model is gone, one attempt, then 503, not one per
    worker in the pool."""
    with (
        SimProcess("--model", "ma") as a,
        SimProcess("--model", "mb") as b,
        GatewayProcess([a.url, b.url], "--policy", "round-robin") as gw,
    ):
        assert sorted(m.id for m in client(gw).models.list().data) == ["ma", "mb"]
        a.kill()
        body = {**CHAT_BODY, "model": "ma"}
        assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 503
        metrics = httpx.get(gw.url + "/metrics").text
    name = "kvtier_gateway_upstream_errors_total"
    errors = [ln for ln in metrics.splitlines() if ln.startswith(name)]
    assert len(errors) == 1 and errors[0].endswith(" 1.0"), errors


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error() -> None:
    """The client gets an error event and the stream ends: never a hang."""
    with SimProcess("--decode-ms-per-token", "100") as sim, GatewayProcess(sim.urls) as gw:
        stream = client(gw).chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], max_tokens=200, stream=True
        )
        got = []
        started = time.monotonic()
        with pytest.raises(openai.APIError, match=r"mid-stream|without"):
            for chunk in stream:
                got.append(chunk)
                if len(got) == 3:
                    sim.kill()
        assert len(got) >= 3 and time.monotonic() - started < TIMEOUT_S


@pytest.mark.parametrize("after", [1, 3])
def test_a_worker_that_hangs_mid_stream_ends_the_stream_with_an_error(after: int) -> None:
    """A stopped worker closes no socket: the stream errors after --stall-timeout, also when
    it stops right after its first event."""
    with (
        SimProcess("--decode-ms-per-token", "100") as sim,
        GatewayProcess(sim.urls, "--stall-timeout", "1") as gw,
    ):
        stream = client(gw).chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], max_tokens=200, stream=True
        )
        got = []
        try:
            with pytest.raises(openai.APIError, match=r"mid-stream"):
                for chunk in stream:
                    got.append(chunk)
                    if len(got) == after:
                        sim.proc.send_signal(signal.SIGSTOP)
                        stopped = time.monotonic()
            assert 0.9 < time.monotonic() - stopped < 5
        finally:
            sim.proc.send_signal(signal.SIGCONT)


def test_a_client_that_disconnects_cancels_the_upstream_request() -> None:
    """Closing the stream makes the worker stop generating within a second or two."""
    with SimProcess("--decode-ms-per-token", "50") as sim, GatewayProcess(sim.urls) as gw:
        stream = client(gw).chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x"}], max_tokens=400, stream=True
        )
        next(iter(stream))
        assert _running(sim.url) == 1
        stream.close()
        deadline = time.monotonic() + 5
        while _running(sim.url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running(sim.url) == 0


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it_too() -> None:
    """A non-streamed request whose client times out is aborted at the worker as well."""
    with SimProcess("--decode-ms-per-token", "50") as sim, GatewayProcess(sim.urls) as gw:
        body = {"model": "sim", "messages": MESSAGES, "max_tokens": 400}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 5
        while _running(sim.url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running(sim.url) == 0


def _running(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_requests_running gauge")


def test_an_unreachable_worker_is_skipped_and_all_down_is_503(unused_port: int) -> None:
    """A request goes to the next worker when one refuses; with none left, 503."""
    dead = f"http://127.0.0.1:{unused_port}"
    with SimProcess() as sim, GatewayProcess([dead, sim.url], "--policy", "round-robin") as gw:
        c = client(gw)
        for _ in range(4):
            assert chat(c, "hello").choices[0].message.content
    with GatewayProcess([dead]) as gw:
        resp = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": "sim", "messages": [{"role": "user", "content": "x"}]},
        )
        assert resp.status_code == 503  # no worker has listed its models: not a 404
        assert resp.json()["error"]["message"]


@pytest.mark.parametrize("policy", ["round-robin", "kvtier"])
def test_a_request_goes_only_to_workers_serving_its_model(policy: str) -> None:
    """Two workers, two models: every request lands on the one that serves its model."""
    with (
        SimProcess("--model", "ma") as a,
        SimProcess("--model", "mb") as b,
        GatewayProcess([a.url, b.url], "--policy", policy) as gw,
    ):
        c = client(gw)
        assert sorted(m.id for m in c.models.list().data) == ["ma", "mb"]
        for i in range(6):
            for model in ("ma", "mb"):
                messages = [{"role": "user", "content": f"{LONG} {i}"}]
                answer = c.chat.completions.create(model=model, messages=messages, max_tokens=2)  # type: ignore[arg-type]
                assert answer.model == model


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_conversations_follow_their_kv_across_workers() -> None:
    """Four workers, twelve conversations of four turns: later turns reuse their prefix."""
    args = ("--kv-events-port", "0", "--prefill-ms-per-token", "0.01", "--decode-ms-per-token", "1")
    with SimProcess(*args, count=4) as sims:
        events = ",".join(e or "" for e in sims.events)
        with GatewayProcess(sims.urls, "--kv-events", events) as gw:
            c = client(gw)
            histories = [[{"role": "system", "content": f"user {i}: " + LONG}] for i in range(12)]
            reused = []
            for turn in range(4):
                threads = []
                for h in histories:
                    h.append({"role": "user", "content": f"question {turn}"})
                    threads.append(threading.Thread(target=_turn, args=(c, h, reused, turn)))
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            later = [r for turn, r in reused if turn > 0]
            assert min(later) > 0.8
            routed = httpx.get(gw.url + "/metrics").text
            counts = [
                float(line.rsplit(" ", 1)[1])
                for line in routed.splitlines()
                if line.startswith("kvtier_gateway_routed_total")
            ]
            assert len(counts) == 4 and max(counts) <= 0.5 * sum(counts)


def _turn(
    c: openai.OpenAI, history: list[dict[str, str]], out: list[tuple[int, float]], turn: int
) -> None:
    done = c.chat.completions.create(model="sim", messages=history, max_tokens=8)  # type: ignore[arg-type]
    history.append({"role": "assistant", "content": done.choices[0].message.content or ""})
    assert done.usage is not None
    out.append((turn, cached(done) / done.usage.prompt_tokens))


def test_redis_down_means_no_affinity_and_503_for_sessions_never_a_stuck_request(
    unused_port: int,
) -> None:
    """Completions still work (affinity skipped, counted); a continuation gets an OpenAI 503;
    no request stays booked on a worker."""
    with SimProcess() as sim:
        redis_url = f"redis://127.0.0.1:{unused_port}/0"
        with GatewayProcess(sim.urls, "--redis", redis_url) as gw:
            c = client(gw)
            assert chat(c, "hello", user="u1").choices[0].message.content
            stream = c.chat.completions.create(
                model="sim", messages=MESSAGES, max_tokens=3, stream=True, user="u1"
            )
            assert len(list(stream)) >= 3
            with pytest.raises(openai.APIStatusError) as caught:
                c.responses.create(model="sim", input="x", previous_response_id="resp_" + "0" * 32)
            assert caught.value.status_code == 503
            text = httpx.get(gw.url + "/metrics").text
            assert "kvtier_gateway_state_errors_total" in text
            booked = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("kvtier_gateway_worker_requests{")
            ]
            assert booked == [0.0]


def _kv_events(gw: GatewayProcess) -> float:
    lines = httpx.get(gw.url + "/metrics").text.splitlines()
    line = next(ln for ln in lines if ln.startswith("kvtier_gateway_kv_events_total"))
    return float(line.split()[-1])


def test_a_gateway_started_late_replays_what_the_workers_hold() -> None:
    """A gateway started after a worker cached a prompt (sent through another gateway, so
    under the same tenant salt) reads those blocks from the worker's replay socket (vLLM's
    replay_endpoint) and routes the prompt to it; one without --kv-events-replay hears
    nothing until new blocks are stored."""
    args = ("--kv-events-port", "0", "--prefill-ms-per-token", "0.02")
    with SimProcess(*args, count=3) as sims:
        events = ("--kv-events", ",".join(e or "" for e in sims.events))
        replays = ("--kv-events-replay", ",".join(r or "" for r in sims.replays))
        with GatewayProcess(sims.urls, *events) as first:
            chat(client(first), "warm-up")  # to the worker a fresh gateway tries first...
            assert cached(chat(client(first), LONG)) == 0  # ...and the prompt to the next
        with GatewayProcess(sims.urls, *events, *replays) as late:
            deadline = time.monotonic() + TIMEOUT_S
            while _kv_events(late) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            heard = _kv_events(late)
            reply = chat(client(late), LONG)
        with GatewayProcess(sims.urls, *events) as deaf:
            time.sleep(0.5)
            unheard = _kv_events(deaf)
            blind = chat(client(deaf), LONG)
    assert heard > 0 and unheard == 0
    assert cached(reply) >= 256  # routed to the one worker holding the prompt
    assert cached(blind) == 0  # the gateway that heard nothing tried its first worker
