"""The gateway's state and its one request path: authenticate, route, forward, account.

`Gateway.forward` is what every completion goes through (chat, legacy completions, and the
Responses API after translation): the tenant's salt replaces any `cache_salt` the client sent
(tenants never share KV, and a client cannot pick another tenant's salt), the prompt's block
keys are computed under that salt, the pool picks a worker, and the answer comes back with
`cached_tokens` filled. A worker that cannot be reached before answering is marked unhealthy
and the request goes to the next choice.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import aiohttp
import numpy as np

from kvtier.gateway import upstream
from kvtier.gateway.affinity import AffinityStore, Binding, affinity_key
from kvtier.gateway.errors import ApiError
from kvtier.gateway.gate import Gate
from kvtier.gateway.metrics import GatewayMetrics
from kvtier.gateway.pool import Booking, Bound, Pool
from kvtier.gateway.sessions import ResponseStore
from kvtier.gateway.taskqueue import TaskQueue
from kvtier.gateway.tokens import block_keys
from kvtier.server.auth import Auth

T = TypeVar("T")
DEFAULT_OUTPUT_TOKENS = 256  # booked for a request that does not say max_tokens
MODELS_REFRESH_S = 5.0
MODELS_TIMEOUT_S = 2.0


def affinity_names(body: dict[str, Any]) -> tuple[str, ...]:
    """The conversation a request names: its `prompt_cache_key`, then its `user`."""
    names = []
    for field_name in ("prompt_cache_key", "user"):
        value = body.get(field_name)
        if isinstance(value, str) and value:
            names.append(f"{field_name}:{value}")
    return tuple(names)


@dataclass(frozen=True, slots=True)
class Settings:
    """The gateway's tunables (each a `kvtier gateway` option)."""

    block_tokens: int = 16
    affinity_ttl_s: int = 3600
    session_ttl_s: int = 30 * 86400
    max_body_bytes: int = 16 << 20
    scrape_interval_s: float = 2.0
    salt_secret: str = ""
    stall_timeout_s: float = upstream.STALL_TIMEOUT_S
    worker_api_key: str = ""


class Caller(NamedTuple):
    tenant: str
    key: str | None  # the API key (None without an auth file and without a key)


@dataclass
class Route:
    """Where one request went, and what the gateway expects it to reuse there."""

    booking: Booking
    url: str
    cached_estimate: int
    bind: list[str]  # tenant-scoped affinity keys to bind to this worker
    blocks: int
    last_key: int


