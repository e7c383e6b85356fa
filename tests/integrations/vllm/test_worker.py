"""ChunkMover, the worker side, on CPU pages vLLM's allocator builds, against a real node
process: saves gathered into the node's DRAM in place, loads scattered from it (in the step,
or in the background), a missing chunk failing its blocks and every later one."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tests.integrations.vllm.test_pages import LAYERS, NUM_BLOCKS, _caches, _paged
from tests.integrations.vllm.test_scheduler import model_dir, node_dir, vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    compute_layout_strides,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

from kvtier.config import StoreConfig
from kvtier.integrations.vllm import worker
from kvtier.integrations.vllm.node import engine_config
from kvtier.integrations.vllm.plan import ChunkCopy, RequestJobs, StepPlan
from kvtier.integrations.vllm.worker import ChunkMover
from kvtier.store import Store

BLOCK = 16
ROOT = Path(__file__).parents[3]
TP_RANKS = Path(__file__).with_name("tp_ranks.py")
BLOCKS_PER_CHUNK = 2
__all__ = ["model_dir", "node_dir"]  # fixtures of test_scheduler's, used here too


@pytest.fixture
def mover(node_dir: Path, tmp_path: Path) -> Iterator[tuple[ChunkMover, dict[str, torch.Tensor]]]:
    caches, page_bytes = _caches(KVCacheLayout["LBHNC"], BLOCK)
    torch.manual_seed(0)
    for t in caches.values():
        t.copy_(torch.randn(t.shape, dtype=torch.float32).to(t.dtype))
    config = StoreConfig(chunk_tokens=BLOCK * BLOCKS_PER_CHUNK, dram_bytes=16 << 20)
    store = Store(engine_config(config, node_dir))
    assert store.stats().tiers[0].name == "remote"  # a client of the node process
    chunk_mover = ChunkMover(store, _paged(caches, page_bytes), BLOCKS_PER_CHUNK, (0, 1))
    yield chunk_mover, caches
    chunk_mover.close()
    store.close()


def _key(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=16).digest()


def _blocks(caches: dict[str, torch.Tensor], ids: list[int]) -> list[torch.Tensor]:
    return [caches[name][ids].clone() for name in LAYERS]


def _count_keys(monkeypatch: pytest.MonkeyPatch, store: object, method: str) -> list[int]:
    """The number of keys of each call to `store.method(keys, nbytes)` from now on."""
    counts: list[int] = []
    original = getattr(store, method)

    def counted(keys: list[bytes], nbytes: int) -> object:
        counts.append(len(keys))
        return original(keys, nbytes)

    monkeypatch.setattr(store, method, counted)
    return counts


def test_saved_chunks_load_back_into_other_blocks(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]], request: pytest.FixtureRequest
) -> None:
    """Chunks saved from blocks (0,1) and (2,3) load byte-exact into blocks (6,7) and,
    skipping the first block, (9,); no other block changes; both go through the node's
    shared DRAM in place (no PUT, no GET over the socket, no staging buffer)."""
    m, caches = mover
    keys = [_key(f"{request.node.name}-{i}") for i in range(2)]
    save = StepPlan(
        saves=[RequestJobs("a", [ChunkCopy(keys[0], (0, 1)), ChunkCopy(keys[1], (2, 3))])]
    )
    m.save(save)
    want = _blocks(caches, [0, 1, 2, 3])
    untouched = [i for i in range(NUM_BLOCKS) if i not in (6, 7, 9)]
    before = _blocks(caches, untouched)
    load = StepPlan(
        loads=[RequestJobs("b", [ChunkCopy(keys[0], (6, 7)), ChunkCopy(keys[1], (9,), 1)])]
    )
    m.load(load)
    m.finish_loads()
    assert not m.take_failed()
    got = _blocks(caches, [6, 7, 9])
    for layer in range(len(LAYERS)):
        assert torch.equal(got[layer][:2], want[layer][:2])
        assert torch.equal(got[layer][2], want[layer][3])
    for a, b in zip(_blocks(caches, untouched), before, strict=True):
        assert torch.equal(a, b)
    assert m.tally.drain()["saved_bytes"] == 2 * m.chunk_bytes
    for staging in (m._staging, m._async_staging):  # in place: no staging buffer allocated
        assert "tensor" not in vars(staging)


def test_a_steps_loads_arrive_layer_by_layer_and_are_released_after(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Layer-wise loading: `wait_for_layer(0)` returns once layer 0 is in while layer 1 is
    still being copied (held here at a gate); the chunks kvtier lent stay borrowed until
    `finish_loads`, which waits for every layer."""
    m, caches = mover
    keys = [_key(f"{request.node.name}-{i}") for i in range(2)]
    m.save(
        StepPlan(saves=[RequestJobs("a", [ChunkCopy(keys[0], (0, 1)), ChunkCopy(keys[1], (2, 3))])])
    )
    want = _blocks(caches, [0, 1, 2, 3])
    gate, copying = threading.Event(), m.pages.scatter_layer

    def gated(layer: int, idx: torch.Tensor, src: torch.Tensor) -> None:
        if layer == 1:
            gate.wait(10)
        copying(layer, idx, src)

    monkeypatch.setattr(m.pages, "scatter_layer", gated)
    released: list[bool] = []
    reading = m.store.reading

    @contextmanager
    def lent(ks: list[bytes], nbytes: int) -> Iterator[object]:
        with reading(ks, nbytes) as views:
            yield views
        released.append(True)

    monkeypatch.setattr(m.store, "reading", lent)
    m.load(
        StepPlan(loads=[RequestJobs("b", [ChunkCopy(keys[0], (6, 7)), ChunkCopy(keys[1], (8, 9))])])
    )
    m.wait_for_layer(0)
    got = _blocks(caches, [6, 7, 8, 9])
    assert torch.equal(got[0], want[0])  # layer 0 is in ...
    assert not torch.equal(got[1], want[1])  # ... layer 1 is not yet
    assert not released
    gate.set()
    m.wait_for_layer(len(LAYERS) - 1)
    assert not released  # lent until the step's loads are finished
    m.finish_loads()
    assert released == [True]
    got = _blocks(caches, [6, 7, 8, 9])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not m.take_failed()


