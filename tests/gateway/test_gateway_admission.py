"""Rate limits and the durable queue through a real gateway process (worker-sim behind it,
a real redis-server, the official openai client)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from tests.gateway.procs import GatewayProcess, SimProcess
from tests.gateway.test_taskqueue import QueueWorkerProcess

from kvtier.bench.remote_io import RedisProcess

MESSAGES = [{"role": "user", "content": "hello"}]
HEADERS = [
    f"x-ratelimit-{what}-{unit}"
    for what in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens")
]


def files(tmp_path: Path, limits: str) -> tuple[Path, Path]:
    auth, lim = tmp_path / "keys", tmp_path / "limits.toml"
    auth.write_text("alice key-alice-123\nbob key-bob-4567\n")
    lim.write_text(limits)
    return auth, lim


def client(gw: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_rpm_refusal_is_openai_429_with_retry_after_and_headers(tmp_path: Path) -> None:
    """Past a tenant's rpm: 429 with Retry-After and the six headers; 200s carry them too;
    another tenant is not affected."""
    auth, lim = files(tmp_path, "[tenants.alice]\nrpm = 3\ntpm = 100000\n")
    with SimProcess() as sim, GatewayProcess(sim.urls, "--auth-file", str(auth),
                                             "--limits", str(lim)) as gw:  # fmt: skip
        body = {"model": "sim", "messages": MESSAGES, "max_tokens": 2}
        alice = {"Authorization": "Bearer key-alice-123"}
        answers = [
            httpx.post(gw.url + "/v1/chat/completions", json=body, headers=alice) for _ in range(4)
        ]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert all(h in answers[0].headers for h in HEADERS)
        refused = answers[3]
        assert all(h in refused.headers for h in HEADERS)
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client(gw, "key-alice-123").chat.completions.create(model="sim", messages=MESSAGES)
        bob = client(gw, "key-bob-4567")
        assert bob.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=2)


def test_a_client_gone_mid_stream_gives_its_reserved_tokens_back(tmp_path: Path) -> None:
    """TPM reserves prompt + max_tokens; a stream its client abandons is released, so three
    such streams fit where, unsettled, the third would be refused."""
    auth, lim = files(tmp_path, "[tenants.alice]\nrpm = 100\ntpm = 1000\n")
    with SimProcess("--decode-ms-per-token", "20") as sim, GatewayProcess(
        sim.urls, "--auth-file", str(auth), "--limits", str(lim)
    ) as gw:  # fmt: skip
        c = client(gw, "key-alice-123")
        for _ in range(3):  # each reserves ~8 + 400 tokens
            stream = c.chat.completions.create(
                model="sim", messages=MESSAGES, max_tokens=400, stream=True
            )
            next(iter(stream))
            stream.close()
            time.sleep(0.5)  # the release runs once the gateway sees the client gone
        with pytest.raises(openai.RateLimitError):  # while one this big never fits
            c.chat.completions.create(model="sim", messages=MESSAGES, max_tokens=1200)


def test_queued_completions_run_and_are_tenant_scoped(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    """POST /v1/queue/chat/completions answers an id at once; a queue worker runs it; GET
    gives the completion to its tenant and 404 to another."""
    auth, _ = files(tmp_path, "")
    with SimProcess() as sim, GatewayProcess(
        sim.urls, "--auth-file", str(auth), "--redis", redis_server.url
    ) as gw, QueueWorkerProcess(redis_server.url, sim.url, "w1"):  # fmt: skip
        alice = {"Authorization": "Bearer key-alice-123"}
        body = {"model": "sim", "messages": MESSAGES, "max_tokens": 3}
        posted = httpx.post(gw.url + "/v1/queue/chat/completions", json=body, headers=alice)
        assert posted.status_code == 200 and posted.json()["status"] == "queued"
        task = posted.json()["id"]
        deadline = time.monotonic() + 20
        while True:
            status = httpx.get(f"{gw.url}/v1/queue/{task}", headers=alice).json()
            if status["status"] == "done" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status["status"] == "done"
        assert status["completion"]["choices"][0]["message"]["content"]
        bob = {"Authorization": "Bearer key-bob-4567"}
        assert httpx.get(f"{gw.url}/v1/queue/{task}", headers=bob).status_code == 404


def test_the_queue_needs_redis(tmp_path: Path) -> None:
    """Without --redis the queue routes answer an OpenAI-shaped 404 that says why."""
    with SimProcess() as sim, GatewayProcess(sim.urls) as gw:
        body = {"model": "sim", "messages": MESSAGES}
        answer = httpx.post(gw.url + "/v1/queue/chat/completions", json=body)
        assert answer.status_code == 404 and "--redis" in answer.json()["error"]["message"]
