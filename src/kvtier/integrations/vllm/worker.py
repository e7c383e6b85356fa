"""The worker side of the connector: copies whole chunks between kvtier and vLLM's pages.

Loads run before the forward pass that needs them (vLLM calls `start_load_kv` first when a
step has loads); a chunk kvtier cannot serve marks its blocks, and every later block of that
request's load, as failed, so vLLM recomputes them. Saves copy the pages of newly completed
chunks into kvtier in `wait_for_save`, at the end of the step that computed them: once it
returns the blocks may be freed or reused, and the store writes its lower tiers in the
background. CPU pages are gathered straight into the DRAM slots kvtier lends (the node
process's shared memory: one copy, two round trips per step); GPU pages through
a pinned staging buffer. Copies run on the engine's current stream, after the forward that
wrote the pages and before the one that reads them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from time import perf_counter as _now

import torch

from kvtier.integrations.vllm.pages import PagedKV
from kvtier.integrations.vllm.plan import ChunkCopy, RequestJobs, StepPlan, Tally, rank_keys
from kvtier.keys import Key
from kvtier.protocol import Limits
from kvtier.store import Store
from kvtier.tiers.base import copy_views

MAX_KEYS = Limits().max_keys
# Steps whose saves are dropped after a load of the engine's own step failed: that step's
# forward read the unloaded blocks (the failed request's, and any request's that shares
# them through vLLM's prefix cache), and with async scheduling so did the next step, planned
# before vLLM heard of the failure. vLLM rolls those requests back and recomputes; their
# chunks are saved once recomputed. A save kvtier already holds is never overwritten, so a
# chunk computed over garbage must never be saved.
SKIP_SAVE_STEPS = 2


class ChunkMover:
    """Loads and saves chunks for one worker (one tensor-parallel rank)."""

    def __init__(
        self,
        store: Store,
        pages: PagedKV,
        blocks_per_chunk: int,
        tp: tuple[int, int],
        any_rank: Callable[[bool], bool] = lambda failed: failed,
    ) -> None:
        """`any_rank(failed)`: whether a synchronous load of this step failed on any tensor-
        parallel rank (a collective every rank calls in the same steps): after the all-reduce
        every rank's forward pass read the unloaded blocks of one."""
        self.store = store
        self._any_rank = any_rank
        self.pages = pages
        self.tp_rank, self.tp_size = tp
        self.chunk_bytes = pages.block_bytes * blocks_per_chunk
        shape = (pages.num_layers, blocks_per_chunk, pages.page_bytes)  # (L, k, P)
        cuda = pages.device.type == "cuda"
        self._staging = Staging(shape, pin=cuda)  # the engine thread's
        self._async_staging = Staging(shape, pin=cuda)  # the background loader's
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvtier-vllm-load")
        self._stream = torch.cuda.Stream(pages.device) if cuda else None  # type: ignore[no-untyped-call]
        self.tally = Tally()
        self._failed: set[int] = set()
        self._received: set[str] = set()
        self._loading: set[Future[None]] = set()  # background loads not yet ended
        self._lock = threading.Lock()
        self._skip_saves = 0  # steps left whose saves are dropped (SKIP_SAVE_STEPS)

    def keys(self, chunks: Sequence[ChunkCopy]) -> list[Key]:
        return rank_keys([c.key for c in chunks], self.tp_rank, self.tp_size)

    def load(self, plan: StepPlan) -> None:
        """Copy every planned chunk into its blocks (asynchronous loads in the background);
        failures are remembered by block."""
        failed = False
        for job in plan.loads:
            if job.async_load:
                future = self._loader.submit(self._load_in_background, job)
                with self._lock:
                    self._loading.add(future)
                future.add_done_callback(self._loaded)
            elif not self._load_request(job, self._staging):
                failed = True
        # Every rank has the same plan, so all of them ask here, in the same steps.
        if any(not job.async_load for job in plan.loads) and self._any_rank(failed):
            self._skip_saves = SKIP_SAVE_STEPS

    def _loaded(self, future: Future[None]) -> None:
        with self._lock:
            self._loading.discard(future)

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block until a background load ends (or `timeout_s`); at once if none runs."""
        with self._lock:
            loading = set(self._loading)
        if loading:
            wait(loading, timeout_s, FIRST_COMPLETED)

    def _load_in_background(self, job: RequestJobs) -> None:
        try:
            stream = torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()
            with stream:
                self._load_request(job, self._async_staging)
            if self._stream is not None:
                self._stream.synchronize()  # the pages are written before vLLM hears of it
        except Exception:
            self._fail(job.chunks)
            raise
        finally:
            with self._lock:
                self._received.add(job.req_id)

    def _load_request(self, job: RequestJobs, staging: Staging) -> bool:
        """Loads a request's chunks; False if one failed (it and every later one are)."""
        t0 = _now()
        try:
            return self._load_chunks(job, staging)
        finally:
            self.tally.observe("request_load_seconds", _now() - t0)

    def _load_chunks(self, job: RequestJobs, staging: Staging) -> bool:
        keys = self.keys(job.chunks)
        if self.pages.device.type == "cpu":  # GPU pages are loaded through pinned staging
            with self.store.reading(keys, self.chunk_bytes) as views:
                if views is not None:
                    return self._scatter(job, views, staging)
        for i, (chunk, key) in enumerate(zip(job.chunks, keys, strict=True)):
            t0 = _now()
            tier = self.store.read_chunk(key, [staging.view])
            if tier is None:
                # vLLM recomputes from the first failed block; later chunks of this
                # request are not loaded (they would be recomputed anyway).
                self._fail(job.chunks[i:])
                return False
            src = staging.tensor[:, chunk.skip_blocks : chunk.skip_blocks + len(chunk.block_ids)]
            self.pages.scatter(self.pages.index(chunk.block_ids), src)
            self.tally.add("loaded_bytes", self.pages.block_bytes * len(chunk.block_ids))
            self.tally.add("load_seconds", _now() - t0)
        return True

    def _scatter(
        self, job: RequestJobs, views: Sequence[memoryview | None], staging: Staging
    ) -> bool:
        """Copy chunks kvtier lent in place into their blocks; from the first it could not
        serve on, the request's blocks are failed (and False returned)."""
        t0 = _now()
        loaded = True
        for i, (chunk, view) in enumerate(zip(job.chunks, views, strict=True)):
            if view is None:
                self._fail(job.chunks[i:])
                loaded = False
                break
            src = staging.over(view) if not view.readonly else staging.filled_from(view)
            end = chunk.skip_blocks + len(chunk.block_ids)
            self.pages.scatter(self.pages.index(chunk.block_ids), src[:, chunk.skip_blocks : end])
            self.tally.add("loaded_bytes", self.pages.block_bytes * len(chunk.block_ids))
        self.tally.add("load_seconds", _now() - t0)
        return loaded

    def _fail(self, chunks: Sequence[ChunkCopy]) -> None:
        self.tally.add("failed_chunks", len(chunks))
        with self._lock:
            self._failed |= {b for c in chunks for b in c.block_ids}

    def save(self, plan: StepPlan) -> None:
        """Copy the pages of every planned chunk into kvtier (lower tiers written later): the
        step's chunks of every request at once, so CPU pages take one PUT_LOCAL and one COMMIT
        round trip per step, not per request. Dropped for SKIP_SAVE_STEPS steps once a load
        of the engine's step failed."""
        if self._skip_saves:
            self._skip_saves -= 1
            self.tally.add("skipped_saves", sum(len(job.chunks) for job in plan.saves))
            return
        if not plan.saves:
            return
        if self.pages.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        t0 = _now()
        chunks = [c for job in plan.saves for c in job.chunks]
        saved = 0
        for i in range(0, len(chunks), MAX_KEYS):  # a frame's key limit
            saved += self._save_chunks(chunks[i : i + MAX_KEYS])
        self.tally.add("saved_bytes", self.chunk_bytes * saved)
        self.tally.add("save_seconds", _now() - t0)
        self.tally.observe("step_save_seconds", _now() - t0)

    def _save_chunks(self, chunks: Sequence[ChunkCopy]) -> int:
        """Copies chunks into kvtier; how many it took (not those it holds already)."""
        keys = self.keys(chunks)
        if self.pages.device.type == "cpu":  # GPU pages go through pinned staging
            with self.store.writing(keys, self.chunk_bytes) as slots:
                if slots is not None:
                    for chunk, slot in zip(chunks, slots, strict=True):
                        if slot is not None:  # None: kvtier holds it already
                            index = self.pages.index(chunk.block_ids)
                            self.pages.gather(index, self._staging.over(slot))
                    return sum(slot is not None for slot in slots)
        for chunk, key in zip(chunks, keys, strict=True):
            self.pages.gather(self.pages.index(chunk.block_ids), self._staging.tensor)
            self.store.write_chunk(key, [self._staging.view])
        return len(chunks)

    def take_failed(self) -> set[int]:
        """Block ids whose load failed since the last call."""
        with self._lock:
            failed, self._failed = self._failed, set()
        return failed

    def take_received(self) -> set[str]:
        """Requests whose background load ended (loaded or failed) since the last call; their
        failed blocks are in `take_failed` by then."""
        with self._lock:
            received, self._received = self._received, set()
        return received

    def close(self) -> None:
        self._loader.shutdown(wait=True)


class Staging:
    """A host buffer for one chunk, (L, k, P) bytes, and the byte view kvtier copies through."""

    def __init__(self, shape: tuple[int, int, int], pin: bool) -> None:
        self.shape = shape
        self.tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        self.view = memoryview(self.tensor.numpy()).cast("B")  # type: ignore[arg-type]

    def over(self, slot: memoryview) -> torch.Tensor:
        """A chunk-shaped tensor over a writable view kvtier lent (no copy)."""
        return torch.frombuffer(slot, dtype=torch.uint8).view(self.shape)

    def filled_from(self, view: memoryview) -> torch.Tensor:
        """This buffer, holding a copy of a read-only view (torch wants writable memory)."""
        copy_views([view], [self.view])
        return self.tensor
