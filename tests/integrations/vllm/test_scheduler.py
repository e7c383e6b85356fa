"""The connector's scheduler side inside vLLM's real Scheduler, with fake model output.

No model and no worker process: `FakeWorker` does what the workers would with each step's
plan (saves write a chunk into the node-local store, loads read it back, a lost chunk is
reported as failed blocks) and every request samples the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from kvtier.integrations.vllm import scheduler as scheduler_module
from kvtier.integrations.vllm import tierchoice
from kvtier.integrations.vllm.connector import KvtierConnector, KvtierMetadata
from kvtier.integrations.vllm.metrics import KvtierStats
from kvtier.integrations.vllm.node import stop_nodes
from kvtier.integrations.vllm.plan import ChunkCopy, StepPlan
from kvtier.integrations.vllm.tierchoice import STEP
from kvtier.keys import Key, chain_keys, root_key

BLOCK = 32
CHUNK = 64
BLOCKS_PER_CHUNK = CHUNK // BLOCK
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
SPEC = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
CHUNK_BYTES = len(LAYERS) * BLOCKS_PER_CHUNK * SPEC.page_size_bytes
EOS = 2
SAMPLED = 7  # the token every request samples


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=1024,
        eos_token_id=EOS,
    ).save_pretrained(path)
    init_none_hash(sha256)
    return path


def vllm_config(
    model_dir: Path,
    node_dir: Path,
    model_id: str,
    max_batched_tokens: int,
    load_async: bool | None,
) -> VllmConfig:
    model = ModelConfig(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=1024
    )
    scheduler = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=max_batched_tokens,
        max_model_len=1024,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
    )
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    cache.kv_cache_layout = "LBHNC"  # resolved before connectors are built, as in the engine
    transfer = KVTransferConfig(
        kv_connector="KvtierConnector",
        kv_connector_module_path="kvtier.integrations.vllm",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "chunk_tokens": CHUNK,
            "dram_bytes": "64MiB",
            "node_dir": str(node_dir),
            "model_id": model_id,
            "load_async": "auto" if load_async is None else load_async,
        },
    )
    return VllmConfig(
        model_config=model,
        scheduler_config=scheduler,
        cache_config=cache,
        kv_transfer_config=transfer,
        device_config=DeviceConfig("cpu"),
    )


@dataclass
class FakeWorker:
    """Carries out a step's plan against the store as the workers would: a chunk's payload
    is its key repeated, so a load checks it got the chunk it asked for."""

    connector: KvtierConnector
    lost: set[Key] = field(default_factory=set)  # chunks that fail to load
    dropped: set[Key] = field(default_factory=set)  # saves the store drops
    failed_loads: int = 0
    report: dict[str, float] = field(default_factory=dict)  # the next step's worker counters

    def run(self, plan: StepPlan) -> tuple[set[int], set[str]]:
        """Do the plan's loads, then its saves; the block ids whose load failed, and the
        requests whose asynchronous load ended (all of them end within the step here)."""
        failed: set[int] = set()
        received = {job.req_id for job in plan.loads if job.async_load}
        for job in plan.loads:
            for i, chunk in enumerate(job.chunks):
                if not self._load(chunk):
                    self.failed_loads += 1
                    failed |= {b for c in job.chunks[i:] for b in c.block_ids}
                    break
        store = self.connector.store
        for job in plan.saves:
            for chunk in job.chunks:
                if chunk.key not in self.dropped:
                    store.write_chunk(chunk.key, [memoryview(payload(chunk.key))])
        store.flush()
        return failed, received

    def _load(self, chunk: ChunkCopy) -> bool:
        if chunk.key in self.lost:
            return False
        buf = bytearray(CHUNK_BYTES)
        if self.connector.store.read_chunk(chunk.key, [memoryview(buf)]) is None:
            return False
        assert buf == payload(chunk.key)
        return True


def payload(key: Key) -> bytearray:
    return bytearray((key * (CHUNK_BYTES // len(key) + 1))[:CHUNK_BYTES])


@dataclass
class Step:
    output: SchedulerOutput
    plan: StepPlan
    tables: dict[str, list[int]]  # each scheduled request's block ids when planned


@dataclass
class Engine:
    scheduler: Scheduler
    worker: FakeWorker
    steps: list[Step] = field(default_factory=list)
    connector_stats: list[dict[str, float]] = field(default_factory=list)  # as vLLM logs them

    @property
    def connector(self) -> KvtierConnector:
        connector = self.scheduler.connector
        assert isinstance(connector, KvtierConnector)
        return connector

    def add(
        self, req_id: str, prompt: list[int], max_tokens: int, kv_params: Any = None
    ) -> Request:
        extra = None if kv_params is None else {"kv_transfer_params": kv_params}
        params = SamplingParams(max_tokens=max_tokens, extra_args=extra)
        params.update_from_generation_config({}, EOS)
        request = Request(
            request_id=req_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            pooling_params=None,
            block_hasher=get_request_block_hasher(BLOCK, sha256),
        )
        self.scheduler.add_request(request)
        return request

    def step(self) -> Step:
        """One engine step: schedule, run the plan, sample a token for every request that
        finished its prompt."""
        scheduler = self.scheduler
        output = scheduler.schedule()
        meta = output.kv_connector_metadata
        assert isinstance(meta, KvtierMetadata)
        plan = meta.plan
        manager = scheduler.kv_cache_manager
        tables = {r: list(manager.get_block_ids(r)[0]) for r in output.num_scheduled_tokens}
        failed, received = self.worker.run(plan)
        ids = list(output.num_scheduled_tokens)
        sampled = [[] if scheduler.requests[r].is_prefill_chunk else [SAMPLED] for r in ids]
        report = {STEP: plan.number, **self.worker.report}  # as TP rank 0's worker does
        result = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(
                invalid_block_ids=failed,
                finished_recving=received or None,
                kv_connector_stats=KvtierStats(data=report),
            ),
        )
        self.worker.report.clear()
        for outputs in scheduler.update_from_output(output, result).values():
            stats = outputs.scheduler_stats
            if stats is not None and stats.kv_connector_stats:
                self.connector_stats.append(stats.kv_connector_stats)
        step = Step(output, plan, tables)
        self.steps.append(step)
        return step

    def run(self, max_steps: int = 200) -> None:
        """Step until every request has finished."""
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise AssertionError(f"requests still running after {max_steps} steps")

    def keys(self, tokens: list[int]) -> list[Key]:
        """The chunk keys kvtier stores `tokens` under."""
        c = self.connector
        return chain_keys(root_key(c.model_id, c.fingerprint, CHUNK, None), tokens, CHUNK)


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the connectors start their node-local store process, stopped at the end."""
    path = tmp_path_factory.mktemp("node")
    yield path
    stop_nodes(path)


