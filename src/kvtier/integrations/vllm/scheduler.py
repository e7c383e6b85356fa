"""The scheduler side of the connector: which chunks each step loads and saves.

- `matched`: how many tokens beyond vLLM's own (block-aligned) prefix-cache hit kvtier holds,
  in whole chunks, never the last prompt token.
- `allocated`: vLLM gave the request blocks for them; the next plan loads them.
- `plan`: this step's loads, and saves of every chunk completed by the tokens this step
  computes (prompt and output alike), each chunk saved once per request.
Requests with multimodal inputs or prompt embeddings bypass kvtier: their token ids do not
determine their KV.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from kvtier.errors import KvtierError
from kvtier.integrations.vllm.plan import (
    HIT_PREFIX,
    ChunkCopy,
    Geometry,
    KeyChain,
    RequestJobs,
    StepPlan,
    Tally,
    farthest,
    rank_keys,
)
from kvtier.integrations.vllm.tierchoice import LEFT_OUT, TierChoice
from kvtier.keys import Key, root_key, salt_bytes
from kvtier.store import Store


class Request(Protocol):
    """The parts of vLLM's `Request` the scheduler side reads."""

    request_id: str
    cache_salt: str | None

    @property
    def all_token_ids(self) -> Sequence[int]: ...
    @property
    def num_tokens(self) -> int: ...


log = logging.getLogger("kvtier.vllm")
LOOKUP_REUSE_S = 1.0  # vLLM asks again every step while a request waits for blocks
SYNC_REPORT_PLANS = 3  # plans a synchronous load's report may lag (async scheduling: 1)


@dataclass(frozen=True, slots=True)
class Lookup:
    """One lookup's answer: of the first `chunks` chunks, the leading `hit` are held."""

    chunks: int
    hit: int
    tiers: tuple[str, ...]
    at: float  # time.monotonic()


class SavedChunks(NamedTuple):
    """Chunks `first` to `end` - 1 of a request, planned for saving."""

    request: Any
    first: int
    end: int


class PlannedLoad(NamedTuple):
    """A load in a plan: its request's first chunk loaded, the jobs, the plan's number."""

    first_chunk: int
    jobs: RequestJobs
    plan: int


@dataclass(slots=True)
class Tracked:
    request: Any
    chain: KeyChain
    stored: int = 0  # leading chunks kvtier holds or this request has saved
    claimed: int = 0  # leading chunks the last lookup offered vLLM
    load_from: int | None = None  # first token of a pending load
    tiers: tuple[str, ...] = ()  # the tier of each claimed chunk, at lookup
    lookup: Lookup | None = None  # the last one, reused while the request waits
    async_load: bool = False  # the pending load runs in the background
    recomputed: int = 0  # tokens the last lookup left to vLLM for their tier's slowness


