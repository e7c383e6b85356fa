"""The gateway's state and its one request path: authenticate, route, forward, account.

`Gateway.forward` is what every completion goes through (chat, legacy completions, and the
Responses API after translation): the tenant's salt replaces any `cache_salt` the client sent
(tenants never share KV, and a client cannot pick another tenant's salt), the prompt's block
keys are computed under that salt, the pool picks a worker, and the answer comes back with
`cached_tokens` filled. A worker that cannot be reached before answering is marked unhealthy
and the request goes to the next choice.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kvtier.gateway import upstream
from kvtier.gateway.affinity import AffinityStore, Binding, affinity_key
from kvtier.gateway.errors import ApiError
from kvtier.gateway.metrics import GatewayMetrics
from kvtier.gateway.pool import Booking, Pool
from kvtier.gateway.sessions import ResponseStore
from kvtier.gateway.tokens import block_keys, prompt_tokens
from kvtier.server.auth import Auth

DEFAULT_OUTPUT_TOKENS = 256  # booked for a request that does not say max_tokens
MODELS_REFRESH_S = 5.0


def affinity_name(body: dict[str, Any]) -> str | None:
    """The conversation a request names: its `prompt_cache_key`, else its `user`."""
    for field_name in ("prompt_cache_key", "user"):
        value = body.get(field_name)
        if isinstance(value, str) and value:
            return f"{field_name}:{value}"
    return None


@dataclass(frozen=True, slots=True)
class Settings:
    block_tokens: int = 16
    affinity_ttl_s: int = 3600
    session_ttl_s: int = 30 * 86400
    max_body_bytes: int = 16 << 20
    scrape_interval_s: float = 2.0
    salt_secret: str = ""


@dataclass
class Route:
    """Where one request went, and what the gateway expects it to reuse there."""

    booking: Booking
    url: str
    cached_estimate: int
    bind: list[str]  # tenant-scoped affinity keys to bind to this worker
    blocks: int


@dataclass
class Gateway:
    pool: Pool
    auth: Auth
    affinities: AffinityStore
    responses: ResponseStore
    metrics: GatewayMetrics
    settings: Settings = field(default_factory=Settings)
    session: aiohttp.ClientSession | None = None
    models: set[str] = field(default_factory=set)
    _models_at: float = 0.0

    def tenant(self, authorization: str | None) -> str:
        """The tenant of a `Bearer` key; raises 401 for a missing or wrong one."""
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        tenant = self.auth.tenant(token) if (token or self.auth.open) else None
        if tenant is None:
            self.metrics.unauthorized.inc()
            message = "missing API key" if not token else "incorrect API key"
            raise ApiError(401, message, code="invalid_api_key")
        return tenant

    def salt(self, tenant: str) -> str:
        key = self.settings.salt_secret.encode()[:64]
        return hashlib.blake2b(tenant.encode(), key=key, digest_size=24).hexdigest()

    async def check_model(self, model: Any) -> None:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required", param="model")
        if model not in self.models and time.monotonic() - self._models_at > MODELS_REFRESH_S:
            await self.refresh_models()
        if model not in self.models:
            raise ApiError(404, f"the model {model!r} does not exist", "model", "model_not_found")

    async def refresh_models(self) -> None:
        assert self.session is not None
        self._models_at = time.monotonic()
        found: set[str] = set()
        for w in self.pool.workers:
            try:
                async with self.session.get(f"{w.url}/v1/models") as resp:
                    listing = await resp.json(content_type=None)
                found |= {m["id"] for m in listing.get("data", []) if isinstance(m, dict)}
            except (aiohttp.ClientError, OSError, ValueError, KeyError, TypeError):
                continue
        if found:
            self.models = found

    async def route(
        self, tenant: str, body: dict[str, Any], affinity: str | None, bind_as: str | None = None
    ) -> Route:
        """Salts the body, picks a worker and books the request on it. `affinity` names the
        conversation to route with; the worker is then bound to it and to `bind_as`."""
        body["cache_salt"] = self.salt(tenant)
        try:
            tokens = prompt_tokens(body)
        except ValueError as exc:
            raise ApiError(
                400, str(exc), param="messages" if "messages" in body else "prompt"
            ) from exc
        started = time.perf_counter()
        keys = block_keys(tokens, self.settings.block_tokens, body["cache_salt"])
        key = affinity_key(tenant, affinity) if affinity else None
        bound = await self._bound(key)
        output = body.get("max_tokens") or body.get("max_completion_tokens")
        booking = self.pool.route(
            keys, len(tokens), output if isinstance(output, int) else DEFAULT_OUTPUT_TOKENS, bound
        )
        self.metrics.routed(self.pool, booking, time.perf_counter() - started)
        url = self.pool.workers[booking.worker].url
        estimate = booking.hits.blocks * self.settings.block_tokens
        bind = [affinity_key(tenant, n) for n in (affinity, bind_as) if n]
        return Route(booking, url, estimate, bind, len(keys))

    async def _bound(self, key: str | None) -> tuple[int, int] | None:
        if key is None:
            return None
        try:
            binding = await self.affinities.get(key)
        except (OSError, ConnectionError) as exc:
            self.metrics.state_errors.labels(type(exc).__name__).inc()
            return None
        if binding is None:
            return None
        for i, w in enumerate(self.pool.workers):
            if w.url == binding.worker_url:
                return i, binding.blocks
        return None

    async def remember(self, route: Route) -> None:
        """Binds the request's affinity names to the worker it went to."""
        binding = Binding(route.url, route.blocks)
        for key in route.bind:
            try:
                await self.affinities.put(key, binding, self.settings.affinity_ttl_s)
            except (OSError, ConnectionError) as exc:
                self.metrics.state_errors.labels(type(exc).__name__).inc()

    async def complete(
        self,
        tenant: str,
        path: str,
        body: dict[str, Any],
        affinity: str | None,
        bind_as: str | None = None,
    ) -> dict[str, Any]:
        """A non-streamed completion from the best worker that answers."""
        assert self.session is not None
        for _ in self.pool.workers:
            route = await self.route(tenant, body, affinity, bind_as)
            try:
                result = await upstream.complete(
                    self.session, route.url + path, body, route.cached_estimate
                )
            except upstream.Unreachable:
                self.pool.failed(route.booking)
                self.metrics.upstream_errors.labels(route.url).inc()
                continue
            except BaseException:
                self.pool.finished(route.booking)
                raise
            self.pool.finished(route.booking)
            self.metrics.usage(result.get("usage"))
            await self.remember(route)
            return result
        raise ApiError(503, "no worker could be reached; try again")

    async def stream(
        self,
        tenant: str,
        path: str,
        body: dict[str, Any],
        affinity: str | None,
        bind_as: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Opens a stream on the best worker that answers; the iterator relays it."""
        assert self.session is not None
        keep_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        for _ in self.pool.workers:
            route = await self.route(tenant, body, affinity, bind_as)
            try:
                resp = await upstream.open_stream(self.session, route.url + path, body)
            except upstream.Unreachable:
                self.pool.failed(route.booking)
                self.metrics.upstream_errors.labels(route.url).inc()
                continue
            except BaseException:
                self.pool.finished(route.booking)
                raise
            await self.remember(route)
            relay = self._relay(route, resp, keep_usage)
            # A client gone before the stream starts leaves `relay` never run: unbook on GC.
            weakref.finalize(relay, _abandon, self.pool, route.booking, resp)
            return relay
        raise ApiError(503, "no worker could be reached; try again")

    async def _relay(
        self, route: Route, resp: aiohttp.ClientResponse, keep_usage: bool
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()

        def first() -> None:
            self.pool.first_token(route.booking)
            self.metrics.ttft.observe(time.perf_counter() - started)

        try:
            async for event in upstream.relay(
                resp, route.cached_estimate, keep_usage, first, self.metrics.usage
            ):
                yield event
        finally:
            self.pool.finished(route.booking)


def _abandon(pool: Pool, booking: Booking, resp: aiohttp.ClientResponse) -> None:
    pool.finished(booking)
    resp.close()
