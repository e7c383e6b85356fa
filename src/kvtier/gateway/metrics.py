"""The gateway's Prometheus metrics (one registry per gateway; `kvtier.metrics`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.metrics import FAST_BUCKETS, TTFT_BUCKETS, exposition, new_registry

if TYPE_CHECKING:
    from kvtier.gateway.pool import Booking, Pool


class _PoolCollector(Collector):
    def __init__(self) -> None:
        self.pool: Pool | None = None

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        if pool is None:
            return
        gauges = {
            "requests": GaugeMetricFamily(
                "kvtier_gateway_worker_requests", "requests in flight", labels=["worker"]
            ),
            "tokens": GaugeMetricFamily(
                "kvtier_gateway_worker_tokens",
                "tokens to compute in flight (uncached prompt + output)",
                labels=["worker"],
            ),
            "healthy": GaugeMetricFamily(
                "kvtier_gateway_worker_healthy", "1 if the last scrape answered", labels=["worker"]
            ),
        }
        for w in pool.workers:
            gauges["requests"].add_metric([w.url], w.load.requests)
            gauges["tokens"].add_metric([w.url], w.load.tokens)
            gauges["healthy"].add_metric([w.url], 1.0 if w.healthy else 0.0)
        yield from gauges.values()
        yield GaugeMetricFamily(
            "kvtier_gateway_index_blocks", "block keys in the routing index", value=len(pool.index)
        )
        stats = pool.stats
        yield CounterMetricFamily(
            "kvtier_gateway_kv_events", "KV events read from the workers", value=stats.events
        )
        dropped = CounterMetricFamily(
            "kvtier_gateway_kv_events_dropped", "KV events not indexed", labels=["reason"]
        )
        dropped.add_metric(["unknown_parent"], stats.events_unchained)
        dropped.add_metric(["block_size"], stats.events_wrong_block_size)
        yield dropped


class GatewayMetrics:
    """Counters and histograms of the request path, plus the pool's gauges at scrape time."""

    def __init__(self) -> None:
        self.registry = new_registry()
        r = self.registry
        self.requests = Counter(
            "kvtier_gateway_requests", "requests answered", ["route", "status"], registry=r
        )
        self.routed_to = Counter("kvtier_gateway_routed", "requests routed", ["worker"], registry=r)
        self.route_seconds = Histogram(
            "kvtier_gateway_route_seconds", "routing decision time", buckets=FAST_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "kvtier_gateway_ttft_seconds", "time to the first streamed event",
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "kvtier_gateway_upstream_errors", "workers not reached", ["worker"], registry=r
        )
        self.unauthorized = Counter(
            "kvtier_gateway_unauthorized", "requests with a missing or wrong key", registry=r
        )
        self.state_errors = Counter(
            "kvtier_gateway_state_errors", "Redis calls that failed", ["error"], registry=r
        )
        self.prompt_tokens = Counter(
            "kvtier_gateway_prompt_tokens", "prompt tokens in answered usage", registry=r
        )
        self.cached_tokens = Counter(
            "kvtier_gateway_cached_tokens", "cached prompt tokens in answered usage", registry=r
        )
        self._pool = _PoolCollector()
        r.register(self._pool)
        # labelled children by label values: `labels()` costs a lock and a tuple of str each
        self._answered: dict[tuple[str, int], Counter] = {}
        self._routed: dict[str, Counter] = {}

    def attach(self, pool: Pool) -> None:
        self._pool.pool = pool

    def routed(self, pool: Pool, booking: Booking, seconds: float) -> None:
        self.route_seconds.observe(seconds)
        url = pool.workers[booking.worker].url
        child = self._routed.get(url)
        if child is None:
            child = self._routed[url] = self.routed_to.labels(url)
        child.inc()

    def answered(self, route: str, status: int) -> None:
        """Counts an answer to `route` with HTTP `status`."""
        child = self._answered.get((route, status))
        if child is None:
            child = self._answered[route, status] = self.requests.labels(route, str(status))
        child.inc()

    def usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(prompt, int):
            self.prompt_tokens.inc(prompt)
        if isinstance(cached, int):
            self.cached_tokens.inc(cached)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The metrics in the format `accept` asks for, and its content type."""
        return exposition(self.registry, accept)