@pytest.fixture
def make_engine(
    model_dir: Path, node_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Engine]]:
    """Engines of one model; each test has its own model id, so its own chunk keys."""
    engines: list[Engine] = []

    def make(
        num_blocks: int = 64,
        max_batched_tokens: int = 96,
        load_async: bool | None = False,
        **node: Any,
    ) -> Engine:
        config = vllm_config(model_dir, node_dir, request.node.name, max_batched_tokens, load_async)
        assert config.kv_transfer_config is not None
        config.kv_transfer_config.kv_connector_extra_config.update(node)
        config.cache_config.num_gpu_blocks = num_blocks
        kv_cache = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(LAYERS, SPEC)],
        )
        scheduler = Scheduler(
            vllm_config=config,
            kv_cache_config=kv_cache,
            structured_output_manager=StructuredOutputManager(config),
            block_size=BLOCK,
            log_stats=True,
        )
        assert isinstance(scheduler.connector, KvtierConnector)
        engine = Engine(scheduler, FakeWorker(scheduler.connector))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.connector.shutdown()


def store_in_kvtier_only(engine: Engine, tokens: list[int]) -> list[Key]:
    """Run a request for `tokens` to the end, then empty vLLM's own prefix cache: only
    kvtier holds their KV. Returns their chunk keys."""
    engine.add("a", tokens, max_tokens=1)
    engine.run()
    assert engine.scheduler.reset_prefix_cache()
    return engine.keys(tokens)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(3, 512, n)]


def saved(engine: Engine, req_id: str) -> list[tuple[int, ChunkCopy]]:
    """(step, chunk) of every save planned for a request."""
    return [
        (i, chunk)
        for i, step in enumerate(engine.steps)
        for job in step.plan.saves
        if job.req_id == req_id
        for chunk in job.chunks
    ]


