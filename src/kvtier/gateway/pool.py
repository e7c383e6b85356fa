"""The workers behind a gateway: what each holds, how loaded it is, what it costs.

`Pool.route` runs the policy over the healthy workers and books the request on the chosen
one (its load, and the prompt's blocks into the index as a prediction, so a burst of siblings
lands together before any event arrives). `Pool.first_token` and `Pool.finished` unbook it.
Two background loops per worker keep the rest current: one reads the worker's vLLM-format KV
events into the index (`events.py`; the worker's block hashes are rehashed from the token ids
into the gateway's own keys, salt and all), one scrapes its `/metrics` every
`scrape_interval_s` into its measured costs and marks it healthy or not. With no events a
worker's index entries are the gateway's own predictions only, bounded like its cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import aiohttp

from kvtier.gateway import events
from kvtier.gateway.costs import Costs, Priors
from kvtier.gateway.index import DISK, DRAM, GPU, NO_HITS, PREDICTED, SHARED, Hits, PrefixIndex
from kvtier.gateway.routing import Candidate, Load, Policy, Request, expected_ttft_s
from kvtier.gateway.tokens import chain_keys, root_key

log = logging.getLogger(__name__)

ENGINE_KEYS_PER_BLOCK = 4  # engine hashes remembered per indexed block a holder may keep
MEDIUM_TIERS = {None: GPU, "GPU": GPU, "CPU": DRAM, "DISK": DISK, "STORAGE": DISK}


@dataclass
class Worker:
    """One worker: its base URL, KV events endpoints, load, measured costs and health."""

    url: str
    events_endpoint: str | None = None
    replay_endpoint: str | None = None  # vLLM's replay socket for its KV events
    load: Load = field(default_factory=Load)
    costs: Costs = field(default_factory=Costs)
    healthy: bool = True
    models: frozenset[str] = frozenset()  # what its /v1/models last listed
    cleared: bool = False  # an AllBlocksCleared came since its last scrape
    # engine block hash -> the gateway's key, to chain and remove by engine hash (a hash
    # names the same tokens in every medium); bounded, the oldest forgotten first (an
    # OrderedDict: a plain dict's oldest key costs O(keys deleted since its last resize))
    engine_keys: OrderedDict[int | bytes, int] = field(default_factory=OrderedDict)


class Bound(NamedTuple):
    """An affinity: the worker a conversation went to, with `blocks` prompt blocks, the last
    of them `last_key`. Credited as a GPU prefix to a prompt with that block there."""

    worker: int
    blocks: int
    last_key: int


def _holds(bound: Bound, keys: list[int], hits: list[Hits]) -> bool:
    """Whether an affinity says more of this prompt is on its worker than the index does."""
    if bound.worker >= len(hits) or not 0 < bound.blocks <= len(keys):
        return False
    return keys[bound.blocks - 1] == bound.last_key and bound.blocks > hits[bound.worker].blocks


def _credited(bound: Bound | None, keys: list[int], found: list[Hits]) -> list[Hits]:
    """`found`, but for an affinity that holds more of this prompt: its blocks as the GPU
    prefix of its worker."""
    if bound is None or not _holds(bound, keys, found):
        return found
    hits = list(found)
    hits[bound.worker] = Hits(bound.blocks, 0, 0, 0)
    return hits


class Booking:
    """One routed request's share of a worker's load, given back exactly once each."""

    def __init__(
        self, worker: int, tokens: int, prefill_s: float, hits: Hits, keys: list[int]
    ) -> None:
        self.worker, self.tokens, self.prefill_s, self.hits = worker, tokens, prefill_s, hits
        self.keys = keys  # predicted into the worker's cache
        self.waiting_first_token = True
        self.open = True


@dataclass
class Stats:
    """Counters of the pool's background work, exported on /metrics."""

    decisions: int = 0
    events: int = 0
    events_unchained: int = 0  # stored blocks whose parent the gateway never saw
    events_wrong_block_size: int = 0
    event_failures: int = 0  # subscriptions that failed and were renewed
    scrape_failures: int = 0