@dataclass
class Gateway:
    """Everything a request needs: the worker pool, auth, the Redis or in-memory state,
    metrics, and the aiohttp session to the workers (opened by the app's lifespan)."""

    pool: Pool
    auth: Auth
    affinities: AffinityStore
    responses: ResponseStore
    metrics: GatewayMetrics
    settings: Settings = field(default_factory=Settings)
    gate: Gate = field(default_factory=Gate)
    tasks: TaskQueue | None = None
    session: aiohttp.ClientSession | None = None
    models: set[str] = field(default_factory=set)
    _models_at: float = 0.0

    def tenant(self, authorization: str | None) -> str:
        """The tenant of a `Bearer` key; raises 401 for a missing or wrong one."""
        return self.caller(authorization).tenant

    def caller(self, authorization: str | None) -> Caller:
        """The tenant and API key of a `Bearer` key; raises 401 for a missing or wrong one."""
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        tenant = self.auth.tenant(token) if (token or self.auth.open) else None
        if tenant is None:
            self.metrics.unauthorized.inc()
            message = "missing API key" if not token else "incorrect API key"
            raise ApiError(401, message, code="invalid_api_key")
        return Caller(tenant, token or None)

    def salt(self, tenant: str) -> str:
        key = self.settings.salt_secret.encode()[:64]
        return hashlib.blake2b(tenant.encode(), key=key, digest_size=24).hexdigest()

    async def check_model(self, model: Any) -> None:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required", param="model")
        if model not in await self.known_models():
            if not self.models:  # no worker ever answered: nothing says the model is unknown
                raise ApiError(
                    503, "no worker has listed its models yet (are they up, and do they "
                    "need --worker-api-key?); try again"
                )  # fmt: skip
            raise ApiError(404, f"the model {model!r} does not exist", "model", "model_not_found")

    async def known_models(self) -> set[str]:
        """The workers' models, asked again when the last answer is MODELS_REFRESH_S old."""
        if time.monotonic() - self._models_at > MODELS_REFRESH_S:
            await self.refresh_models()
        return self.models

    async def refresh_models(self) -> None:
        """Each worker's models and their union, asked in parallel (a hung worker costs
        MODELS_TIMEOUT_S, once); a worker that does not answer keeps its last listing."""
        self._models_at = time.monotonic()
        workers = self.pool.workers
        listings = await asyncio.gather(*(self._models_of(w.url) for w in workers))
        for worker, listing in zip(workers, listings, strict=True):
            if listing:
                worker.models = frozenset(listing)
        self.models = set().union(*(w.models for w in workers))

    async def _models_of(self, url: str) -> set[str]:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S)
        try:
            async with self.session.get(f"{url}/v1/models", timeout=timeout) as resp:
                listing = await resp.json(content_type=None)
            return {m["id"] for m in listing.get("data", []) if isinstance(m, dict)}
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError,
                TypeError, AttributeError):  # fmt: skip
            return set()

    async def count(self, body: dict[str, Any]) -> list[np.ndarray]:
        """A request's prompts in tokens, as the gate counts them (once per request: with
        --tokenizer it costs); raises 400 for prompts that are not well formed."""
        return await self.gate.count(body)

    async def route(
        self,
        tenant: str,
        body: dict[str, Any],
        prompts: list[np.ndarray],
        affinities: tuple[str, ...],
        bind_as: str | None = None,
    ) -> Route:
        """Salts the body, picks a worker for its `prompts` and books the request on it.
        `affinities` name the conversation to route with, the most specific first (the first
        one bound counts); the worker is then bound to all of them and to `bind_as`."""
        body["cache_salt"] = self.salt(tenant)
        tokens = prompts[0]  # a batch of prompts is routed by its first
        names = [affinity_key(tenant, n) for n in affinities]
        bound = await self._bound(names)
        output = body.get("max_tokens") or body.get("max_completion_tokens")
        output = output if isinstance(output, int) and output > 0 else DEFAULT_OUTPUT_TOKENS
        started = time.perf_counter()
        keys = block_keys(tokens, self.settings.block_tokens, body["cache_salt"])
        size = sum(len(p) for p in prompts)
        booking = self.pool.route(keys, size, output * len(prompts), bound, body.get("model"))
        self.metrics.routed(self.pool, booking, time.perf_counter() - started)
        url = self.pool.workers[booking.worker].url
        estimate = booking.hits.blocks * self.settings.block_tokens
        bind = names + ([affinity_key(tenant, bind_as)] if bind_as else [])
        return Route(booking, url, estimate, bind, len(keys), keys[-1] if keys else 0)

    async def _bound(self, names: list[str]) -> Bound | None:
        """The first of `names` bound to one of this gateway's workers."""
        for name in names:
            try:
                binding = await self.affinities.get(name)
            except OSError as exc:
                self.metrics.state_errors.labels(type(exc).__name__).inc()
                return None
            if binding is None:
                continue
            for i, w in enumerate(self.pool.workers):
                if w.url == binding.worker_url:
                    return Bound(i, binding.blocks, binding.last_key)
        return None

    async def remember(self, route: Route) -> None:
        """Binds the request's affinity names to the worker it went to."""
        binding = Binding(route.url, route.blocks, route.last_key)
        for key in route.bind:
            try:
                await self.affinities.put(key, binding, self.settings.affinity_ttl_s)
            except OSError as exc:
                self.metrics.state_errors.labels(type(exc).__name__).inc()

    async def _on_a_worker(
        self,
        tenant: str,
        body: dict[str, Any],
        prompts: list[np.ndarray],
        names: tuple[tuple[str, ...], str | None],
        call: Callable[[Route], Awaitable[T]],
    ) -> tuple[Route, T]:
        """`call` on the best worker that can be reached: an unreachable one is marked and
        the next choice tried (each worker once); a refusal or any other failure unbooks and
        propagates."""
        tried: set[int] = set()
        for _ in self.pool.workers:
            route = await self.route(tenant, body, prompts, *names)
            if route.booking.worker in tried:  # every worker for this model failed already
                self.pool.rejected(route.booking)
                break
            tried.add(route.booking.worker)
            try:
                return route, await call(route)
            except upstream.Unreachable:
                self.pool.failed(route.booking)
                self.metrics.upstream_errors.labels(route.url).inc()
            except ApiError:
                self.pool.rejected(route.booking)
                raise
            except BaseException:
                self.pool.finished(route.booking)
                raise
        raise ApiError(503, "no worker could be reached; try again")

    async def complete(
        self,
        tenant: str,
        path: str,
        body: dict[str, Any],
        prompts: list[np.ndarray],
        affinities: tuple[str, ...],
        bind_as: str | None = None,
    ) -> dict[str, Any]:
        """A non-streamed completion from the best worker that answers (`prompts`: the
        body's, as `count` gives them)."""
        session = self.session
        assert session is not None

        def call(r: Route) -> Awaitable[dict[str, Any]]:
            return upstream.complete(session, r.url + path, body, r.cached_estimate)

        names = (affinities, bind_as)
        route, result = await self._on_a_worker(tenant, body, prompts, names, call)
        self.pool.finished(route.booking)
        self.metrics.usage(result.get("usage"))
        await self.remember(route)
        return result

    async def stream(
        self,
        tenant: str,
        path: str,
        body: dict[str, Any],
        prompts: list[np.ndarray],
        affinities: tuple[str, ...],
        bind_as: str | None = None,
        on_usage: Callable[[dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[bytes]:
        """Opens a stream on the best worker that answers; the iterator relays it (and gives
        the stream's usage to `on_usage`)."""
        session = self.session
        assert session is not None
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        keep_usage = bool(options.get("include_usage"))
        body["stream_options"] = {**options, "include_usage": True}

        def call(r: Route) -> Awaitable[aiohttp.ClientResponse]:
            return upstream.open_stream(session, r.url + path, body)

        started = time.perf_counter()
        names = (affinities, bind_as)
        route, resp = await self._on_a_worker(tenant, body, prompts, names, call)
        relay = self._relay(route, resp, keep_usage, started, on_usage)
        # A client gone before the stream starts leaves `relay` never run: unbook on GC.
        weakref.finalize(relay, _abandon, self.pool, route.booking, resp)
        await self.remember(route)
        return relay

    def _relay(
        self,
        route: Route,
        resp: aiohttp.ClientResponse,
        keep_usage: bool,
        started: float,
        on_usage: Callable[[dict[str, Any]], None] | None,
    ) -> AsyncIterator[bytes]:
        """`upstream.relay` telling the pool and the metrics (callbacks, not a generator
        around it: each generator a chunk passes through costs)."""
        booking = route.booking

        def first() -> None:
            self.pool.first_token(booking)
            self.metrics.ttft.observe(time.perf_counter() - started)

        def usage(u: dict[str, Any]) -> None:
            self.metrics.usage(u)
            if on_usage is not None:
                on_usage(u)

        def end() -> None:
            self.pool.finished(booking)

        stall_s = self.settings.stall_timeout_s
        return upstream.relay(resp, route.cached_estimate, keep_usage, first, usage, end, stall_s)


def _abandon(pool: Pool, booking: Booking, resp: aiohttp.ClientResponse) -> None:
    pool.finished(booking)
    resp.close()