def computed_after(step: Step, req_id: str) -> int:
    """Tokens of a request that have KV once `step` has run."""
    out = step.output
    before = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
    cached = out.scheduled_cached_reqs
    before.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    return before[req_id] + out.num_scheduled_tokens[req_id]


def loaded(step: Step, req_id: str) -> list[ChunkCopy]:
    return [chunk for job in step.plan.loads if job.req_id == req_id for chunk in job.chunks]


def chunk_blocks(table: list[int], chunk: int) -> tuple[int, ...]:
    return tuple(table[chunk * BLOCKS_PER_CHUNK : (chunk + 1) * BLOCKS_PER_CHUNK])


def assert_plans_follow_block_tables(engine: Engine, requests: dict[str, Request]) -> None:
    """Every planned copy names the blocks that hold its chunk in the request's block table
    of that step, for a request scheduled in that step; no request saves a chunk twice."""
    for req_id, request in requests.items():
        keys = engine.keys(list(request.all_token_ids))
        for step in engine.steps:
            for job in step.plan.loads + step.plan.saves:
                if job.req_id != req_id:
                    continue
                assert req_id in step.output.num_scheduled_tokens
                for chunk in job.chunks:
                    blocks = chunk_blocks(step.tables[req_id], keys.index(chunk.key))
                    assert chunk.block_ids == blocks[chunk.skip_blocks :]
        saves = [chunk.key for _, chunk in saved(engine, req_id)]
        assert len(saves) == len(set(saves))


def assert_no_leaks(engine: Engine) -> None:
    """vLLM holds no request and no block, and the connector tracks no request."""
    scheduler = engine.scheduler
    assert not scheduler.requests and not scheduler.running
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block
    assert all(block.ref_cnt == 0 for block in pool.blocks[1:])
    assert engine.connector._planner is not None
    assert not engine.connector._planner._requests
    assert not engine.connector._planner._loading


def test_miss_saves_each_full_chunk_once_when_computed(make_engine: Callable[..., Engine]) -> None:
    """A miss saves every full chunk once, in the step that computes its last token (prompt
    chunks across chunked-prefill steps, then the output chunk decode completes); never a
    partial chunk."""
    engine = make_engine(max_batched_tokens=96)
    tokens = prompt(200)
    engine.add("a", tokens, max_tokens=60)  # 260 tokens: chunks end at 64, 128, 192, 256
    engine.run()

    keys = engine.keys(tokens + [SAMPLED] * 60)
    assert len(keys) == 4
    saves = saved(engine, "a")
    assert [chunk.key for _, chunk in saves] == keys
    for index, (i, chunk) in enumerate(saves):
        end = (index + 1) * CHUNK
        before = computed_after(engine.steps[i - 1], "a") if i else 0
        assert before < end <= computed_after(engine.steps[i], "a")
        assert chunk.block_ids == chunk_blocks(engine.steps[i].tables["a"], index)
        assert chunk.skip_blocks == 0
    assert [i for i, _ in saves[:3]] == [0, 1, 1]  # chunked prefill: 96, 96, 8 tokens
    assert not any(step.plan.loads for step in engine.steps)
    assert engine.connector.store.locate(keys).chunks == 4
    assert_no_leaks(engine)


@pytest.mark.parametrize(("length", "hit_chunks"), [(200, 3), (128, 1)])
def test_hit_loads_whole_chunks_but_never_the_last_token(
    make_engine: Callable[..., Engine], length: int, hit_chunks: int
) -> None:
    """A prompt kvtier holds (and vLLM's prefix cache does not) claims its whole chunks short
    of its last token and loads them into the request's first blocks; no chunk kvtier holds
    is saved again, not even the one recomputed for the last token."""
    engine = make_engine()
    tokens = prompt(length)
    keys = store_in_kvtier_only(engine, tokens)
    assert engine.connector.store.locate(keys).chunks == length // CHUNK

    engine.add("b", tokens, max_tokens=2)
    first = engine.step()
    table = first.tables["b"]
    expected = [ChunkCopy(keys[i], chunk_blocks(table, i)) for i in range(hit_chunks)]
    assert loaded(first, "b") == expected
    assert first.output.scheduled_new_reqs[0].num_computed_tokens == hit_chunks * CHUNK
    assert first.output.num_scheduled_tokens["b"] == length - hit_chunks * CHUNK
    engine.run()
    assert saved(engine, "b") == []
    assert sum(len(loaded(step, "b")) for step in engine.steps) == hit_chunks
    assert_no_leaks(engine)


