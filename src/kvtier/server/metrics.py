"""The cache server's Prometheus metrics: request latency histograms, observed as requests
are answered; the store's, the server's and each tenant's figures, read at scrape time.
Served on a separate port by `kvtier.metrics.MetricsServer`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.metrics import OP_BUCKETS, new_registry
from kvtier.protocol import Op
from kvtier.store import Store

_TIER_FIELDS = {
    "capacity_bytes": (GaugeMetricFamily, "configured capacity of the tier"),
    "bytes": (GaugeMetricFamily, "bytes held by the tier"),
    "chunks": (GaugeMetricFamily, "chunks held by the tier"),
    "hits": (CounterMetricFamily, "reads served by the tier"),
    "misses": (CounterMetricFamily, "reads the tier could not serve"),
    "evictions": (CounterMetricFamily, "chunks evicted from the tier"),
    "errors": (CounterMetricFamily, "I/O errors of the tier"),
    "checksum_failures": (CounterMetricFamily, "chunks that failed verification"),
    "pinned_bytes": (GaugeMetricFamily, "bytes of chunks clients pinned"),
    "pinned_chunks": (GaugeMetricFamily, "chunks clients pinned"),
    "expired": (CounterMetricFamily, "chunks reclaimed past their TTL"),
    "out_of_space": (CounterMetricFamily, "writes the file system refused for lack of room"),
    "effective_capacity_bytes": (GaugeMetricFamily, "what the tier may hold now"),
}


class ServerMetrics:
    """One registry per server: `observe()` each answered request."""

    def __init__(self, store: Store, counters: Counter[str]) -> None:
        """`counters`: the server's own (connections, refusals, ...), read at scrape time."""
        self.registry = new_registry()
        self._latency = Histogram(
            "kvtier_server_request_seconds",
            "seconds from a request's last byte received to its reply written (GET: sent)",
            ["op"],
            buckets=OP_BUCKETS,
            registry=self.registry,
        )
        self._by_op: dict[Op, Histogram] = {}  # only ops that were asked appear
        self.registry.register(_ServerCollector(store, counters))

    def observe(self, op: Op, seconds: float) -> None:
        """Called on the event loop only."""
        child = self._by_op.get(op)
        if child is None:
            child = self._by_op[op] = self._latency.labels(op.name.lower())
        child.observe(seconds)


class _ServerCollector(Collector):
    """The store's and the server's counters and each tenant's share of the tiers."""

    def __init__(self, store: Store, counters: Counter[str]) -> None:
        self.store = store
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        yield from self._tiers()
        yield from self._tenants()
        counters = dict(self.counters)  # one C-level copy: the event loop adds keys
        for key, value in sorted(counters.items()):
            name = f"kvtier_server_{key.removesuffix('_total')}"
            yield CounterMetricFamily(name, f"server {key.replace('_', ' ')}", value=value)

    def _tiers(self) -> Iterator[Metric]:
        stats = self.store.stats()
        for field, (kind, text) in _TIER_FIELDS.items():
            family = kind(f"kvtier_tier_{field}", text, labels=["tier"])
            for tier in stats.tiers:
                family.add_metric([tier.name], getattr(tier, field))
            yield family
        yield CounterMetricFamily(
            "kvtier_saved_chunks", "chunks saved by the store", value=stats.saved_chunks
        )
        yield CounterMetricFamily(
            "kvtier_dropped_chunks", "chunks the store had no room for", value=stats.dropped_chunks
        )
        yield CounterMetricFamily(
            "kvtier_admission_rejected_chunks",
            "saves kept off the disk tier (not admitted)",
            value=stats.admission_rejected,
        )
        yield CounterMetricFamily(
            "kvtier_disk_written_bytes",
            "bytes written to the disk tier",
            value=stats.disk_written_bytes,
        )
        yield GaugeMetricFamily(
            "kvtier_pending_writes", "lower-tier writes queued", value=stats.pending_writes
        )

    def _tenants(self) -> Iterator[Metric]:
        labels = ["tenant", "tier"]
        held = GaugeMetricFamily(
            "kvtier_tenant_bytes", "bytes a tenant holds in a tier", labels=labels
        )
        chunks = GaugeMetricFamily(
            "kvtier_tenant_chunks", "chunks a tenant holds in a tier", labels=labels
        )
        quota = GaugeMetricFamily(
            "kvtier_tenant_quota_bytes", "a tenant's quota in a tier", labels=labels
        )
        evicted = CounterMetricFamily(
            "kvtier_tenant_quota_evictions",
            "a tenant's chunks evicted to keep it within its quota",
            labels=labels,
        )
        for tenant, tiers in sorted(self.store.usage().items()):
            for tier, usage in tiers.items():
                held.add_metric([tenant, tier], usage.bytes)
                chunks.add_metric([tenant, tier], usage.chunks)
                evicted.add_metric([tenant, tier], usage.evictions)
                if usage.limit_bytes is not None:
                    quota.add_metric([tenant, tier], usage.limit_bytes)
        yield from (held, chunks, quota, evicted)