def test_a_steps_saves_of_several_requests_take_one_reservation(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chunks two requests completed in one step are reserved and committed together
    (one PUT_LOCAL and one COMMIT round trip for the step, not two per request), and each
    loads back byte-exact; a chunk kvtier holds already is not copied again."""
    m, caches = mover
    keys = [_key(f"{request.node.name}-{i}") for i in range(3)]
    m.save(StepPlan(saves=[RequestJobs("x", [ChunkCopy(keys[2], (10, 11))])]))
    reservations = _count_keys(monkeypatch, m.store, "writing")
    m.save(
        StepPlan(
            saves=[
                RequestJobs("a", [ChunkCopy(keys[0], (0, 1)), ChunkCopy(keys[2], (4, 5))]),
                RequestJobs("b", [ChunkCopy(keys[1], (2, 3))]),
            ]
        )
    )
    assert reservations == [3]
    want = _blocks(caches, [0, 1, 2, 3, 10, 11])
    m.load(
        StepPlan(
            loads=[
                RequestJobs("c", [ChunkCopy(keys[0], (4, 5)), ChunkCopy(keys[2], (6, 7))]),
                RequestJobs("d", [ChunkCopy(keys[1], (8, 9))]),
            ]
        )
    )
    m.finish_loads()
    assert not m.take_failed()
    got = _blocks(caches, [4, 5, 8, 9, 6, 7])
    for layer in range(len(LAYERS)):
        assert torch.equal(got[layer], want[layer])
    # more chunks than a frame takes keys: reserved in frames of at most that many
    monkeypatch.setattr(worker, "MAX_KEYS", 2)
    more = [_key(f"{request.node.name}-more-{i}") for i in range(3)]
    reservations.clear()
    m.save(StepPlan(saves=[RequestJobs("e", [ChunkCopy(k, (2 * i, 2 * i + 1))
                                              for i, k in enumerate(more)])]))  # fmt: skip
    assert reservations == [2, 1]


def test_a_failed_load_drops_the_saves_of_its_step_and_the_next(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]], request: pytest.FixtureRequest
) -> None:
    """A step whose synchronous load failed computed over the unloaded blocks (its own
    request's, or another's sharing them through vLLM's prefix cache), and so did the next
    step under async scheduling: their saves are dropped and counted, as kvtier never
    overwrites a chunk it holds; the step after saves again."""
    m, _ = mover
    keys = [_key(f"{request.node.name}-{i}") for i in range(4)]
    lost = _key(f"{request.node.name}-never saved")

    def step(load: list[ChunkCopy], save: list[ChunkCopy]) -> None:
        plan = StepPlan(loads=[RequestJobs("a", load)], saves=[RequestJobs("b", save)])
        m.load(plan)
        m.save(plan)

    m.tally.drain()
    step([ChunkCopy(lost, (0, 1))], [ChunkCopy(keys[0], (2, 3))])
    assert m.take_failed() == {0, 1}
    step([], [ChunkCopy(keys[1], (4, 5)), ChunkCopy(keys[2], (6, 7))])
    assert m.store.locate(keys[:3]).chunks == 0
    step([], [ChunkCopy(keys[3], (8, 9))])
    assert m.store.locate(keys[3:]).chunks == 1
    tally = m.tally.drain()
    assert tally["skipped_saves"] == 3 and tally["failed_chunks"] == 1
    assert tally["saved_bytes"] == m.chunk_bytes


def test_another_ranks_failed_load_drops_this_ranks_saves_too(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]], request: pytest.FixtureRequest
) -> None:
    """With tensor parallelism the forward pass of every rank read one rank's unloaded
    blocks: a rank whose own load succeeded drops its saves when any rank's load failed."""
    m, _ = mover
    asked: list[bool] = []

    def any_rank(failed: bool) -> bool:
        asked.append(failed)
        return True  # another rank's load failed

    m._any_rank = any_rank
    keys = [_key(f"{request.node.name}-{i}") for i in range(2)]
    m.save(StepPlan(saves=[RequestJobs("a", [ChunkCopy(keys[0], (0, 1))])]))
    m.tally.drain()
    plan = StepPlan(loads=[RequestJobs("b", [ChunkCopy(keys[0], (4, 5))])],
                    saves=[RequestJobs("c", [ChunkCopy(keys[1], (6, 7))])])  # fmt: skip
    m.load(plan)
    m.save(plan)
    assert asked == [False] and not m.take_failed()
    assert m.store.locate(keys[1:]).chunks == 0
    assert m.tally.drain()["skipped_saves"] == 1
    m.load(StepPlan(loads=[RequestJobs("d", [ChunkCopy(keys[0], (8, 9))], async_load=True)]))
    m.wait_for_loads(60.0)
    assert asked == [False]  # background loads need no agreement: vLLM waits for them


def test_a_background_load_is_waited_for_and_reported(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]], request: pytest.FixtureRequest
) -> None:
    """An asynchronous load runs on the loader thread; `wait_for_loads` returns once it has
    ended, the request is then reported received and its blocks hold the chunk; with no
    load running it returns at once. A chunk kvtier lacks fails its blocks and the later
    chunk's, which is reported received all the same."""
    m, caches = mover
    key = _key(request.node.name)
    m.save(StepPlan(saves=[RequestJobs("a", [ChunkCopy(key, (0, 1))])]))
    want = _blocks(caches, [0, 1])
    m.load(StepPlan(loads=[RequestJobs("b", [ChunkCopy(key, (4, 5))], async_load=True)]))
    m.wait_for_loads(60.0)
    assert m.take_received() == {"b"}
    assert all(torch.equal(a, b) for a, b in zip(_blocks(caches, [4, 5]), want, strict=True))
    m.wait_for_loads(60.0)  # nothing running: returns at once
    lost = _key("never saved")
    job = RequestJobs("c", [ChunkCopy(key, (8, 9)), ChunkCopy(lost, (10, 11))], async_load=True)
    job.chunks.reverse()  # the missing chunk first: both fail
    m.load(StepPlan(loads=[job]))
    m.wait_for_loads(60.0)
    assert m.take_received() == {"c"}
    assert m.take_failed() == {8, 9, 10, 11}