def test_stats_count_lookups_and_hit_tokens_by_tier(make_engine: Callable[..., Engine]) -> None:
    """The scheduler side reports each admitted request once, and the tokens kvtier supplied
    beyond vLLM's own hit under the tier that holds them (the node process's DRAM)."""
    engine = make_engine()
    tokens = prompt(200)
    store_in_kvtier_only(engine, tokens)
    first = len(engine.connector_stats)
    engine.add("x", tokens[:72], max_tokens=1)  # vLLM's own cache then holds 64 tokens
    engine.run()
    engine.add("b", tokens, max_tokens=1)
    engine.run()
    stats = KvtierStats()
    for data in engine.connector_stats[first:]:
        stats.aggregate(KvtierConnector.build_kv_connector_stats(data))
    counted = {k: v for k, v in stats.data.items() if k != STEP}  # plan numbers, summed
    assert counted == {"lookups": 2, "hit_tokens/dram": 64 + 2 * CHUNK}
    assert stats.reduce()["hit_tokens"] == 64 + 2 * CHUNK


@pytest.mark.parametrize("local_tokens", [32, 96])
def test_local_prefix_hit_inside_a_chunk_loads_only_its_remaining_blocks(
    make_engine: Callable[..., Engine], local_tokens: int
) -> None:
    """When vLLM's own prefix cache holds the head of a chunk kvtier holds, the load skips
    the blocks vLLM has and fills only the rest of that chunk, then whole chunks."""
    engine = make_engine()
    tokens = prompt(200)
    keys = store_in_kvtier_only(engine, tokens)
    engine.add("x", tokens[: local_tokens + 8], max_tokens=1)  # leaves local_tokens cached
    engine.run()

    engine.add("b", tokens, max_tokens=2)
    first = engine.step()
    table = first.tables["b"]
    assert first.output.scheduled_new_reqs[0].num_computed_tokens == 3 * CHUNK
    head = local_tokens // CHUNK
    skip = (local_tokens % CHUNK) // BLOCK
    expected = [ChunkCopy(keys[head], chunk_blocks(table, head)[skip:], skip)]
    expected += [ChunkCopy(keys[i], chunk_blocks(table, i)) for i in range(head + 1, 3)]
    assert loaded(first, "b") == expected
    engine.run()
    assert saved(engine, "b") == []
    assert_no_leaks(engine)


def test_load_error_rolls_back_to_the_failed_chunk_and_recomputes(
    make_engine: Callable[..., Engine],
) -> None:
    """A chunk the workers cannot load fails its blocks and every later loaded block; vLLM
    (kv_load_failure_policy="recompute") rolls the request back to the failed chunk's first
    token, recomputes from there and completes it; the recomputed chunks are saved again."""
    engine = make_engine()
    tokens = prompt(200)
    keys = store_in_kvtier_only(engine, tokens)

    engine.worker.lost = {keys[1]}
    request = engine.add("b", tokens, max_tokens=3)
    first = engine.step()
    assert [c.key for c in loaded(first, "b")] == keys[:3]
    assert request.num_computed_tokens == CHUNK  # rolled back to chunk 1's first token
    assert request.num_output_tokens == 0  # the failed step's sample is dropped
    second = engine.step()
    assert second.output.num_scheduled_tokens["b"] == 96  # recomputes tokens 64..159
    assert loaded(second, "b") == []
    engine.run()
    assert request.is_finished() and request.num_output_tokens == 3
    assert [copy.key for _, copy in saved(engine, "b")] == keys[1:3]
    assert_plans_follow_block_tables(engine, {"b": request})
    assert_no_leaks(engine)


