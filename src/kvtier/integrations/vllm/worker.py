"""The worker side of the connector: copies whole chunks between kvtier and vLLM's pages.

Loads are planned before the forward pass that needs them (vLLM calls `start_load_kv` first
when a step has loads): the step's chunks are borrowed from kvtier's DRAM in place (one
round trip to the node process for all of them), a chunk kvtier cannot serve marks its
blocks, and every later block of that request's load, as failed, so vLLM recomputes them,
and the rest are copied layer by layer (`loads.PageLoad`): the attention of layer `l`
waits for layer `l` only (`wait_for_layer`), so loading overlaps the forward. Saves copy the
pages of newly completed chunks into slots kvtier lends in its DRAM, in `wait_for_save`, at
the end of the step that computed them: once it returns the blocks may be freed or reused,
and the store writes its lower tiers in the background. GPU pages copy to and from that DRAM
directly (registered with CUDA, `hostmem.py`), on a copy stream that follows the compute
stream's queued work; where kvtier cannot lend (no DRAM tier on this host) a chunk goes
through a staging buffer instead, one at a time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, nullcontext
from functools import cached_property
from time import perf_counter as _now
from typing import NamedTuple

import torch

from kvtier.integrations.vllm.hostmem import HostMemory
from kvtier.integrations.vllm.loads import PageLoad
from kvtier.integrations.vllm.pages import PagedKV
from kvtier.integrations.vllm.plan import (
    ChunkCopy,
    RequestJobs,
    StepPlan,
    Tally,
    farthest,
    rank_keys,
)
from kvtier.integrations.vllm.tierchoice import LOAD_BLOCKS, LOAD_SECONDS
from kvtier.keys import Key
from kvtier.protocol import Limits
from kvtier.store import Store

log = logging.getLogger("kvtier.vllm")
MAX_KEYS = Limits().max_keys
BACKGROUND_BYTES = 64 << 20  # borrowed at a time by a background load (promoted from disk)
# Steps whose saves are dropped after a load of the engine's own step failed: that step's
# forward read the unloaded blocks (the failed request's, and any request's that shares
# them through vLLM's prefix cache), and with async scheduling so did the next step, planned
# before vLLM heard of the failure. vLLM rolls those requests back and recomputes; their
# chunks are saved once recomputed. A save kvtier already holds is never overwritten, so a
# chunk computed over garbage must never be saved.
SKIP_SAVE_STEPS = 2


Unlent = tuple[RequestJobs, Sequence[ChunkCopy]]  # a request's job, its chunks not lent


class StepLoads(NamedTuple):
    """A step's synchronous loads: requests, seconds to start them, farthest tier, blocks
    (0 when one failed: no sample of the tier then)."""

    requests: int
    started_s: float
    tier: str
    blocks: int


class ChunkMover:
    """Loads and saves chunks for one worker (one tensor-parallel rank)."""

    def __init__(
        self,
        store: Store,
        pages: PagedKV,
        blocks_per_chunk: int,
        tp: tuple[int, int],
        any_rank: Callable[[bool], bool] = lambda failed: failed,
        layerwise: bool = True,
    ) -> None:
        """`any_rank(failed)`: whether a synchronous load of this step failed on any tensor-
        parallel rank (a collective every rank calls in the same steps): after the all-reduce
        every rank's forward pass read the unloaded blocks of one. `layerwise`: the engine
        calls `wait_for_layer` before each layer's attention (else a step's loads are in
        before its forward starts)."""
        self.store = store
        self._any_rank = any_rank
        self.pages = pages
        self.tp_rank, self.tp_size = tp
        self.chunk_bytes = pages.block_bytes * blocks_per_chunk
        self._shape = (pages.num_layers, blocks_per_chunk, pages.page_bytes)  # (L, k, P)
        cuda = pages.device.type == "cuda"
        self._host = HostMemory(pages.device)
        self._staging = Staging(self._shape, pin=cuda)  # the engine thread's
        self._async_staging = Staging(self._shape, pin=cuda)  # the background loader's
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvtier-vllm-load")
        self._layer_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="kvtier-vllm-layers")
            if layerwise and not cuda
            else None
        )
        stream = torch.cuda.Stream
        self._copy_stream = stream(pages.device) if cuda else None  # type: ignore[no-untyped-call]
        self._stream = stream(pages.device) if cuda else None  # type: ignore[no-untyped-call]
        self._layerwise = layerwise
        self._warned = False  # a step's layers ran without their wait (logged once)
        self._step: PageLoad | None = None  # this step's synchronous loads
        self._step_requests = StepLoads(0, 0.0, "dram", 0)
        self.tally = Tally()
        self._failed: set[int] = set()
        self._received: set[str] = set()
        self._loading: set[Future[None]] = set()  # background loads not yet ended
        self._lock = threading.Lock()
        self._skip_saves = 0  # steps left whose saves are dropped (SKIP_SAVE_STEPS)

    def keys(self, chunks: Sequence[ChunkCopy]) -> list[Key]:
        return rank_keys([c.key for c in chunks], self.tp_rank, self.tp_size)

    def load(self, plan: StepPlan) -> None:
        """Start every planned load: the step's own in place, layer by layer (`wait_for_layer`,
        `finish_loads`), asynchronous ones in the background; failures are remembered by
        block."""
        self.finish_loads()  # the previous step's, if the engine skipped wait_for_save
        for job in plan.loads:
            if job.async_load:
                # The loader's stream starts after the work queued so far (nothing queued
                # later touches these blocks: the request is not scheduled until it ends).
                queued = None
                if self._stream is not None:
                    queued = torch.cuda.current_stream().record_event()
                future = self._loader.submit(self._load_in_background, job, queued)
                with self._lock:
                    self._loading.add(future)
                future.add_done_callback(self._loaded)
        jobs = [job for job in plan.loads if not job.async_load]
        if not jobs:
            return
        t0 = _now()
        failed, staged = self._start_step_loads(jobs)
        tier = farthest([job.tier for job in jobs])
        # A load that failed, or that the node lent only in part (the rest read from its
        # disk, whatever the lookup said), is no sample of its tier.
        whole = not failed and not staged
        blocks = sum(len(c.block_ids) for job in jobs for c in job.chunks) if whole else 0
        if self._step is not None:  # observed once the copies end
            self._step_requests = StepLoads(len(jobs), _now() - t0, tier, blocks)
        else:  # copied already (through the staging buffer), or nothing to copy
            for _ in jobs:
                self.tally.observe("request_load_seconds", _now() - t0)
            self._tier_sample(tier, blocks, _now() - t0)
        # Every rank has the same plan, so all of them ask here, in the same steps.
        if self._any_rank(failed):
            self._skip_saves = SKIP_SAVE_STEPS

    def _start_step_loads(self, jobs: Sequence[RequestJobs]) -> tuple[bool, bool]:
        """Borrow the step's chunks and start copying them; whether one could not be served,
        and whether the node lent some but not others (those came through the staging
        buffer, not from DRAM: the node had no room to promote them)."""
        cuda = self._copy_stream is not None
        after = torch.cuda.current_stream().record_event() if cuda else None
        thread = self._layer_thread
        started = self._start(jobs, self._copy_stream, after, thread)
        if started is None:  # kvtier cannot lend: through the staging buffer, chunk by chunk
            unlent: list[Unlent] = [(job, job.chunks) for job in jobs]
        else:
            self._step, unlent = started
        whole = self._read_unlent(unlent, self._staging)
        if self._step is not None and not self._layerwise:
            self._step.wait_all()
        return not whole, started is not None and bool(unlent)

    def _start(
        self,
        jobs: Sequence[RequestJobs],
        stream: torch.cuda.Stream | None,
        after: torch.cuda.Event | None,
        thread: ThreadPoolExecutor | None,
    ) -> tuple[PageLoad | None, list[Unlent]] | None:
        """The copies of `jobs` from chunks kvtier lends in place, started (None when it
        cannot lend), and the chunks it did not lend, by request: held nowhere, or not in
        DRAM at once with the rest (the node promotes from disk into a DRAM it may not
        have room in): the caller reads them through a staging buffer (`_read_unlent`)."""
        keys = [k for job in jobs for k in self.keys(job.chunks)]
        borrowed = ExitStack()
        try:
            views: list[memoryview | None] = []
            for i in range(0, len(keys), MAX_KEYS):  # a frame's key limit
                lent = borrowed.enter_context(
                    self.store.reading(keys[i : i + MAX_KEYS], self.chunk_bytes)
                )
                if lent is None:
                    borrowed.close()
                    return None
                views += lent
            copies, at = [], 0
            unlent: list[Unlent] = []
            for job in jobs:
                missing: list[ChunkCopy] = []
                for chunk, view in zip(job.chunks, views[at : at + len(job.chunks)], strict=True):
                    if view is None:
                        missing.append(chunk)
                    else:
                        copies.append((chunk, self._host.tensor(view, self._shape)))
                if missing:
                    unlent.append((job, missing))
                at += len(job.chunks)
            if not copies:
                borrowed.close()
                return None, unlent
            load = PageLoad(self.pages, copies, borrowed.close, stream, after, thread)
        except BaseException:
            if stream is not None:
                stream.synchronize()  # no copy may still read what is given back
            borrowed.close()
            raise
        self.tally.add("loaded_bytes", load.nbytes)
        return load, unlent

    def wait_for_layer(self, layer: int) -> None:
        """Before layer `layer`'s attention reads its pages: this step's loads of that layer
        are in (or, on a GPU, the compute stream waits for them)."""
        if self._step is not None:
            self._step.wait(layer)

    def finish_loads(self) -> None:
        """Wait for this step's loads to end and give kvtier its chunks back."""
        load, self._step = self._step, None
        if load is None:
            return
        load.finish()
        self.tally.add("load_seconds", load.seconds)
        requests, started_s, tier, blocks = self._step_requests
        for _ in range(requests):  # each request of the step waited for all of it
            self.tally.observe("request_load_seconds", started_s + load.seconds)
        self._tier_sample(tier, blocks, started_s + load.seconds)
        missed = self.pages.num_layers - len(load.waited)
        if self._layerwise and missed and not self._warned:
            self._warned = True  # the engine read those layers' pages without waiting
            log.warning(
                "kvtier: the engine ran %d of %d layers without wait_for_layer_load in a step "
                'with loads; set "layerwise": false in kv_connector_extra_config',
                missed, self.pages.num_layers,
            )  # fmt: skip

    def _loaded(self, future: Future[None]) -> None:
        with self._lock:
            self._loading.discard(future)

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block until a background load ends (or `timeout_s`); at once if none runs."""
        with self._lock:
            loading = set(self._loading)
        if loading:
            wait(loading, timeout_s, FIRST_COMPLETED)

    def _load_in_background(self, job: RequestJobs, queued: torch.cuda.Event | None) -> None:
        """A request's chunks kvtier holds on disk or a remote server, borrowed and copied
        BACKGROUND_BYTES at a time: the node promotes each batch into its DRAM before it
        answers, within its reply timeout (1 s: a disk reading 64 MB/s or more). A batch it
        cannot lend (or does not answer in time) sends the rest through the staging buffer."""
        t0 = _now()
        per = max(1, BACKGROUND_BYTES // self.chunk_bytes)
        i = 0
        whole = True  # every chunk loaded
        try:
            for i in range(0, len(job.chunks), per):
                batch = RequestJobs(job.req_id, job.chunks[i : i + per], async_load=True)
                started = self._start([batch], self._stream, queued, None)
                if started is None:  # kvtier cannot lend: the rest through the staging buffer
                    whole = self._load_through_staging([(job, job.chunks[i:])], queued)
                    break
                load, unlent = started
                if load is not None:  # its copies followed `queued` on the loader's stream
                    load.finish()
                    self.tally.add("load_seconds", load.seconds)
                    queued = None
                if unlent and not self._load_through_staging(unlent, queued):
                    # the rest of the request is recomputed from the first failure
                    whole = False
                    self._fail(job.chunks[i + per :])
                    break
                queued = None  # later batches follow on the same stream
        except Exception:
            whole = False
            log.exception("kvtier: a background load of %s failed", job.req_id)
            self._fail(job.chunks[i:])  # the batches before it are in
            raise
        finally:
            self.tally.observe("request_load_seconds", _now() - t0)
            if whole:
                self._tier_sample(job.tier, sum(len(c.block_ids) for c in job.chunks), _now() - t0)
            with self._lock:
                self._received.add(job.req_id)

    def _load_through_staging(self, unlent: list[Unlent], queued: torch.cuda.Event | None) -> bool:
        """`_read_unlent` on the loader's stream (after `queued`); False if a chunk failed."""
        gpu = self._stream is not None
        with torch.cuda.stream(self._stream) if gpu else nullcontext():
            if self._stream is not None and queued is not None:
                self._stream.wait_event(queued)
            whole = self._read_unlent(unlent, self._async_staging)
        if self._stream is not None:
            self._stream.synchronize()  # the pages are written before vLLM hears of it
        return whole

    def _read_unlent(self, unlent: list[Unlent], staging: Staging) -> bool:
        """Reads chunks through `staging`, one at a time, for each (request's job, its chunks
        to read); False if one failed: no tier served it, and it and every later chunk of
        its request are failed (vLLM recomputes from there)."""
        whole = True
        for job, chunks in unlent:
            for chunk, key in zip(chunks, self.keys(chunks), strict=True):
                t0 = _now()
                if self.store.read_chunk(key, [staging.view]) is None:
                    self._fail(job.chunks[job.chunks.index(chunk) :])
                    whole = False
                    break
                src = staging.tensor[
                    :, chunk.skip_blocks : chunk.skip_blocks + len(chunk.block_ids)
                ]
                self.pages.scatter(self.pages.index(chunk.block_ids), src)
                self.tally.add("loaded_bytes", self.pages.block_bytes * len(chunk.block_ids))
                self.tally.add("load_seconds", _now() - t0)
        return whole

    def _tier_sample(self, tier: str, blocks: int, seconds: float) -> None:
        """A load that ended whole: its seconds and blocks, charged to its farthest tier (the
        scheduler weighs each tier against recomputing: `tierchoice`); TP rank 0's only, so
        that the figures are one rank's, as `kvtier_vllm_load_seconds_total` exports them."""
        if blocks and self.tp_rank == 0:
            self.tally.add_all({LOAD_SECONDS + tier: seconds, LOAD_BLOCKS + tier: blocks})

    def _fail(self, chunks: Sequence[ChunkCopy]) -> None:
        self.tally.add("failed_chunks", len(chunks))
        with self._lock:
            self._failed |= {b for c in chunks for b in c.block_ids}

    def save(self, plan: StepPlan) -> None:
        """Copy the pages of every planned chunk into kvtier (lower tiers written later): the
        step's chunks of every request at once, so they take one PUT_LOCAL and one COMMIT
        round trip per step, not per request. Dropped for SKIP_SAVE_STEPS steps once a load
        of the engine's step failed."""
        if self._skip_saves:
            self._skip_saves -= 1
            self.tally.add("skipped_saves", sum(len(job.chunks) for job in plan.saves))
            return
        if not plan.saves:
            return
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
        cuda = self.pages.device.type == "cuda"
        with self.store.writing(keys, self.chunk_bytes) as slots:
            if slots is not None:
                try:
                    for chunk, slot in zip(chunks, slots, strict=True):
                        if slot is not None:  # None: kvtier holds it already
                            out = self._host.tensor(slot, self._shape)
                            self.pages.gather(self.pages.index(chunk.block_ids), out, cuda)
                finally:
                    if cuda:  # the copies (queued after the forward) end before the commit,
                        torch.cuda.current_stream().synchronize()  # or before an abort
                return sum(slot is not None for slot in slots)
        for chunk, key in zip(chunks, keys, strict=True):
            self.pages.gather(self.pages.index(chunk.block_ids), self._staging.tensor)
            self.store.write_chunk(key, [self._staging.view])
        return len(chunks)

    def wait_registered(self) -> None:
        """Until the kvtier DRAM seen so far is registered with CUDA (in the background; the
        copies before run at pageable speed)."""
        self._host.wait()

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
        self.finish_loads()
        self._loader.shutdown(wait=True)
        if self._layer_thread is not None:
            self._layer_thread.shutdown(wait=True)
        self._host.close()


class Staging:
    """A host buffer for one chunk, (L, k, P) bytes, and the byte view kvtier copies through;
    allocated when first used (only a store that cannot lend its DRAM uses it: on a GPU,
    the pinned memory of two chunks would otherwise be held for nothing)."""

    def __init__(self, shape: tuple[int, int, int], pin: bool) -> None:
        self._shape, self._pin = shape, pin

    @cached_property
    def tensor(self) -> torch.Tensor:
        return torch.empty(self._shape, dtype=torch.uint8, pin_memory=self._pin)

    @cached_property
    def view(self) -> memoryview:
        return memoryview(self.tensor.numpy()).cast("B")  # type: ignore[arg-type]