class ChunkPlanner:
    """Scheduler-side state of every live request; not thread-safe (vLLM's scheduler is one
    thread)."""

    def __init__(
        self,
        store: Store,
        geometry: Geometry,
        model_id: str,
        fingerprint: str,
        tp_size: int,
        block_table: Callable[[str], Sequence[int]],
        load_async: bool | None = None,
        load_tiers: frozenset[str] | None = None,
        record_saves: bool = False,
    ) -> None:
        """`load_tiers`: the tiers chunks are loaded from (None: each tier while it loads
        faster than this engine recomputes, `tierchoice`); a hit stops at the first chunk
        held only elsewhere, and the rest is recomputed. `record_saves`: keep every planned
        save for `take_saved` (the connector's KV events)."""
        self.store = store
        self.geometry = geometry
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.tp_size = tp_size
        self._block_table = block_table
        self.load_async = load_async
        self.tiers = TierChoice(geometry.block_size, geometry.chunk_tokens, load_tiers)
        self._requests: dict[str, Tracked] = {}
        # loads planned, by request; a synchronous one is kept for SYNC_REPORT_PLANS plans,
        # as its failure may be reported that late
        self._loading: dict[str, PlannedLoad] = {}
        self._plans = 0
        self._running: set[str] = set()  # the last plan's batch, less requests finished since
        self._saved: list[SavedChunks] | None = [] if record_saves else None
        self.tally = Tally()

    # -- vLLM hooks ---------------------------------------------------------------------

    def matched(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond `num_computed_tokens` that kvtier can supply (whole chunks), and
        whether to load them in the background: with `load_async` None (auto) when any of
        them is not in DRAM (the node's disk, a remote server) and other requests are
        running, so the request waits while they run instead of the whole batch waiting for
        its I/O (with nothing else to run, a background load only adds an engine step)."""
        tracked = self._track(request)
        if tracked is None:
            return 0, False
        c = self.geometry.chunk_tokens
        hit, tiers = self._lookup(tracked, request.num_tokens // c)
        tracked.stored = max(tracked.stored, hit)  # a full chunk kvtier holds is not saved again
        loadable = min(hit, self.geometry.loadable_chunks(request.num_tokens))
        first = num_computed_tokens // c  # vLLM holds the chunks before it
        allowed = self.tiers.allowed(tiers[first:loadable])
        cut = next((i for i in range(first, loadable) if tiers[i] not in allowed), None)
        tracked.claimed = loadable if cut is None else cut  # a slow tier's are recomputed
        tracked.recomputed = (loadable - tracked.claimed) * c
        tracked.tiers = tiers[: tracked.claimed]
        tokens = max(tracked.claimed * c - num_computed_tokens, 0)
        loading = tracked.tiers[num_computed_tokens // c :]
        others = bool(self._running - {request.request_id})
        slow = others and any(tier != "dram" for tier in loading)
        tracked.async_load = tokens > 0 and (slow if self.load_async is None else self.load_async)
        return tokens, tracked.async_load

    def allocated(self, request: Any, num_external_tokens: int) -> None:
        """vLLM allocated blocks for `num_external_tokens` loaded tokens."""
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            return
        if tracked.lookup is not None:  # not again when an async load has ended
            self.tally.add("lookups")
            if tracked.recomputed:
                self.tally.add("slow_tier_tokens", tracked.recomputed)
        tracked.lookup = None  # admitted: a later lookup (after preemption) asks afresh
        if num_external_tokens <= 0:
            return
        self._count_hits(tracked, num_external_tokens)
        tracked.load_from = tracked.claimed * self.geometry.chunk_tokens - num_external_tokens

    def plan(
        self,
        scheduled: Iterable[tuple[str, int]],
        finished: Iterable[str],
    ) -> StepPlan:
        """This step's copies. `scheduled`: (request id, tokens computed once this step
        has run) for every request in the batch."""
        self._plans += 1
        step = StepPlan(number=self._plans)
        for req_id, load in list(self._loading.items()):
            if not load.jobs.async_load and self._plans - load.plan >= SYNC_REPORT_PLANS:
                del self._loading[req_id]
        for loading in self._requests.values():
            if loading.load_from is not None:
                jobs = self._load_jobs(loading)
                first = loading.load_from // self.geometry.chunk_tokens
                self._loading[jobs.req_id] = PlannedLoad(first, jobs, self._plans)
                step.loads.append(jobs)
                loading.load_from = None
        self._running = set()
        for req_id, computed in scheduled:
            self._running.add(req_id)
            tracked = self._requests.get(req_id)
            if tracked is not None and _bypasses(tracked.request):  # a session added an image
                self.finished(req_id)
                self.tally.add("bypassed")
            elif tracked is not None:
                jobs = self._save_jobs(tracked, computed)
                if jobs.chunks:
                    step.saves.append(jobs)
        for req_id in finished:
            self.finished(req_id)
        return step

    def loads_reported(self, failed_blocks: set[int], received: set[str]) -> None:
        """The workers' report for a step: blocks they could not load (vLLM recomputes them,
        and their chunks are saved again once recomputed) and requests whose background
        load ended. A synchronous load is reported with its step's output, which with async
        scheduling comes after the next plan was made."""
        for req_id, (first_chunk, jobs, _) in list(self._loading.items()):
            tracked = self._requests.get(req_id)
            bad = [i for i, c in enumerate(jobs.chunks) if failed_blocks.intersection(c.block_ids)]
            if tracked is not None and bad:
                tracked.stored = min(tracked.stored, first_chunk + bad[0])
                tracked.lookup = None
            if jobs.async_load and req_id in received:
                del self._loading[req_id]

    def step_returned(self, worker_stats: Mapping[str, object]) -> None:
        """A step's output, with the workers' counters: the tier choice's figures, and each
        measured tier's state (`left_out/<tier>`, 1 or -1: never 0, which vLLM would not
        send), which the gauge `kvtier_vllm_load_tier` follows in every API server."""
        for tier, out in self.tiers.step_returned(worker_stats).items():
            self.tally.add(LEFT_OUT + tier, 1 if out else -1)

    def pin(self, request: Any) -> int:
        """Pin the full chunks of a finished request's prompt that kvtier holds (every TP
        rank's), as a preheat asks with `kv_transfer_params: {"kvtier_pin": true}`; the
        tokens pinned. A refusal or an unreachable node is logged and counted, never raised:
        the request has its answer either way."""
        tracked = self._requests.get(request.request_id)
        if tracked is None:
            return 0
        c = self.geometry.chunk_tokens
        keys = tracked.chain.upto(request.all_token_ids, request.num_prompt_tokens // c)
        try:
            chunks = min(
                self.store.pin_keys(rank_keys(keys, rank, self.tp_size))
                for rank in range(self.tp_size)
            )
        except KvtierError as exc:
            log.warning("kvtier: could not pin request %s: %s", request.request_id, exc)
            self.tally.add("pin_failures")
            return 0
        self.tally.add("pinned_tokens", chunks * c)
        return chunks * c

    def take_saved(self) -> list[SavedChunks]:
        """The saves planned since the last call (none unless `record_saves`)."""
        if not self._saved:
            return []
        saved, self._saved = self._saved, []
        return saved

    def finished(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
        self._loading.pop(req_id, None)
        self._running.discard(req_id)

    # -- internals ------------------------------------------------------------------------

    def _track(self, request: Any) -> Tracked | None:
        if _bypasses(request):
            self.finished(request.request_id)
            self.tally.add("bypassed")
            return None
        tracked = self._requests.get(request.request_id)
        if tracked is not None:
            return tracked
        root = root_key(self.model_id, self.fingerprint, self.geometry.chunk_tokens, _salt(request))
        tracked = Tracked(request, KeyChain(root, self.geometry.chunk_tokens))
        self._requests[request.request_id] = tracked
        return tracked

    def _lookup(self, tracked: Tracked, chunks: int) -> tuple[int, tuple[str, ...]]:
        """The leading chunks of the request's first `chunks` kvtier holds, and their tiers:
        the last answer while it is fresh (a waiting request is asked about every step; a
        stale answer costs at worst a failed load, which vLLM recomputes)."""
        last = tracked.lookup
        now = time.monotonic()
        if last is None or last.chunks != chunks or now - last.at > LOOKUP_REUSE_S:
            keys = tracked.chain.upto(tracked.request.all_token_ids, chunks)
            hit, tiers = self._locate(keys)
            last = tracked.lookup = Lookup(chunks, hit, tiers, now)
        return last.hit, last.tiers

    def _locate(self, keys: list[Key]) -> tuple[int, tuple[str, ...]]:
        """Leading chunks every rank holds, and the tier of each (as rank 0 sees it)."""
        found = self.store.locate(rank_keys(keys, 0, self.tp_size))
        hit = found.chunks
        for rank in range(1, self.tp_size):
            hit = min(hit, self.store.locate(rank_keys(keys[:hit], rank, self.tp_size)).chunks)
        return hit, found.tiers[:hit]

    def _count_hits(self, tracked: Tracked, tokens: int) -> None:
        """Hit tokens by the tier that holds each chunk (counted once per admitted request,
        not per lookup: vLLM may ask several times before it can admit a request)."""
        c = self.geometry.chunk_tokens
        first = tracked.claimed * c - tokens
        for i, tier in enumerate(tracked.tiers):
            covered = (i + 1) * c - max(i * c, first)
            if covered > 0:
                self.tally.add(HIT_PREFIX + tier, covered)

    def _load_jobs(self, tracked: Tracked) -> RequestJobs:
        assert tracked.load_from is not None
        g = self.geometry
        table = self._block_table(tracked.request.request_id)
        keys = tracked.chain.keys
        first = tracked.load_from // g.chunk_tokens
        jobs = RequestJobs(
            tracked.request.request_id,
            async_load=tracked.async_load,
            tier=farthest(tracked.tiers[first : tracked.claimed]),
        )
        for chunk in range(first, tracked.claimed):
            blocks = g.chunk_blocks(table, chunk, tracked.load_from)
            jobs.chunks.append(
                ChunkCopy(keys[chunk], tuple(blocks), g.blocks_per_chunk - len(blocks))
            )
        return jobs

    def _save_jobs(self, tracked: Tracked, computed: int) -> RequestJobs:
        request = tracked.request
        jobs = RequestJobs(request.request_id)
        full = min(computed, request.num_tokens) // self.geometry.chunk_tokens
        if full <= tracked.stored:
            return jobs
        keys = tracked.chain.upto(request.all_token_ids, full)
        table = self._block_table(request.request_id)
        for chunk in range(tracked.stored, full):
            blocks = self.geometry.chunk_blocks(table, chunk)
            jobs.chunks.append(ChunkCopy(keys[chunk], tuple(blocks)))
        if self._saved is not None:
            self._saved.append(SavedChunks(request, tracked.stored, full))
        tracked.stored = full
        return jobs


def _bypasses(request: Any) -> bool:
    """Whether kvtier must leave a request alone: its token ids do not determine its KV
    (multimodal inputs, which a streaming session may add later; prompt embeddings)."""
    return bool(getattr(request, "mm_features", None)) or (
        getattr(request, "prompt_embeds", None) is not None
    )


def _salt(request: Any) -> bytes | None:
    """kvtier's salt for a request: its `cache_salt` (str, or the same bytes) and LoRA
    adapter, when set."""
    parts = []
    cache_salt = salt_bytes(getattr(request, "cache_salt", None))
    if cache_salt:
        parts.append(b"salt:" + cache_salt)
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(f"lora:{lora.lora_name}:{getattr(lora, 'lora_path', '')}".encode())
    return b"|".join(parts) or None