def test_async_load_parks_the_request_until_the_workers_report_it(
    make_engine: Callable[..., Engine],
) -> None:
    """With load_async, a hit parks the request (no tokens scheduled) while the workers load
    in the background; once they report it received, it computes only its last token(s).
    It is one lookup in the stats, though vLLM tells of its blocks twice."""
    engine = make_engine(load_async=True)
    tokens = prompt(200)
    keys = store_in_kvtier_only(engine, tokens)
    stats_before = len(engine.connector_stats)

    request = engine.add("b", tokens, max_tokens=2)
    first = engine.step()
    assert "b" not in first.output.num_scheduled_tokens
    (job,) = first.plan.loads
    assert job.async_load and [c.key for c in job.chunks] == keys[:3]
    assert first.plan.idle  # nothing computes: the workers may wait for the load
    second = engine.step()
    assert second.output.num_scheduled_tokens["b"] == 200 - 3 * CHUNK
    assert not second.plan.idle
    assert loaded(second, "b") == []
    engine.run()
    assert request.is_finished() and request.num_output_tokens == 2
    assert saved(engine, "b") == []
    stats = KvtierStats()
    for data in engine.connector_stats[stats_before:]:
        stats.aggregate(KvtierConnector.build_kv_connector_stats(data))
    assert stats.data["lookups"] == 1
    assert_no_leaks(engine)


def test_failed_async_load_is_recomputed_and_saved_again(
    make_engine: Callable[..., Engine],
) -> None:
    """A background load that fails is reported with its request; vLLM recomputes from the
    failed chunk, and the recomputed chunks are saved again."""
    engine = make_engine(load_async=True)
    tokens = prompt(200)
    keys = store_in_kvtier_only(engine, tokens)

    engine.worker.lost = {keys[2]}
    request = engine.add("b", tokens, max_tokens=2)
    engine.run()
    assert request.is_finished() and request.num_output_tokens == 2
    assert [copy.key for _, copy in saved(engine, "b")] == keys[2:3]
    assert_no_leaks(engine)


def test_preempted_request_resumes_from_what_kvtier_holds(
    make_engine: Callable[..., Engine],
) -> None:
    """A request preempted for lack of blocks, whose cached blocks are then reused, resumes
    by loading the leading chunks kvtier holds (not every chunk it saved: the store dropped
    one) into its new blocks; no copy names a block it no longer holds, and no chunk is
    saved twice."""
    engine = make_engine(num_blocks=13, max_batched_tokens=512)  # 12 usable blocks
    a = engine.add("a", prompt(64, seed=1), max_tokens=300)  # grows into b's blocks
    b = engine.add("b", prompt(200, seed=2), max_tokens=100)
    dropped = engine.keys(list(b.prompt_token_ids))[2]
    engine.worker.dropped = {dropped}
    engine.run(max_steps=1000)

    outputs = [step.output for step in engine.steps]
    preempted = [i for i, out in enumerate(outputs) if "b" in out.preempted_req_ids]
    cached = [out.scheduled_cached_reqs for out in outputs]
    resumed = [i for i, reqs in enumerate(cached) if "b" in reqs.resumed_req_ids]
    assert len(preempted) == len(resumed) == 1 and preempted[0] < resumed[0]
    keys = engine.keys(list(b.all_token_ids))
    saves = saved(engine, "b")
    assert [c.key for i, c in saves if i < preempted[0]] == keys[:4]  # 3 prompt, 1 decoded
    step = engine.steps[resumed[0]]
    table = step.tables["b"]
    assert loaded(step, "b") == [ChunkCopy(keys[i], chunk_blocks(table, i)) for i in range(2)]
    assert computed_after(step, "b") - step.output.num_scheduled_tokens["b"] == 2 * CHUNK
    assert engine.worker.failed_loads == 0
    assert [c.key for i, c in saves if i >= preempted[0]] == []  # a later request saves chunk 2
    assert a.is_finished() and b.is_finished() and b.num_output_tokens == 100
    assert_plans_follow_block_tables(engine, {"a": a, "b": b})
    assert_no_leaks(engine)


def test_aborted_requests_leave_nothing_tracked(make_engine: Callable[..., Engine]) -> None:
    """Aborting a running request and a waiting one that was looked up (then found no free
    blocks) leaves vLLM and the connector holding nothing."""
    engine = make_engine(num_blocks=8, max_batched_tokens=512)  # 7 usable blocks
    engine.add("a", prompt(200, seed=3), max_tokens=50)  # takes all 7
    engine.add("b", prompt(100, seed=4), max_tokens=5)
    engine.step()
    engine.step()
    assert engine.connector._planner is not None
    assert set(engine.connector._planner._requests) == {"a", "b"}
    assert [r.request_id for r in engine.scheduler.running] == ["a"]
    engine.scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(engine)


