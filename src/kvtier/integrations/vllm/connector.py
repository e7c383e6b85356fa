"""`KvtierConnector`: kvtier as a vLLM KV connector (v1), loaded with no change to vLLM:

    --kv-transfer-config '{"kv_connector": "KvtierConnector",
                           "kv_connector_module_path": "kvtier.integrations.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"dram_bytes": "8GiB", ...}}'

vLLM's own paged cache is the GPU tier; this moves whole chunks between its blocks and kvtier.
One instance runs in the scheduler process (`ChunkPlanner`), one in every worker (`ChunkMover`);
both are clients of the node-local kvtier process (`node.py`), so they see the same tiers.

A request with `kv_transfer_params: {"kvtier_pin": true}` (`kvtier preheat --vllm`) has the
full chunks of its prompt pinned in the node when it finishes; its answer's
`kv_transfer_params` says how many tokens were (`kvtier_pinned_tokens`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec

from kvtier.config import StoreConfig
from kvtier.errors import ConfigError
from kvtier.integrations.vllm.kvevents import stored_events
from kvtier.integrations.vllm.metrics import KvtierPromMetrics, KvtierStats
from kvtier.integrations.vllm.node import engine_store
from kvtier.integrations.vllm.pages import PagedKV
from kvtier.integrations.vllm.plan import TIERS, Geometry, StepPlan, page_fingerprint
from kvtier.integrations.vllm.scheduler import ChunkPlanner
from kvtier.integrations.vllm.tierchoice import STEP
from kvtier.integrations.vllm.worker import ChunkMover

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")
_OPTIONS = ("model_id", "node_dir", "load_async", "layerwise", "load_tiers")
PIN_PARAM = "kvtier_pin"  # kv_transfer_params: pin the prompt's chunks once it has run
IDLE_WAIT_S = 0.05  # an empty step waits at most this long for a background load


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    plan: StepPlan


def connector_config(extra: dict[str, Any]) -> tuple[StoreConfig, dict[str, Any]]:
    """`kv_connector_extra_config` as a StoreConfig (its field names; KVTIER_* variables
    fill what it leaves out) and the connector's own options (`model_id`, `node_dir`,
    `load_async`, `layerwise`, `load_tiers`)."""
    fields = set(StoreConfig.__dataclass_fields__)
    unknown = set(extra) - fields - set(_OPTIONS)
    if unknown:
        raise ConfigError(
            f"kv_connector_extra_config: unknown keys {sorted(unknown)}; use StoreConfig's "
            f"fields {sorted(fields)} or {list(_OPTIONS)}"
        )
    changes: dict[str, Any] = {}
    for key, value in extra.items():
        if key not in fields:
            continue
        if value is None or str(value).lower() in ("off", "none"):
            value = None
        elif key in ("chunk_tokens", "io_workers", "io_nice"):
            value = int(value)
        changes[key] = value
    options = {k: extra[k] for k in _OPTIONS if k in extra}
    flag = str(options.get("load_async", "auto")).lower()
    if flag not in ("auto", "true", "false", "1", "0"):
        raise ConfigError(
            f"kv_connector_extra_config: load_async must be auto, true or false, got {flag}"
        )
    options["load_async"] = None if flag == "auto" else flag in ("true", "1")
    layers = str(options.get("layerwise", "true")).lower()
    if layers not in ("true", "false", "1", "0"):
        raise ConfigError(
            f"kv_connector_extra_config: layerwise must be true or false, got {layers}"
        )
    options["layerwise"] = layers in ("true", "1")
    names = str(options.get("load_tiers", "auto")).lower()
    if names == "auto":  # each tier while it loads faster than recomputing (`tierchoice`)
        options["load_tiers"] = None
    else:
        tiers = frozenset(t.strip() for t in names.split(",") if t.strip())
        if not tiers <= set(TIERS):
            raise ConfigError(
                f"kv_connector_extra_config: load_tiers takes auto or tiers of {list(TIERS)}, "
                f"got {names!r}"
            )
        options["load_tiers"] = tiers
    return replace(StoreConfig.from_env(), **changes), options


def kv_transfer_config(extra: dict[str, Any]) -> KVTransferConfig:
    """vLLM's `kv_transfer_config` that runs kvtier with these `kv_connector_extra_config`
    keys (StoreConfig's fields and the connector's options), recomputing what fails to load."""
    return KVTransferConfig(
        kv_connector="KvtierConnector",
        kv_connector_module_path="kvtier.integrations.vllm",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=dict(extra),
    )


class KvtierConnector(KVConnectorBase_V1):
    """kvtier's KV connector; see the module docstring for how to enable it."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        assert transfer is not None
        config, options = connector_config(dict(transfer.kv_connector_extra_config or {}))
        spec = _attention_spec(kv_cache_config)
        _check_parallelism(vllm_config)
        self.geometry = Geometry(config.chunk_tokens, spec.block_size)
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        layout = kv_cache_config.kv_cache_layout or vllm_config.cache_config.kv_cache_layout
        self._layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
        self._layer_index = {name: i for i, name in enumerate(self._layer_names)}
        self._layerwise = bool(options["layerwise"])
        model = vllm_config.model_config
        self.fingerprint = page_fingerprint(
            str(layout),
            str(spec.dtype).removeprefix("torch."),
            spec.block_size,
            spec.page_size_bytes,
            len(self._layer_names),
            self.tp_size,
            f"{vllm_config.cache_config.cache_dtype}/{spec.kv_quant_mode}/{model.quantization}"
            f"/{model.revision}",
        )
        self.model_id = str(options.get("model_id") or vllm_config.model_config.model)
        node_dir = options.get("node_dir")
        self.store = engine_store(config, Path(node_dir) if node_dir else None)
        self._page_bytes = spec.page_size_bytes
        self._planner: ChunkPlanner | None = None
        self._mover: ChunkMover | None = None
        if role == KVConnectorRole.SCHEDULER:
            if transfer.kv_load_failure_policy != "recompute":
                log.warning(
                    'kvtier: kv_load_failure_policy is %r; set "recompute" so that a chunk '
                    "kvtier cannot serve is recomputed instead of failing the request",
                    transfer.kv_load_failure_policy,
                )
            events = vllm_config.kv_events_config
            self._planner = ChunkPlanner(
                self.store, self.geometry, self.model_id, self.fingerprint, self.tp_size,
                self._block_table, options["load_async"], options["load_tiers"],
                record_saves=bool(events and events.enable_kv_cache_events),
            )  # fmt: skip

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise loading (the default) waits in each attention layer's hook, which a full
        CUDA graph replays without calling; `"layerwise": false` keeps full graphs, and a
        step's loads are then in before its forward starts."""
        return bool(connector_config(dict(extra_config or {}))[1]["layerwise"])

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss, never an error

    # -- scheduler side -------------------------------------------------------------------

    def _block_table(self, req_id: str) -> list[int]:
        assert self._kv_cache_manager is not None
        table: list[int] = self._kv_cache_manager.get_block_ids(req_id)[0]
        return table

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._planner is not None
        return self._planner.matched(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._planner is not None
        self._planner.allocated(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._planner is not None
        tokens = scheduler_output.num_scheduled_tokens
        scheduled = [
            (r.req_id, r.num_computed_tokens + tokens[r.req_id])
            for r in scheduler_output.scheduled_new_reqs
        ]
        cached = scheduler_output.scheduled_cached_reqs
        scheduled += [
            (req_id, computed + tokens[req_id])
            for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True)
        ]
        plan = self._planner.plan(scheduled, scheduler_output.finished_req_ids)
        plan.idle = scheduler_output.total_num_scheduled_tokens == 0
        prefill = sum(n for n in tokens.values() if n > 1)  # decodes schedule one token
        self._planner.tiers.step_planned(plan.number, prefill)
        return KvtierMetadata(plan)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self._planner is not None:
            self._planner.loads_reported(
                set(connector_output.invalid_block_ids),
                set(connector_output.finished_recving or ()),
            )
            stats = connector_output.kv_connector_stats
            self._planner.step_returned(stats.data if stats is not None else {})

    def take_events(self) -> Iterable[KVCacheEvent]:
        """`BlockStored` (medium `CPU`) for the chunks saved since the last call, when vLLM
        publishes KV events (`kvevents.py`)."""
        if self._planner is None:
            return ()
        saved = self._planner.take_saved()
        return stored_events(saved, self.geometry) if saved else ()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._planner is None:
            return False, None
        params = None
        if (request.kv_transfer_params or {}).get(PIN_PARAM):
            params = {"kvtier_pinned_tokens": self._planner.pin(request)}
        self._planner.finished(request.request_id)
        return False, params

    # -- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        layers = [(name, kv_caches[name]) for name in self._layer_names]
        pages = PagedKV(layers, self._page_bytes)
        rank = get_tensor_model_parallel_rank() if self.tp_size > 1 else 0
        self._mover = ChunkMover(
            self.store, pages, self.geometry.blocks_per_chunk, (rank, self.tp_size),
            _any_tp_rank if self.tp_size > 1 else lambda failed: failed, self._layerwise,
        )  # fmt: skip

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self._mover is not None and isinstance(meta, KvtierMetadata):
            self._mover.load(meta.plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if self._mover is not None and layer is not None:
            self._mover.wait_for_layer(layer)

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return

    def wait_for_save(self) -> None:
        if self._mover is None:
            return
        self._mover.finish_loads()
        meta = self._get_connector_metadata()
        if isinstance(meta, KvtierMetadata):
            self._mover.save(meta.plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._mover is None:
            return None, None
        self._mover.finish_loads()  # where vLLM defers wait_for_save past this
        meta = self._get_connector_metadata()
        if isinstance(meta, KvtierMetadata) and meta.plan.idle:
            # The engine would only spin through empty steps (holding the GIL the loader
            # thread needs): wait for a background load to end instead.
            self._mover.wait_for_loads(IDLE_WAIT_S)
        return None, self._mover.take_received() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._mover.take_failed() if self._mover is not None else set()

    def shutdown(self) -> None:
        if self._mover is not None:
            self._mover.close()
        self.store.close()

    # -- metrics --------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KvtierStats | None:
        side = self._planner or self._mover
        data = side.tally.drain() if side is not None else {}
        mover = self._mover
        if mover is not None and mover.tp_rank == 0 and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, KvtierMetadata):  # the step these counters close
                data[STEP] = meta.plan.number
        return KvtierStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvtierStats:
        return KvtierStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KvtierPromMetrics:
        transfer = getattr(vllm_config, "kv_transfer_config", None)
        extra = dict(getattr(transfer, "kv_connector_extra_config", None) or {})
        loaded = connector_config(extra)[1]["load_tiers"]
        tiers = {tier: loaded is None or tier in loaded for tier in TIERS}
        return KvtierPromMetrics(
            vllm_config, metric_types, labelnames, per_engine_labelvalues, tiers
        )


def _any_tp_rank(failed: bool) -> bool:
    """Whether `failed` holds on any tensor-parallel rank (an all-reduce on vLLM's CPU group
    of the TP ranks; every rank calls it in the same steps)."""
    from vllm.distributed.parallel_state import get_tp_group

    flag = torch.tensor([int(failed)], dtype=torch.int32)
    torch.distributed.all_reduce(
        flag, op=torch.distributed.ReduceOp.MAX, group=get_tp_group().cpu_group
    )
    return bool(flag.item())


def _check_parallelism(vllm_config: VllmConfig) -> None:
    """Refuses what splits a request's KV other than by tensor parallelism: each pipeline
    stage holds its own layers, and context parallelism shards tokens, under keys that name
    the TP rank only."""
    parallel = vllm_config.parallel_config
    sizes = {
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
        "decode_context_parallel_size": getattr(parallel, "decode_context_parallel_size", 1),
        "prefill_context_parallel_size": getattr(parallel, "prefill_context_parallel_size", 1),
    }
    split = {name: size for name, size in sizes.items() if size > 1}
    if split:
        raise ConfigError(
            f"kvtier supports tensor parallelism only; this engine has {split} "
            "(pipeline and context parallelism are not supported yet)"
        )


def _attention_spec(kv_cache_config: KVCacheConfig) -> FullAttentionSpec:
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if not isinstance(spec, FullAttentionSpec) or type(spec) is not FullAttentionSpec:
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ConfigError(
            f"kvtier serves models with one full-attention KV cache group; this model has "
            f"{kinds} (sliding-window, hybrid and MLA caches are not supported yet)"
        )
    return spec
