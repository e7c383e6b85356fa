"""Two real vLLM engines (CPU build) with kvtier behind `kvtier gateway`, policy by policy.

Each engine is vLLM's OpenAI server with kvtier's connector (its own node-local DRAM, and a
shared `kvtier serve` behind both) and its KV events on a ZeroMQ ipc socket the gateway reads.
Every engine's KV cache holds less than half the live context, so routing matters. For each
policy a fresh gateway runs the same multi-turn chat: sessions in parallel, each turn sent
after the previous answer (whose token ids it carries), streamed so the client times the first
token. Prompts are token ids (the random model has no tokenizer), so vLLM's KV events name
exactly the gateway's blocks. Each policy gets its own `--salt-secret`, so no run reuses KV an
earlier run left in vLLM or kvtier; every run must generate the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from kvtier.bench.metrics import percentiles_ms
from kvtier.bench.remote_io import free_port
from kvtier.bench.vllm_model import Model, build_default
from kvtier.gateway.costs import parse_prometheus

POLICIES = ("round-robin", "prefix", "kvtier")
MODEL = {
    "num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1536,
    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
}  # fmt: skip
BLOCK = 32
START_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Chat:
    sessions: int = 8
    turns: int = 4
    system_tokens: int = 1024
    user_tokens: int = 64
    answer_tokens: int = 32
    cache_tokens: int = 4096  # one engine's KV cache
    seed: int = 0

    def session_tokens(self) -> int:
        return self.system_tokens + self.turns * (self.user_tokens + self.answer_tokens)

    def live_tokens(self) -> int:
        return self.sessions * self.session_tokens()

    def user(self, session: int, turn: int) -> list[int]:
        rng = np.random.default_rng([self.seed, session, turn])
        n = self.system_tokens + self.user_tokens if turn == 0 else self.user_tokens
        return [int(t) for t in rng.integers(1, MODEL["vocab_size"], n)]


class Engines:
    """Two vLLM OpenAI servers with kvtier, and the `kvtier serve` they share."""

    def __init__(self, model: Model, work: Path, chat: Chat) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.events: list[str] = []
        try:
            self._start(model, chat)
        except BaseException:
            self.close()
            raise

    def _start(self, model: Model, chat: Chat) -> None:
        work = self.work
        self.server_port = free_port()
        serve = [sys.executable, "-m", "kvtier.cli", "serve", "--port", str(self.server_port)]
        self.procs.append(_spawn([*serve, "--dram", "256MiB"], work / "serve.log"))
        for i in range(2):
            port, events = free_port(), f"ipc://{work}/events-{i}"
            self.procs.append(
                _spawn(self._args(model, chat, i, port, events), work / f"vllm{i}.log")
            )
            self.urls.append(f"http://127.0.0.1:{port}")
            self.events.append(events)
        for i, (url, proc) in enumerate(zip(self.urls, self.procs[1:], strict=True)):
            _wait_up(url + "/health", proc, work / f"vllm{i}.log")

    def _args(self, model: Model, chat: Chat, i: int, port: int, events: str) -> list[str]:
        extra = {
            "chunk_tokens": 256, "dram_bytes": "128MiB", "node_dir": str(self.work / f"node{i}"),
            "remote": f"kvtier://127.0.0.1:{self.server_port}",
        }  # fmt: skip
        transfer = {
            "kv_connector": "KvtierConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "kvtier.integrations.vllm",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra,
        }  # fmt: skip
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.path),
            "--skip-tokenizer-init", "--enforce-eager", "--dtype", model.dtype,
            "--block-size", str(BLOCK), "--max-model-len", str(chat.session_tokens() + BLOCK),
            "--kv-cache-memory-bytes", str(chat.cache_tokens * model.kv_bytes_per_token),
            "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-tokens-details",
            "--kv-transfer-config", json.dumps(transfer),
            "--kv-events-config", json.dumps(
                {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events}),
        ]  # fmt: skip

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_SERVER_DEV_MODE": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log.read_text(errors="replace").splitlines()
            tail = "\n".join(line for line in lines if "Error" in line)[-3000:]
            raise RuntimeError(f"a vLLM server exited while starting:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {START_TIMEOUT_S:.0f} s")


def run_policy(engines: Engines, model: Model, chat: Chat, policy: str) -> dict[str, Any]:
    """One gateway with `policy` in front of the engines; the chat through it."""
    args = [sys.executable, "-m", "kvtier.cli", "gateway", "--port", "0", "--policy", policy,
            "--workers", ",".join(engines.urls), "--kv-events", ",".join(engines.events),
            "--block-tokens", str(BLOCK), "--salt-secret", f"run-{policy}",
            "--worker-cache-tokens", str(chat.cache_tokens)]  # fmt: skip
    gateway = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert gateway.stdout is not None
        url = gateway.stdout.readline().split()[2]
        _wait_up_gateway(url)
        turns = asyncio.run(_chat(url, str(model.path), chat))
        with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
            metrics = parse_prometheus(reply.read().decode())
    finally:
        gateway.terminate()
        gateway.wait(30)
    row = _summary(policy, turns)
    row["kv_events"] = int(metrics.get("kvtier_gateway_kv_events_total", 0))
    row["kv_events_dropped"] = int(
        sum(v for k, v in metrics.items() if k.startswith("kvtier_gateway_kv_events_dropped_total"))
    )
    return row


def _wait_up_gateway(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the gateway did not become healthy")


async def _chat(url: str, model: str, chat: Chat) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        runs = [_session(http, url, model, chat, s) for s in range(chat.sessions)]
        return [t for turns in await asyncio.gather(*runs) for t in turns]


async def _session(
    http: aiohttp.ClientSession, url: str, model: str, chat: Chat, session: int
) -> list[dict[str, Any]]:
    history: list[int] = []
    out = []
    for turn in range(chat.turns):
        history += chat.user(session, turn)
        body = {
            "model": model, "prompt": history, "max_tokens": chat.answer_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True, "stream": True,
            "stream_options": {"include_usage": True}, "user": f"session-{session}",
        }  # fmt: skip
        started, first = time.perf_counter(), None
        tokens: list[int] = []
        usage: dict[str, Any] = {}
        async with http.post(url + "/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    first = first or time.perf_counter()
                    tokens += choice.get("token_ids") or []
                usage = chunk.get("usage") or usage
        history += tokens
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        ttft = (first or time.perf_counter()) - started
        out.append({"session": session, "turn": turn, "ttft_s": ttft, "tokens": tokens,
                    "prompt": usage.get("prompt_tokens", 0), "cached": cached})  # fmt: skip
    return out


def _summary(policy: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
    later = [t for t in turns if t["turn"] > 0]
    prompt = sum(t["prompt"] for t in later)
    return {
        "policy": policy,
        "ttft_ms_returning": percentiles_ms([t["ttft_s"] for t in later]),
        "hit_rate_returning": sum(t["cached"] for t in later) / prompt if prompt else 0.0,
        "outputs": {f"{t['session']}/{t['turn']}": t["tokens"] for t in turns},
    }


def bench(chat: Chat | None = None, policies: tuple[str, ...] = POLICIES) -> dict[str, Any]:
    """Every policy in turn over the same two engines; figures and a token check."""
    chat = chat or Chat()
    with tempfile.TemporaryDirectory(prefix="kvtier-gw-vllm-") as tmp:
        work = Path(tmp)
        model = build_default(work, MODEL)
        engines = Engines(model, work, chat)
        try:
            rows = [run_policy(engines, model, chat, p) for p in policies]
        finally:
            engines.close()
    reference = rows[0]["outputs"]
    differing = sum(
        sum(a != b for a, b in zip(row["outputs"][k], reference[k], strict=False))
        for row in rows for k in reference
    )  # fmt: skip
    for row in rows:
        del row["outputs"]
    return {
        "engines": 2,
        "model": model.name,
        "live_context_over_one_engine_cache": chat.live_tokens() / chat.cache_tokens,
        "rows": rows,
        "differing_tokens": differing,
    }


def markdown(result: dict[str, Any]) -> str:
    """A table of the policies' figures."""
    lines = [
        f"# kvtier bench gateway --vllm ({result['engines']} engines, {result['model']})",
        "",
        f"live context / one engine's KV cache: {result['live_context_over_one_engine_cache']:.2f}",
        f"differing tokens between policies: {result['differing_tokens']}",
        "",
        "| policy | returning TTFT p50 / p90 ms | hit rate (returning turns) | KV events read |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        ttft = row["ttft_ms_returning"]
        lines.append(
            f"| {row['policy']} | {ttft['p50']:.0f} / {ttft['p90']:.0f} | "
            f"{row['hit_rate_returning']:.3f} | {row['kv_events']} |"
        )
    return "\n".join(lines)