def test_a_request_asking_for_a_pin_has_its_prompt_chunks_pinned_in_the_node(
    make_engine: Callable[..., Engine],
) -> None:
    """`kv_transfer_params: {"kvtier_pin": true}` pins the prompt's full chunks in the node
    when the request finishes (the node then holds pins on exactly them); a request without
    it pins nothing; the pinned tokens are counted in the connector's stats."""
    engine = make_engine()
    pinned, plain = prompt(200, seed=11), prompt(200, seed=12)
    engine.add("p", pinned, max_tokens=2, kv_params={"kvtier_pin": True})
    engine.add("q", plain, max_tokens=2)
    engine.run()
    store = engine.connector.store
    assert store.unpin_keys(engine.keys(plain)) == 0
    assert store.unpin_keys(engine.keys(pinned)) == 200 // CHUNK  # the pin was there
    assert store.unpin_keys(engine.keys(pinned)) == 0
    stats = KvtierStats()
    for data in engine.connector_stats:
        stats.aggregate(KvtierConnector.build_kv_connector_stats(data))
    assert stats.reduce()["pinned_tokens"] == 200 // CHUNK * CHUNK
    assert_no_leaks(engine)


@pytest.mark.parametrize("reuse_s", [60.0, 0.0])
def test_a_waiting_request_is_looked_up_once_while_its_lookup_is_fresh(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch, reuse_s: float
) -> None:
    """vLLM asks about a request waiting for blocks at every step; while the last answer is
    fresh no round trip goes to the store (with no reuse, every step asks), and once
    admitted it loads what that answer claimed."""
    monkeypatch.setattr(scheduler_module, "LOOKUP_REUSE_S", reuse_s)
    engine = make_engine(num_blocks=9, max_batched_tokens=512)  # 8 usable blocks
    tokens = prompt(200, seed=5)
    store_in_kvtier_only(engine, tokens)
    engine.add("c", prompt(100, seed=6), max_tokens=100)  # holds the blocks for a while
    engine.step()
    store = engine.connector.store
    asked = []
    real = store.locate
    monkeypatch.setattr(store, "locate", lambda keys: asked.append(len(keys)) or real(keys))
    b = engine.add("b", tokens, max_tokens=1)
    waited = 0
    while not any("b" in step.output.num_scheduled_tokens for step in engine.steps[-1:]):
        engine.step()
        waited += 1
    assert waited > 3  # b waited several steps for blocks
    assert len(asked) == (1 if reuse_s else waited)
    assert len(loaded(engine.steps[-1], "b")) == 3  # the whole chunks kvtier holds
    engine.run(max_steps=1000)
    assert b.is_finished() and engine.worker.failed_loads == 0
    assert_no_leaks(engine)