def test_a_background_load_borrows_in_batches(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A background load borrows BACKGROUND_BYTES of chunks at a time (the node promotes
    each batch from its disk before it answers, within its reply timeout): here one chunk
    per batch. A chunk missing from the second batch fails its blocks and every later
    chunk's, which are not asked for; the first batch's chunk is loaded."""
    m, caches = mover
    monkeypatch.setattr(worker, "BACKGROUND_BYTES", m.chunk_bytes)
    keys = [_key(f"{request.node.name}-{i}") for i in range(3)]
    m.save(StepPlan(saves=[RequestJobs("a", [ChunkCopy(keys[0], (0, 1)),
                                             ChunkCopy(keys[2], (2, 3))])]))  # fmt: skip
    want = _blocks(caches, [0, 1])
    borrowed = _count_keys(monkeypatch, m.store, "reading")
    chunks = [ChunkCopy(keys[0], (4, 5)), ChunkCopy(keys[1], (6, 7)), ChunkCopy(keys[2], (8, 9))]
    m.load(StepPlan(loads=[RequestJobs("b", chunks, async_load=True)]))
    m.wait_for_loads(60.0)
    assert m.take_received() == {"b"}
    assert borrowed == [1, 1]
    assert m.take_failed() == {6, 7, 8, 9}
    assert all(torch.equal(a, b) for a, b in zip(_blocks(caches, [4, 5]), want, strict=True))


def test_an_empty_step_waits_for_its_background_load(
    model_dir: Path, node_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker-side connector, in a step where nothing computes (only a background load
    pending), returns from `get_finished` once that load has ended and reports the request
    received in that same step: the engine does not spin through empty steps meanwhile."""
    from kvtier.integrations.vllm import connector as connector_module
    from kvtier.integrations.vllm.connector import KvtierConnector, KvtierMetadata

    monkeypatch.setattr(connector_module, "IDLE_WAIT_S", 60.0)
    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    layout = KVCacheLayout["LBHNC"]
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NUM_BLOCKS, len(layers), layout)
    tensor = KVCacheTensor(
        spec.page_size_bytes * NUM_BLOCKS * 2, layers, layer_stride, block_stride
    )
    kv_cache = KVCacheConfig(NUM_BLOCKS, [tensor], [KVCacheGroupSpec(layers, spec)])
    caches = allocate_kv_cache(kv_cache, torch.device("cpu"), layout)
    for t in caches.values():
        t.copy_(torch.randn(t.shape))
    config = vllm_config(model_dir, node_dir, "idle-step", 96, None)
    worker = KvtierConnector(config, KVConnectorRole.WORKER, kv_cache)
    worker.register_kv_caches(caches)
    key = _key("idle step")

    def step(plan: StepPlan) -> set[str] | None:
        worker.bind_connector_metadata(KvtierMetadata(plan))
        worker.start_load_kv(None)  # type: ignore[arg-type]
        worker.wait_for_save()
        _, received = worker.get_finished(set())
        worker.clear_connector_metadata()
        return received

    assert step(StepPlan(saves=[RequestJobs("a", [ChunkCopy(key, (0, 1))])])) is None
    job = RequestJobs("b", [ChunkCopy(key, (4, 5))], async_load=True)
    assert step(StepPlan(loads=[job], idle=True)) == {"b"}
    for name in layers:
        assert torch.equal(caches[name][4:6], caches[name][0:2])
    worker.shutdown()


