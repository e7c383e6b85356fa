"""kvtier under real vLLM engines (CPU build, a tiny random Llama): engine processes reuse
each other's KV through the node-local store, a kvtier server and Redis, with identical
output; salts never share; corrupt chunks and a dead server mean recomputation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from tests.gateway.tiny_tokenizer import save_tokenizer

import kvtier
from kvtier.bench.remote_io import RedisProcess, free_port
from kvtier.cli import main as cli_main
from kvtier.gateway import events
from kvtier.gateway.pool import Pool
from kvtier.gateway.routing import make_policy
from kvtier.gateway.tokenizer import ModelTokenizer
from kvtier.gateway.tokens import block_keys
from kvtier.integrations.vllm.node import running_nodes, stop_nodes
from kvtier.server.server import ServerThread

ENGINE = Path(__file__).with_name("engine.py")
CHUNK = 64
CHUNK_BYTES = CHUNK * 2 * 2 * 2 * 32 * 4  # tokens x layers x (K, V) x KV heads x head dim x fp32
RNG = np.random.default_rng(7)
PROMPT = [int(t) for t in RNG.integers(1, 500, 600)]
SHARED_300 = PROMPT[:300] + [int(t) for t in RNG.integers(1, 500, 100)]
CHAT = [
    {"role": "system", "content": " ".join(f"w{t % 400}" for t in PROMPT[:300])},
    {
        "role": "user",
        "content": [{"type": "text", "text": "w1 w2"}, {"type": "text", "text": "w3"}],
    },
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=2048, initializer_range=0.02,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(config).save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("vllm")
    yield path
    stop_nodes(path / "node")


@pytest.fixture(scope="module")
def server(work: Path) -> Iterator[ServerThread]:
    store = kvtier.Store(kvtier.StoreConfig(chunk_tokens=CHUNK, dram_bytes=64 << 20))
    thread = ServerThread(store)
    yield thread
    thread.stop()
    store.close()


def run_engine(
    model: Path,
    extra: dict[str, Any],
    jobs: list[dict[str, Any]],
    tp: int = 1,
    log: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The jobs' results from a new engine process (its output appended to `log`)."""
    spec = {"model": str(model), "extra": {"chunk_tokens": CHUNK, **extra}, "jobs": jobs, "tp": tp}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ENGINE), json.dumps(spec)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    if log is not None:
        log.append(proc.stdout + proc.stderr)  # vLLM logs to stdout
    results: list[dict[str, Any]] = json.loads(lines[-1].removeprefix("RESULTS "))
    return results


def node(work: Path, name: str, **extra: Any) -> dict[str, Any]:
    disk = work / name
    disk.mkdir(exist_ok=True)
    return {"dram_bytes": "16MiB", "disk_dir": str(disk), "disk_bytes": "64MiB",
            "node_dir": str(work / "node"), **extra}  # fmt: skip