def test_auto_loads_dram_hits_now_and_disk_hits_in_the_background(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """With `load_async: auto` a hit whose chunks are all in the node's DRAM loads before the
    forward pass of the step that admits it; one with a chunk only on the node's disk parks
    the request while the workers load it if other requests are running (and loads at once
    if none is); hit tokens are counted by the tier that holds them."""
    engine = make_engine(
        load_async=None, dram_bytes=f"{8 * CHUNK_BYTES}", disk_dir=str(tmp_path), disk_bytes="64MiB"
    )
    tokens = prompt(200, seed=7)
    keys = store_in_kvtier_only(engine, tokens)
    engine.add("near", tokens, max_tokens=1)
    step = engine.step()
    (job,) = step.plan.loads
    assert not job.async_load and "near" in step.output.num_scheduled_tokens
    engine.run()

    def push_out(seeds: range) -> None:  # 4 x 3 new chunks push the first three out of DRAM
        engine.scheduler.reset_prefix_cache()
        for seed in seeds:
            engine.add(f"other{seed}", prompt(200, seed=seed), max_tokens=1)
            engine.run()
            engine.scheduler.reset_prefix_cache()
        assert engine.connector.store.locate(keys).tiers[:3] == ("disk",) * 3

    push_out(range(100, 104))
    engine.add("alone", tokens, max_tokens=1)
    step = engine.step()
    (job,) = step.plan.loads
    assert not job.async_load and "alone" in step.output.num_scheduled_tokens
    engine.run()
    push_out(range(200, 204))
    first = len(engine.connector_stats)
    engine.add("busy", prompt(40, seed=13), max_tokens=20)
    engine.step()
    engine.add("far", tokens, max_tokens=1)
    step = engine.step()
    (job,) = step.plan.loads
    assert job.async_load and "far" not in step.output.num_scheduled_tokens
    assert "busy" in step.output.num_scheduled_tokens
    engine.run()
    stats = KvtierStats()
    for data in engine.connector_stats[first:]:
        stats.aggregate(KvtierConnector.build_kv_connector_stats(data))
    assert stats.data["hit_tokens/disk"] == 3 * CHUNK
    assert engine.worker.failed_loads == 0
    assert_no_leaks(engine)


def _on_disk_only(engine: Engine, tokens: list[int]) -> None:
    """`tokens` run once, then pushed out of vLLM's cache and kvtier's DRAM by others: kvtier
    holds their first three chunks on disk only."""
    keys = store_in_kvtier_only(engine, tokens)
    for seed in range(100, 104):  # 4 x 3 new chunks push the first three out of DRAM
        engine.add(f"other{seed}", prompt(200, seed=seed), max_tokens=1)
        engine.run()
        engine.scheduler.reset_prefix_cache()
    assert engine.connector.store.locate(keys).tiers[:3] == ("disk",) * 3


def test_by_default_a_tier_measured_slower_than_recomputing_is_left_out(
    make_engine: Callable[..., Engine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`load_tiers: auto` (the default): the connector times this engine's prefill steps and
    the loads its workers report by tier. Once the disk reports loads slower than
    recomputing, a prompt kvtier holds on disk only is computed whole (counted as
    `slow_tier_tokens`, and reported as `left_out/disk`); PROBE_S after that measurement
    it is loaded from disk again."""
    engine = make_engine(
        load_async=None, dram_bytes=f"{8 * CHUNK_BYTES}", disk_dir=str(tmp_path),
        disk_bytes="64MiB",
    )  # fmt: skip
    tokens = prompt(200, seed=7)
    _on_disk_only(engine, tokens)
    choice = engine.connector._planner.tiers  # type: ignore[union-attr]
    assert choice.compute_s_per_token is not None  # from the steps so far
    engine.worker.report.update({"tier_load_seconds/disk": 60.0, "tier_load_blocks/disk": 1})
    engine.add("tick", prompt(10, seed=1), max_tokens=1)
    engine.run()  # its output carries the report
    assert choice.slower_than_compute("disk")
    assert engine.connector_stats[-1].get("left_out/disk") == 1  # the gauge follows it
    first = len(engine.connector_stats)
    engine.add("slow", tokens, max_tokens=1)
    engine.run()
    assert not [job for s in engine.steps for job in s.plan.loads if job.req_id == "slow"]
    assert not saved(engine, "slow")  # kvtier holds them (on disk)
    stats = KvtierStats()
    for data in engine.connector_stats[first:]:
        stats.aggregate(KvtierConnector.build_kv_connector_stats(data))
    assert stats.reduce()["slow_tier_tokens"] == 3 * CHUNK
    engine.scheduler.reset_prefix_cache()
    monkeypatch.setattr(tierchoice, "PROBE_S", 0.0)
    engine.add("probe", tokens, max_tokens=1)
    engine.run()
    (job,) = [job for s in engine.steps for job in s.plan.loads if job.req_id == "probe"]
    assert len(job.chunks) == 3 and job.tier == "disk"
    assert engine.worker.failed_loads == 0
    assert_no_leaks(engine)


def test_load_tiers_leaves_a_slow_tiers_chunks_to_be_recomputed(
    make_engine: Callable[..., Engine], tmp_path: Path
) -> None:
    """With `load_tiers: dram` (a disk slower than recomputing), a prompt whose chunks are on
    the node's disk only is not loaded: vLLM computes it whole, and kvtier, which holds those
    chunks, does not save them again."""
    engine = make_engine(
        load_async=None, dram_bytes=f"{8 * CHUNK_BYTES}", disk_dir=str(tmp_path),
        disk_bytes="64MiB", load_tiers="dram",
    )  # fmt: skip
    tokens = prompt(200, seed=7)
    _on_disk_only(engine, tokens)
    engine.add("slow", tokens, max_tokens=1)
    step = engine.step()
    assert not step.plan.loads and "slow" in step.output.num_scheduled_tokens
    engine.run()
    assert not [job for s in engine.steps for job in s.plan.loads if job.req_id == "slow"]
    assert not saved(engine, "slow")  # kvtier holds them (on disk)
    assert engine.worker.failed_loads == 0
    assert_no_leaks(engine)
