"""The connector's figures as vLLM aggregates, logs and exports them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvtier.gateway.costs import counters, parse_prometheus
from kvtier.gateway.index import DISK
from kvtier.integrations.vllm.connector import KvtierConnector
from kvtier.integrations.vllm.metrics import KvtierPromMetrics, KvtierStats
from kvtier.integrations.vllm.plan import Tally


def test_stats_add_up_and_reduce_to_rates() -> None:
    """Deltas from the scheduler and every worker add up; the summary has the hit tokens in
    all and by tier, and GB/s from bytes over seconds."""
    scheduler = KvtierStats(data={"lookups": 2, "hit_tokens/remote": 512})
    worker0 = KvtierConnector.build_kv_connector_stats(
        {"loaded_bytes": 2e9, "load_seconds": 1.0, "saved_bytes": 1e9, "save_seconds": 4.0}
    )
    worker1 = KvtierConnector.build_kv_connector_stats({"loaded_bytes": 2e9, "load_seconds": 1.0})
    total = scheduler.aggregate(worker0).aggregate(worker1)
    summary = total.reduce()
    assert summary["hit_tokens"] == 512 and summary["hit_tokens/remote"] == 512
    assert summary["load_GBps"] == 2.0 and summary["save_GBps"] == 0.25
    assert summary["loaded_bytes"] == 4e9 and summary["lookups"] == 2
    assert not total.is_empty()
    total.reset()
    assert total.is_empty()


def _prom_metrics(
    registry: CollectorRegistry, extra: dict[str, Any] | None = None
) -> KvtierPromMetrics:
    """The connector's metrics as vLLM builds them, in `registry`, for two engines."""

    def bound(cls: type) -> type:
        class Bound(cls):  # type: ignore[valid-type,misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, registry=registry, **kwargs)

        return Bound

    return KvtierConnector.build_prom_metrics(
        SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra)),
        {Counter: bound(Counter), Gauge: bound(Gauge), Histogram: bound(Histogram)},
        ["model_name", "engine"],
        {0: ["m", "0"], 1: ["m", "1"]},
    )


def test_prometheus_counters_per_engine_and_tier() -> None:
    """Observed deltas accumulate in `kvtier_vllm_*_total` counters labelled by engine, and
    hit tokens also by tier."""
    registry = CollectorRegistry()
    metrics = _prom_metrics(registry)
    metrics.observe({"hit_tokens/remote": 256, "loaded_bytes": 1000, "failed_chunks": 1}, 0)
    metrics.observe({"hit_tokens/remote": 64, "hit_tokens/dram": 32}, 0)
    metrics.observe({"saved_bytes": 5}, 1)
    value = registry.get_sample_value
    engine0 = {"model_name": "m", "engine": "0"}
    assert value("kvtier_vllm_hit_tokens_total", {**engine0, "tier": "remote"}) == 320
    assert value("kvtier_vllm_hit_tokens_total", {**engine0, "tier": "dram"}) == 32
    assert value("kvtier_vllm_loaded_bytes_total", engine0) == 1000
    assert value("kvtier_vllm_failed_chunks_total", engine0) == 1
    assert value("kvtier_vllm_saved_bytes_total", {"model_name": "m", "engine": "1"}) == 5


def test_load_seconds_are_exported_by_tier_as_the_gateway_reads_them() -> None:
    """Each whole load's seconds, by its farthest tier, are `kvtier_vllm_load_seconds_total
    {tier}`; `kvtier gateway` prices a worker's prefix in each tier from them."""
    registry = CollectorRegistry()
    metrics = _prom_metrics(registry)
    metrics.observe({"tier_load_seconds/disk": 0.5, "tier_load_blocks/disk": 4,
                     "tier_load_seconds/dram": 0.01, "hit_tokens/disk": 128})  # fmt: skip
    engine0 = {"model_name": "m", "engine": "0"}
    value = registry.get_sample_value
    assert value("kvtier_vllm_load_seconds_total", {**engine0, "tier": "disk"}) == 0.5
    assert value("kvtier_vllm_load_seconds_total", {**engine0, "tier": "dram"}) == 0.01
    seen = counters(parse_prometheus(generate_latest(registry).decode()))
    assert seen[f"kvtier_vllm_load_seconds_total/{DISK}"] == 0.5
    assert seen[f"kvtier_vllm_hit_tokens_total/{DISK}"] == 128


def test_request_times_fill_histograms_on_the_shared_buckets() -> None:
    """Per-request load and save times that workers sample add up across workers (the counters
    beside them too) and fill `kvtier_vllm_request_{load,save}_seconds` histograms on
    kvtier's shared buckets."""
    tally = Tally()
    tally.observe("request_load_seconds", 0.002)
    tally.observe("step_save_seconds", 0.0001)
    tally.add("loaded_bytes", 10)
    worker0 = KvtierStats(data=tally.drain())
    worker1 = KvtierConnector.build_kv_connector_stats(
        {"request_load_seconds": [0.3], "loaded_bytes": 5}
    )
    total = KvtierStats(data={}).aggregate(worker0).aggregate(worker1)
    assert total.reduce()["loaded_bytes"] == 15
    registry = CollectorRegistry()
    _prom_metrics(registry).observe(total.data, 0)
    value = registry.get_sample_value
    engine0 = {"model_name": "m", "engine": "0"}
    assert value("kvtier_vllm_request_load_seconds_count", engine0) == 2
    assert value("kvtier_vllm_request_load_seconds_bucket", {**engine0, "le": "0.0025"}) == 1
    assert value("kvtier_vllm_step_save_seconds_count", engine0) == 1
    assert value("kvtier_vllm_loaded_bytes_total", engine0) == 15


def _load_tiers(registry: CollectorRegistry, engine: str) -> tuple[float | None, ...]:
    return tuple(
        registry.get_sample_value(
            "kvtier_vllm_load_tier", {"model_name": "m", "engine": engine, "tier": tier}
        )
        for tier in ("dram", "disk", "remote")
    )


def test_the_tiers_the_connector_loads_from_are_exported() -> None:
    """`kvtier_vllm_load_tier{tier}` is 1 for a tier the connector loads hits from and 0 for
    one `load_tiers` leaves out (a router reads it: such chunks are recomputed there)."""
    for extra, want in [(None, (1, 1, 1)), ({"load_tiers": "dram,remote"}, (1, 0, 1))]:
        registry = CollectorRegistry()
        _prom_metrics(registry, extra)
        for engine in ("0", "1"):
            assert _load_tiers(registry, engine) == want


def test_the_export_follows_the_measured_tier_choice() -> None:
    """Under `load_tiers: auto` the scheduler reports each measured tier's state every step
    (1: left out, -1: loaded); the gauge of that engine follows the latest, so an API server
    that missed some steps' stats still shows the current state."""
    registry = CollectorRegistry()
    metrics = _prom_metrics(registry)
    metrics.observe({"left_out/disk": 1, "hit_tokens/dram": 64})
    assert _load_tiers(registry, "0") == (1, 0, 1) and _load_tiers(registry, "1") == (1, 1, 1)
    metrics.observe({"left_out/disk": 1})  # the same state again: no drift
    assert _load_tiers(registry, "0") == (1, 0, 1)
    metrics.observe({"left_out/disk": -1, "left_out/remote": 1})
    assert _load_tiers(registry, "0") == (1, 1, 0)