class Pool:
    """The workers, the routing index over them, and the policy that picks one."""

    def __init__(
        self,
        urls: list[str],
        policy: Policy,
        block_tokens: int,
        capacity_blocks: int,
        events_endpoints: list[str | None] | None = None,
        priors: Priors | None = None,
        replay_endpoints: list[str | None] | None = None,
    ) -> None:
        endpoints = events_endpoints or [None] * len(urls)
        replays = replay_endpoints or [None] * len(urls)
        if len(endpoints) != len(urls) or len(replays) != len(urls):
            raise ValueError("give one KV events endpoint per worker (or none)")
        self.workers = [
            Worker(url.rstrip("/"), ep, replay, costs=Costs(priors or Priors()))
            for url, ep, replay in zip(urls, endpoints, replays, strict=True)
        ]
        self.policy = policy
        self.block_tokens = block_tokens
        self.index = PrefixIndex(len(urls), capacity_blocks)
        self.stats = Stats()
        self._tasks: list[asyncio.Task[None]] = []

    def route(
        self,
        keys: list[int],
        prompt_tokens: int,
        output_tokens: int,
        bound: Bound | None,
        model: str | None = None,
    ) -> Booking:
        """Chooses a worker serving `model` for a prompt (its block keys) and books the
        request on it.

        `bound` is an affinity from the caller's session, `prompt_cache_key` or `user`: its
        blocks count as a GPU prefix the index may not know of, if this prompt has them."""
        request = Request(prompt_tokens, self.block_tokens)
        reads = self.policy.reads_hits  # if not, match the chosen worker only, after picking
        found = self.index.match(keys) if reads else [NO_HITS] * len(self.workers)
        chosen = self.policy.pick(
            request, self._candidates(_credited(bound, keys, found) if reads else found, model)
        )
        if not reads:
            found[chosen.worker] = self.index.match_one(keys, chosen.worker)
            chosen = chosen._replace(hits=_credited(bound, keys, found)[chosen.worker])
        prefill_s = expected_ttft_s(request, chosen._replace(load=Load()))
        # Predict only what the index does not already hold there: the blocks past its match.
        predicted = keys[found[chosen.worker].gpu :]
        # The work it adds there: the prompt tokens the worker must compute, and the output.
        work = max(prompt_tokens - chosen.hits.blocks * self.block_tokens, 0) + output_tokens
        booking = Booking(chosen.worker, work, prefill_s, chosen.hits, predicted)
        load = chosen.load
        load.requests += 1
        load.tokens += booking.tokens
        load.prefill_s += prefill_s
        self.index.add(chosen.worker, PREDICTED, predicted)
        self.stats.decisions += 1
        return booking

    def _candidates(self, hits: list[Hits], model: str | None) -> list[Candidate]:
        """The healthy workers that list `model` as candidates (those that list it when none
        is healthy; every worker when none lists it, as before any listing came)."""
        serving = [
            (i, w) for i, w in enumerate(self.workers) if model is None or model in w.models
        ] or list(enumerate(self.workers))
        return [Candidate(i, hits[i], w.load, w.costs) for i, w in serving if w.healthy] or [
            Candidate(i, hits[i], w.load, w.costs) for i, w in serving
        ]

    def first_token(self, booking: Booking) -> None:
        if booking.waiting_first_token:
            booking.waiting_first_token = False
            load = self.workers[booking.worker].load
            load.prefill_s = max(load.prefill_s - booking.prefill_s, 0.0)

    def finished(self, booking: Booking) -> None:
        if booking.open:
            self.first_token(booking)
            booking.open = False
            load = self.workers[booking.worker].load
            load.requests -= 1
            load.tokens -= booking.tokens

    def rejected(self, booking: Booking) -> None:
        """The worker refused the request: unbook it and forget its predicted blocks."""
        self.finished(booking)
        self.index.remove(booking.worker, PREDICTED, booking.keys)

    def failed(self, booking: Booking) -> None:
        """The worker could not be reached: unbook and mark it unhealthy until a scrape."""
        self.rejected(booking)
        self.workers[booking.worker].healthy = False

    # -- background: KV events and metrics --------------------------------------------

    def start(self, session: aiohttp.ClientSession, scrape_interval_s: float) -> None:
        for i, w in enumerate(self.workers):
            if w.events_endpoint:
                self._tasks.append(asyncio.create_task(self._follow_events(i)))
            self._tasks.append(asyncio.create_task(self._scrape(i, session, scrape_interval_s)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _follow_events(self, i: int) -> None:
        """Reads worker i's events for ever (first those its replay socket still holds),
        resubscribing after any failure."""
        endpoint, replay = self.workers[i].events_endpoint, self.workers[i].replay_endpoint
        assert endpoint is not None
        while True:
            try:
                async for event in events.subscribe(endpoint, replay=replay):
                    self.stats.events += 1
                    self.apply_event(i, event)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.event_failures += 1
                log.exception("KV events of %s failed; resubscribing", self.workers[i].url)
                await asyncio.sleep(1.0)

    def apply_event(self, i: int, event: events.Event) -> None:
        """Folds one vLLM KV event from worker `i` into the index."""
        w = self.workers[i]
        if isinstance(event, events.AllBlocksCleared):  # vLLM's prefix cache reset: GPU only
            w.cleared = True
            self.index.clear(i, GPU)
            self.index.clear(i, PREDICTED)
            return
        medium = event.medium
        holder, tier = (
            (SHARED, 0) if medium == events.MEDIUM_SHARED else (i, MEDIUM_TIERS.get(medium, GPU))
        )
        if isinstance(event, events.BlockRemoved):
            found = [w.engine_keys.get(h) for h in event.block_hashes]
            self.index.remove(holder, tier, [k for k in found if k is not None])
            return
        if event.block_size != self.block_tokens:
            self.stats.events_wrong_block_size += 1
            return
        if event.parent_block_hash is None:
            parent = root_key(events.salt_of(event), event.lora_name)
        elif event.parent_block_hash in w.engine_keys:
            parent = w.engine_keys[event.parent_block_hash]
        else:
            self.stats.events_unchained += 1
            return
        keys = chain_keys(parent, event.token_ids, self.block_tokens)
        known = w.engine_keys
        for engine_hash, key in zip(event.block_hashes, keys, strict=False):
            known.pop(engine_hash, None)
            known[engine_hash] = key
        while len(known) > ENGINE_KEYS_PER_BLOCK * self.index.capacity_blocks:
            known.popitem(last=False)
        self.index.add(holder, tier, keys)

    def observe_metrics(self, i: int, text: str) -> None:
        """Folds one scrape of worker i's `/metrics` into its costs. Counters that went back
        mean it restarted, with an empty prefix cache: its GPU entries are cleared (its KV
        events may not say so: a restart the event stream does not show)."""
        w = self.workers[i]
        if w.costs.observe(text) and not w.cleared:  # (not again if its events said so)
            log.warning("worker %s restarted; forgetting its GPU cache", w.url)
            self.apply_event(i, events.AllBlocksCleared())
        w.cleared = False

    async def _scrape(self, i: int, session: aiohttp.ClientSession, interval_s: float) -> None:
        w = self.workers[i]
        timeout = aiohttp.ClientTimeout(total=max(interval_s, 1.0))
        while True:
            try:
                async with session.get(f"{w.url}/metrics", timeout=timeout) as resp:
                    text = await resp.text()
                    w.healthy = resp.status == 200
                    if w.healthy:
                        self.observe_metrics(i, text)
            except asyncio.CancelledError:
                raise
            except Exception:  # unreachable, or answers no scraper should die of
                self.stats.scrape_failures += 1
                w.healthy = False
            await asyncio.sleep(interval_s)
