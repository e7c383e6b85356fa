"""The connector's figures in vLLM's stats pipeline: logged every interval by vLLM and
exported as Prometheus counters on the engine's `/metrics`.

Both sides report counter deltas (`drain()`); vLLM adds up the scheduler's and every worker's.
Hit tokens are by the tier the engine process reached them through (`remote` for the
node-local process or a shared server); inside the node, `kvtier serve`-style STATS and the
node store's own `stats()` split them into DRAM and disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvtier.integrations.vllm.plan import HIT_PREFIX
from kvtier.integrations.vllm.tierchoice import LEFT_OUT, LOAD_SECONDS
from kvtier.metrics import OP_BUCKETS

_COUNTERS = {
    "lookups": "Requests kvtier looked up",
    "failed_chunks": "Chunks a worker could not load (recomputed by vLLM)",
    "loaded_bytes": "Bytes loaded into vLLM's KV cache",
    "saved_bytes": "Bytes saved from vLLM's KV cache",
    "save_seconds": "Seconds spent saving (the copy the engine waits for)",
    "skipped_saves": "Chunks not saved: a load of their step, or of the step before, failed",
    "pinned_tokens": "Prompt tokens pinned for requests that asked (kvtier_pin)",
    "pin_failures": "Requests whose pin was refused or could not reach the node",
    "slow_tier_tokens": "Tokens kvtier held but left to vLLM: their tier loads slower than "
    "this engine recomputes (load_tiers auto)",
}
_HISTOGRAMS = {
    "request_load_seconds": "Seconds to load one request's chunks",
    "step_save_seconds": "Seconds to save one engine step's new chunks (every request's)",
}


@dataclass
class KvtierStats(KVConnectorStats):
    """Counter deltas by name (`hit_tokens/<tier>`, `loaded_bytes`, ...) and lists of samples
    for the histograms (`request_load_seconds`, ...)."""

    def reset(self) -> None:
        self.data: dict[str, float | list[float]] = {}

    def aggregate(self, other: KVConnectorStats) -> KvtierStats:
        for name, value in other.data.items():
            empty: float | list[float] = [] if isinstance(value, list) else 0
            self.data[name] = self.data.get(name, empty) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = {k: v for k, v in self.data.items() if not isinstance(v, list)}
        hits = {k: v for k, v in d.items() if k.startswith(HIT_PREFIX)}
        out: dict[str, int | float] = {"hit_tokens": sum(hits.values()), **hits}
        for kind, moved in (("load", "loaded_bytes"), ("save", "saved_bytes")):
            seconds = d.get(f"{kind}_seconds", 0.0)
            out[f"{kind}_GBps"] = round(d.get(moved, 0) / seconds / 1e9, 3) if seconds else 0.0
        counted = ("lookups", "failed_chunks", "skipped_saves", "loaded_bytes", "saved_bytes")
        for name in (*counted, "pinned_tokens", "slow_tier_tokens"):
            out[name] = d.get(name, 0)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KvtierPromMetrics(KVConnectorPromMetrics):
    """`kvtier_vllm_*_total` counters, one series per engine (and tier for hits)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
        load_tiers: dict[str, bool] | None = None,
    ) -> None:
        """`load_tiers`: whether the connector loads hits from each tier (`load_tiers`),
        exported as `kvtier_vllm_load_tier{tier}` 1 or 0 so that a router does not credit a
        worker with chunks it would recompute. Under `load_tiers: auto` every tier starts
        at 1 and follows the scheduler's choice (`left_out/<tier>` states)."""
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._load_tier = self._gauge_cls(
            name="kvtier_vllm_load_tier",
            documentation="1 if the connector loads hits from this tier, 0 if it recomputes them",
            labelnames=[*labelnames, "tier"],
        )
        for labels in per_engine_labelvalues.values():
            for tier, loaded in (load_tiers or {}).items():
                self._load_tier.labels(*labels, tier).set(int(loaded))
        counter = self._counter_cls
        self._hits = counter(
            name="kvtier_vllm_hit_tokens_total",
            documentation="Prompt tokens kvtier supplied beyond vLLM's own prefix cache",
            labelnames=[*labelnames, "tier"],
        )
        self._load_seconds = counter(
            name="kvtier_vllm_load_seconds_total",
            documentation="Seconds from the start of each whole load to its last page in, by "
            "its farthest tier (the node's promotion from disk or a server included)",
            labelnames=[*labelnames, "tier"],
        )
        self._counters = {
            name: counter(
                name=f"kvtier_vllm_{name}_total", documentation=doc, labelnames=labelnames
            )
            for name, doc in _COUNTERS.items()
        }
        self._histograms = {
            name: self._histogram_cls(
                name=f"kvtier_vllm_{name}",
                documentation=doc,
                labelnames=labelnames,
                buckets=list(OP_BUCKETS),
            )
            for name, doc in _HISTOGRAMS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in transfer_stats_data.items():
            if not value:
                continue
            if isinstance(value, list):
                if name in self._histograms:
                    histogram = self._histograms[name].labels(*labels)
                    for sample in value:
                        histogram.observe(sample)
            elif name.startswith(HIT_PREFIX):
                self._hits.labels(*labels, name.removeprefix(HIT_PREFIX)).inc(value)
            elif name.startswith(LOAD_SECONDS):
                self._load_seconds.labels(*labels, name.removeprefix(LOAD_SECONDS)).inc(value)
            elif name.startswith(LEFT_OUT):  # load_tiers auto: 1 left out, -1 loaded
                self._load_tier.labels(*labels, name.removeprefix(LEFT_OUT)).set(int(value < 0))
            elif name in self._counters:
                self._counters[name].labels(*labels).inc(value)