def same_output(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["tokens"] == b["tokens"]
    assert np.allclose(a["logprobs"], b["logprobs"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def first(model_dir: Path, work: Path, server: ServerThread) -> list[dict[str, Any]]:
    """Engine 1 on node A (DRAM + disk, the kvtier server behind): the prompt, then a salted
    copy of it."""
    jobs = [{"prompt": PROMPT}, {"prompt": PROMPT, "salt": "tenant-b"}]
    return run_engine(model_dir, node(work, "a", remote=server.url), jobs)


def test_second_engine_reuses_the_first_engines_kv(
    first: list[dict[str, Any]], model_dir: Path, work: Path, server: ServerThread
) -> None:
    """A second engine process on the same node loads the stored prefix (all full chunks
    but the last token's) and generates the same tokens and logprobs; a prompt sharing only
    a 300-token head reuses that head's whole chunks; another salt never hits."""
    assert first[0]["cached"] == 0
    jobs = [{"prompt": SHARED_300}, {"prompt": PROMPT}, {"prompt": PROMPT, "salt": "tenant-c"}]
    shared, again, salted = run_engine(model_dir, node(work, "a", remote=server.url), jobs)
    assert shared["cached"] == 300 // CHUNK * CHUNK
    assert again["cached"] == 599 // CHUNK * CHUNK
    same_output(again, first[0])
    assert salted["cached"] == 0
    same_output(salted, first[0])


def test_another_node_finds_it_through_the_server(
    first: list[dict[str, Any]], model_dir: Path, work: Path, server: ServerThread
) -> None:
    """An engine on another node (its own DRAM and disk) finds the first engine's KV
    through the kvtier server, loading it in the background (load_async), with identical
    output; the salted copy stays the salt's."""
    jobs = [{"prompt": PROMPT}, {"prompt": PROMPT, "salt": "tenant-b"}]
    extra = node(work, "b", remote=server.url, load_async=True)
    plain, salted = run_engine(model_dir, extra, jobs)
    assert plain["cached"] >= 512
    same_output(plain, first[0])
    assert salted["cached"] >= 512
    same_output(salted, first[1])


class DyingLink:
    """A TCP relay on 127.0.0.1 to a kvtier server that dies mid-answer: once it has passed
    `cut_after` bytes of answers, it drops every connection and accepts no more, as a server
    killed mid-load would."""

    def __init__(self, upstream: tuple[str, int], cut_after: int) -> None:
        self.upstream, self.cut_after = upstream, cut_after
        self.passed = 0
        self.cut = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"kvtier://127.0.0.1:{self.listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if answers:
                    with self._lock:
                        room = self.cut_after - self.passed
                        self.passed += min(len(data), max(room, 0))
                    if room < len(data):
                        dst.sendall(data[: max(room, 0)])
                        self.kill()
                        return
                dst.sendall(data)
        except OSError:
            pass

    def kill(self) -> None:
        self.cut.set()
        self.listener.close()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_a_server_killed_mid_load_means_recomputation(
    first: list[dict[str, Any]], model_dir: Path, work: Path, server: ServerThread
) -> None:
    """An engine on a fresh node whose only copy of the prompt's KV is on the kvtier server;
    the server dies one and a half chunks into the load: the engine recomputes what it did
    not get, with the same tokens and logprobs, and stays up for the next prompt."""
    link = DyingLink((server.host, server.port), cut_after=CHUNK_BYTES * 3 // 2)
    try:
        jobs = [{"prompt": PROMPT}, {"prompt": SHARED_300}]
        again, other = run_engine(model_dir, node(work, "c", remote=link.url), jobs)
    finally:
        link.kill()
    assert link.cut.is_set() and 0 < link.passed <= CHUNK_BYTES * 3 // 2
    same_output(again, first[0])
    assert other["tokens"]


def test_corrupt_chunks_and_a_dead_server_mean_recomputation(
    first: list[dict[str, Any]], model_dir: Path, work: Path, server: ServerThread
) -> None:
    """With every chunk file of node A corrupted (after a restart, so they are read from
    disk) and the server gone, the engine recomputes: identical output, no dead engine."""
    stop_nodes(work / "node")  # it may have exited already, idle
    server.stop()
    files = [p for p in (work / "a").rglob("*") if p.is_file() and p.stat().st_size > 4096]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size - 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    (result,) = run_engine(model_dir, node(work, "a", remote=server.url), [{"prompt": PROMPT}])
    same_output(result, first[0])


def test_a_steps_loads_beyond_the_nodes_dram_all_load(model_dir: Path, work: Path) -> None:
    """Four prompts kvtier holds on its node's disk, admitted together in one step, into a
    node whose DRAM holds 16 of their 36 chunks: the node promotes what fits and lends it in
    place, the rest comes through the worker's staging buffer (a copy the node reads
    straight from disk). No load fails (vLLM logs none recovered), and every output is the
    one computed from scratch."""
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(1, 500, 600)] for _ in range(4)]
    node_dir = work / "node-small"
    extra = node(work, "small", dram_bytes=str(16 * CHUNK_BYTES), node_dir=str(node_dir))
    log: list[str] = []
    try:
        results = run_engine(
            model_dir, extra, [*({"prompt": p} for p in prompts), {"reset": True},
                               {"batch": prompts}], log=log,
        )  # fmt: skip
    finally:
        stop_nodes(node_dir)
    alone, together = results[:4], results[4:]
    assert all(r["cached"] == 0 for r in alone)
    assert all(r["cached"] == 599 // CHUNK * CHUNK for r in together)
    for a, b in zip(alone, together, strict=True):
        same_output(a, b)
    assert "KV load failure" not in log[0], log[0][-3000:]


def test_a_node_killed_mid_run_is_restarted_and_serves_its_disk(
    model_dir: Path, work: Path
) -> None:
    """kill -9 of the node-local kvtier process under a running engine: the next request
    finds it gone (a miss, recomputed) and the engine starts a new node, which serves what
    the old one had written to disk, with the same tokens and logprobs. (The first request
    once the node is back may still miss: each engine process finds the new node in a
    thread of its own.)"""
    node_dir = work / "node-k"  # its own: the job kills every node there
    extra = node(work, "k", node_dir=str(node_dir))
    R = {"reset": True}
    jobs = [{"prompt": PROMPT}, R, {"prompt": PROMPT}, {"kill_node": True}, R,
            {"prompt": SHARED_300}, {"wait_node": True}, R, {"prompt": PROMPT}, R,
            {"prompt": PROMPT}]  # fmt: skip
    try:
        cold, warm, during, back, after = run_engine(model_dir, extra, jobs)
    finally:
        stop_nodes(node_dir)
    assert cold["cached"] == 0 and warm["cached"] == 599 // CHUNK * CHUNK
    assert during["cached"] == 0  # the node is gone, and vLLM's own cache was reset
    assert after["cached"] == 599 // CHUNK * CHUNK  # the new node: the first run's disk chunks
    for result in (warm, back, after):
        same_output(result, cold)


def test_tensor_parallel_ranks_save_and_load_their_own_shards(model_dir: Path, work: Path) -> None:
    """A tensor-parallel engine (2 worker processes): each rank saves its own shard of every
    chunk under its own keys, and after vLLM's own cache is reset both load them back (the
    ranks agree on the step's loads through vLLM's CPU group) with the same output."""
    node_dir = work / "node-tp"
    extra = node(work, "tp", node_dir=str(node_dir))
    try:
        cold, warm = run_engine(model_dir, extra, [{"prompt": PROMPT}, {"reset": True},
                                                   {"prompt": PROMPT}], tp=2)  # fmt: skip
        (found,) = running_nodes(node_dir)
    finally:
        stop_nodes(node_dir)
    assert cold["cached"] == 0 and warm["cached"] == 599 // CHUNK * CHUNK
    same_output(warm, cold)
    dram = found.stats["tiers"]["dram"]
    assert dram["chunks"] == 2 * ((len(PROMPT) + 7) // CHUNK)  # a shard per rank
    assert dram["hits"] == 2 * (599 // CHUNK)


def test_the_bench_engine_times_kvtiers_hooks(model_dir: Path, work: Path) -> None:
    """`kvtier bench vllm`'s engine process times kvtier's connector hooks on both sides
    (the scheduler's lookups, the worker's saves): time inside kvtier, apart from the rest
    of the step."""
    from kvtier.bench.vllm_engine import EngineProcess

    spec = {"model": str(model_dir), "dtype": "float32", "block_size": 32,
            "max_model_len": 2048, "kv_cache_bytes": 32 << 20,
            "extra": {"chunk_tokens": CHUNK, **node(work, "clock")}}  # fmt: skip
    engine = EngineProcess(spec, work / "clock.log")
    try:
        reply = engine.run([{"id": "r", "prompt": PROMPT, "max_tokens": 4}])
    finally:
        engine.close()
    calls = reply["connector_calls"]
    assert calls.get("get_num_new_matched_tokens", 0) >= 1  # scheduler side
    assert calls.get("wait_for_save", 0) >= 1  # worker side
    assert 0 < reply["connector_s"] < reply["wall_s"]


def test_the_bench_engine_adds_requests_when_they_arrive(model_dir: Path, work: Path) -> None:
    """`kvtier bench vllm`'s rate runs: a request is added at its `at_s`, its TTFT counts
    from then, and its `salt` is its cache_salt (a salted copy misses the unsalted prompt's
    KV and hits its own salt's)."""
    from kvtier.bench.vllm_engine import EngineProcess

    spec = {"model": str(model_dir), "dtype": "float32", "block_size": 32,
            "max_model_len": 2048, "kv_cache_bytes": 32 << 20, "extra": None}  # fmt: skip
    engine = EngineProcess(spec, work / "arrivals.log")
    try:
        reply = engine.run([
            {"id": "late", "prompt": PROMPT, "max_tokens": 2, "at_s": 1.0, "salt": "s"},
            {"id": "plain", "prompt": PROMPT, "max_tokens": 2},
            {"id": "salted", "prompt": PROMPT, "max_tokens": 2, "at_s": 0.5, "salt": "s"},
        ])  # fmt: skip
    finally:
        engine.close()
    late, plain, salted = reply["results"]
    assert plain["cached"] == 0 and salted["cached"] == 0
    assert late["cached"] >= 512
    assert salted["done_s"] >= 0.5 and late["done_s"] >= 1.0
    assert salted["ttft_s"] <= salted["done_s"] - 0.5 and late["ttft_s"] <= late["done_s"] - 1.0
    assert late["tokens"] == salted["tokens"] == plain["tokens"]


def test_engines_share_through_redis(model_dir: Path, work: Path, tmp_path: Path) -> None:
    """An engine with Redis as its only tier (no node-local process) saves into it; an
    engine on another node, with its own DRAM and disk and Redis behind them, finds it."""
    with RedisProcess(tmp_path / "redis") as redis:
        extra = {"dram_bytes": None, "remote": redis.url}
        (written,) = run_engine(model_dir, extra, [{"prompt": PROMPT}])
        (read,) = run_engine(
            model_dir, node(work, "redis-b", remote=redis.url), [{"prompt": PROMPT}]
        )
    assert written["cached"] == 0
    assert read["cached"] >= 512
    same_output(read, written)


def test_openai_server_reuses_kvtier(
    model_dir: Path, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """vLLM's OpenAI server loads the connector from --kv-transfer-config; after its own
    prefix cache is reset, a repeated prompt's cached tokens come from kvtier (reported in
    usage.prompt_tokens_details) and the completion is the same. Its KV events, read as the
    gateway reads them, put the prompt's blocks under the gateway's own salted keys, for a
    chat too when the gateway counts in the model's tokens (`--tokenizer`): the same ids as
    the server's. `kvtier preheat --vllm` through it pins every full chunk of its prompt in
    the node."""
    transfer = {
        "kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"chunk_tokens": CHUNK, **node(work, "openai")},
    }
    port = free_port()
    events_endpoint = f"ipc://{work}/events-{port}"
    replay_endpoint = f"ipc://{work}/replay-{port}"
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--enforce-eager", "--dtype", "float32", "--block-size", "32",
        "--max-model-len", "2048", "--kv-cache-memory-bytes", str(32 << 20),
        "--host", "127.0.0.1", "--port", str(port), "--enable-prompt-tokens-details",
        "--kv-transfer-config", json.dumps(transfer),
        "--kv-events-config", json.dumps(
            {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events_endpoint,
             "replay_endpoint": replay_endpoint}
        ),
    ]  # fmt: skip
    log = open(work / "openai.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    subscriber = EventsReader(events_endpoint)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base + "/health", server, timeout_s=240)
        body = {"model": str(model_dir), "prompt": SHARED_300, "max_tokens": 4,
                "temperature": 0, "return_token_ids": True, "cache_salt": "t-salt"}  # fmt: skip
        first = post(base + "/v1/completions", body)
        stored = subscriber.read_until(lambda evs: any(_in_dram(e) for e in evs))
        assert post(base + "/reset_prefix_cache", None) == {"success": True}
        second = post(base + "/v1/completions", body)
        chat = {"model": str(model_dir), "messages": CHAT, "max_tokens": 2,
                "temperature": 0, "return_token_ids": True, "cache_salt": "t-salt"}  # fmt: skip
        chat_ids = post(base + "/v1/chat/completions", chat)["prompt_token_ids"]
        tokens = ModelTokenizer(str(model_dir)).prompts(chat)[0]
        blocks = len(tokens) // 32
        chat_keys = block_keys(tokens, 32, "t-salt")
        stored = subscriber.read_until(lambda evs: _indexed(evs, chat_keys) == blocks)
        late = asyncio.run(_late_subscriber(events_endpoint, replay_endpoint, chat_keys, blocks))
        prompts = work / "preheat.jsonl"
        prompts.write_text(json.dumps({"tokens": PROMPT}) + "\n")
        assert cli_main(["preheat", str(prompts), "--vllm", base, "--json"]) == 0
        preheated = json.loads(capsys.readouterr().out)
    finally:
        subscriber.close()
        server.terminate()
        server.wait(timeout=60)
        log.close()
    keys = block_keys(SHARED_300, 32, "t-salt")
    assert _indexed(stored, keys) == len(SHARED_300) // 32
    # kvtier's saves, announced as vLLM's CPU offloading announces its own: a gateway that
    # saw only them would credit the worker's DRAM with the prompt's whole chunks.
    saved = [e for e in stored if _in_dram(e)]
    assert _indexed(saved, keys, "dram") == len(SHARED_300) // CHUNK * CHUNK // 32
    assert tokens.tolist() == chat_ids
    assert blocks >= 8
    assert _indexed(stored, chat_keys) == blocks
    assert _indexed(late, chat_keys) == blocks  # what the server held, from its replay socket
    assert _indexed(late, keys) == len(SHARED_300) // 32
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (len(SHARED_300) - 1) // CHUNK * CHUNK
    assert second["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    assert preheated["prompt_tokens"] == len(PROMPT)
    assert preheated["pinned_tokens"] == len(PROMPT) // CHUNK * CHUNK


def _indexed(stored: list[events.Event], keys: list[int], tier: str = "gpu") -> int:
    """The leading blocks of `keys` a gateway's index holds on the worker after `stored`,
    in `tier` (`gpu`, `dram`)."""
    pool = Pool(["http://engine"], make_policy("kvtier"), 32, 10_000)
    for event in stored:
        if isinstance(event, events.BlockStored):
            pool.apply_event(0, event)
    assert pool.stats.events_unchained == pool.stats.events_wrong_block_size == 0
    blocks: int = getattr(pool.index.match(keys)[0], tier)
    return blocks


def _in_dram(event: events.Event) -> bool:
    return isinstance(event, events.BlockStored) and event.medium == events.MEDIUM_CPU


async def _late_subscriber(
    endpoint: str, replay: str, keys: list[int], blocks: int, timeout_s: float = 10.0
) -> list[events.Event]:
    """The events a gateway subscribing now reads, until `keys` has `blocks` indexed: no new
    block is stored meanwhile, so they come from vLLM's replay socket."""
    got: list[events.Event] = []

    async def pump() -> None:
        async for event in events.subscribe(endpoint, replay=replay):
            got.append(event)

    task = asyncio.create_task(pump())
    deadline = time.monotonic() + timeout_s
    while _indexed(got, keys) < blocks and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return got


class EventsReader:
    """A ZeroMQ SUB socket on vLLM's KV events, decoded as the gateway decodes them."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.events: list[events.Event] = []

    def read_until(self, done: Any, timeout_s: float = 10.0) -> list[events.Event]:
        deadline = time.monotonic() + timeout_s
        while not done(self.events) and time.monotonic() < deadline:
            if self.sock.poll(100):
                _topic, _seq, payload = self.sock.recv_multipart()
                self.events += events.decode(payload).events
        return [e for e in self.events if isinstance(e, events.BlockStored)]

    def close(self) -> None:
        self.sock.close(linger=0)


def post(url: str, body: dict[str, Any] | None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        result: dict[str, Any] = json.loads(reply.read() or b"{}")
    return result


def wait_until_up(url: str, server: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "the OpenAI server exited; see openai.log"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the OpenAI server did not answer {url} within {timeout_s} s")