def test_tensor_parallel_ranks_agree_on_a_failed_load(node_dir: Path, tmp_path: Path) -> None:
    """Two ranks joined through vLLM's own process groups (gloo): rank 1's load fails (it
    never saved its shard) while rank 0's succeeds; through the real all-reduce both drop
    the saves of that step and the next one, and save again the step after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(TP_RANKS), str(rank), str(port), str(node_dir)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    try:
        deadline = time.monotonic() + 200
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one rank failed: the other would wait for it in gloo
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    results = {}
    for proc, log in zip(procs, logs, strict=True):
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, log.read_text()[-3000:]
        result = json.loads(lines[-1].removeprefix("RESULT "))
        results[result["rank"]] = result
    assert results[0]["failed"] == [[], [], []]
    assert results[1]["failed"] == [[4, 5], [], []]
    for rank in (0, 1):  # rank 0's own load succeeded: it drops its saves all the same
        assert results[rank]["skipped_saves"] == 2
        assert results[rank]["held"] == [0, 0, 1]


def test_whole_loads_are_timed_by_their_farthest_tier(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]], request: pytest.FixtureRequest
) -> None:
    """Each load that ends whole reports its seconds and blocks under the tier the plan
    names (the scheduler weighs them against recomputing); a load with a missing chunk
    reports none, in the step or in the background."""
    m, _ = mover
    key = _key(request.node.name)
    m.save(StepPlan(saves=[RequestJobs("a", [ChunkCopy(key, (0, 1))])]))
    m.tally.drain()
    m.load(StepPlan(loads=[RequestJobs("b", [ChunkCopy(key, (4, 5))])]))
    m.finish_loads()
    m.load(StepPlan(loads=[RequestJobs("c", [ChunkCopy(key, (6,), 1)], True, tier="disk")]))
    m.wait_for_loads(60.0)
    tally = m.tally.drain()
    assert tally["tier_load_blocks/dram"] == 2 and tally["tier_load_blocks/disk"] == 1
    assert tally["tier_load_seconds/dram"] > 0 and tally["tier_load_seconds/disk"] > 0
    lost = [ChunkCopy(key, (8, 9)), ChunkCopy(_key("never saved"), (10, 11))]
    m.load(StepPlan(loads=[RequestJobs("d", lost)]))
    m.finish_loads()
    m.load(StepPlan(loads=[RequestJobs("e", lost, async_load=True, tier="disk")]))
    m.wait_for_loads(60.0)
    assert m.take_failed() == {10, 11}
    assert not [name for name in m.tally.drain() if name.startswith("tier_load")]


def test_chunks_the_node_cannot_lend_are_read_through_staging(
    mover: tuple[ChunkMover, dict[str, torch.Tensor]],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunk the node holds but does not lend in place (its DRAM pinned full by the step's
    other chunks while it promotes from disk) is read through the staging buffer instead of
    failing, in the step and in the background; one no tier holds still fails with every
    later chunk of its request."""
    m, caches = mover
    keys = [_key(f"{request.node.name}-{i}") for i in range(2)]
    m.save(StepPlan(saves=[RequestJobs("a", [ChunkCopy(keys[0], (0, 1)),
                                             ChunkCopy(keys[1], (2, 3))])]))  # fmt: skip
    want = _blocks(caches, [0, 1, 2, 3])
    reading = m.store.reading

    @contextmanager
    def first_not_lent(keys: list[bytes], nbytes: int) -> Iterator[list[memoryview | None]]:
        with reading(keys, nbytes) as views:
            assert views is not None
            yield [None, *views[1:]]

    monkeypatch.setattr(m.store, "reading", first_not_lent)
    lost = _key("never saved")
    for async_load, blocks in ((False, [4, 5, 6, 7]), (True, [8, 9, 10, 11])):
        chunks = [ChunkCopy(keys[0], tuple(blocks[:2])), ChunkCopy(keys[1], tuple(blocks[2:]))]
        m.tally.drain()
        m.load(StepPlan(loads=[RequestJobs("b", chunks, async_load, tier="disk")]))
        m.finish_loads()
        m.wait_for_loads(60.0)
        assert not m.take_failed()
        got = _blocks(caches, blocks)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        # In the step, a chunk read through staging came from elsewhere than the lookup
        # said: no sample of the tier; a background load is one (its tier is not DRAM).
        assert m.tally.drain().get("tier_load_blocks/disk") == (4 if async_load else None)
    chunks = [ChunkCopy(lost, (4, 5)), ChunkCopy(keys[1], (6, 7))]
    m.load(StepPlan(loads=[RequestJobs("c", chunks)]))
    m.finish_loads()
    assert m.take_failed() == {4, 5, 6, 7}
