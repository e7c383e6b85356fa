"""What the connector refuses or reads before it moves any KV: `kv_connector_extra_config`,
the engine's parallelism, its KV cache spec, and what goes into the page fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.integrations.vllm.test_scheduler import LAYERS, SPEC, model_dir, node_dir, vllm_config
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from kvtier.errors import ConfigError
from kvtier.integrations.vllm.connector import KvtierConnector, connector_config
from kvtier.integrations.vllm.plan import page_fingerprint, rank_keys

__all__ = ["model_dir", "node_dir"]  # fixtures of test_scheduler's, used here too
HEADS = {"num_kv_heads": 2, "head_size": 32, "dtype": torch.float32}


def test_extra_config_takes_store_fields_size_strings_and_kvtier_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """StoreConfig's field names, sizes as text, "off" for a tier; KVTIER_* fill the rest."""
    monkeypatch.setenv("KVTIER_CHUNK_TOKENS", "128")
    monkeypatch.setenv("KVTIER_DISK_DIR", str(tmp_path))
    monkeypatch.setenv("KVTIER_DISK", "1MiB")
    config, options = connector_config({"dram_bytes": "32MiB", "model_id": "m"})
    assert config.chunk_tokens == 128 and config.dram_bytes == 32 << 20
    assert config.disk_dir == tmp_path and config.disk_bytes == 1 << 20
    assert options == {"model_id": "m", "load_async": None, "layerwise": True, "load_tiers": None}
    config, options = connector_config({"chunk_tokens": "64", "disk_dir": "off",
                                        "disk_bytes": None, "load_async": "true",
                                        "layerwise": "false"})  # fmt: skip
    assert config.chunk_tokens == 64 and config.disk_dir is None
    assert options["load_async"] is True and options["layerwise"] is False
    _, options = connector_config({"load_tiers": "dram, remote"})
    assert options["load_tiers"] == {"dram", "remote"}
    assert connector_config({"load_tiers": "Auto"})[1]["load_tiers"] is None  # measured choice
    # layer-wise loading waits in the attention hooks: vLLM must keep piecewise CUDA graphs
    assert KvtierConnector.requires_piecewise_for_cudagraph({})
    assert not KvtierConnector.requires_piecewise_for_cudagraph({"layerwise": False})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"dram_byte": "1GiB"}, "unknown keys"),
        ({"load_async": "sometimes"}, "load_async"),
        ({"layerwise": "maybe"}, "layerwise"),
        ({"load_tiers": "dram,ssd"}, "load_tiers"),
        ({"dram_bytes": "lots"}, "dram_bytes"),
    ],
)
def test_bad_extra_config_is_refused_by_name(extra: dict[str, str], message: str) -> None:
    """An unknown key, a bad load_async, layerwise or load_tiers, or an unparsable size is
    refused, naming it."""
    with pytest.raises(ConfigError, match=message):
        connector_config(extra)


@pytest.mark.parametrize(
    "parallel",
    [
        {"pipeline_parallel_size": 2},
        {"decode_context_parallel_size": 2},
        {"prefill_context_parallel_size": 2},
    ],
)
def test_pipeline_and_context_parallelism_are_refused(
    model_dir: Path, node_dir: Path, parallel: dict[str, int]
) -> None:
    """Each pipeline stage keeps its own layers, and context parallelism shards tokens:
    under keys that name only the TP rank they would collide, so the engine is refused."""
    config = vllm_config(model_dir, node_dir, "parallel", 96, False)
    for name, size in parallel.items():
        object.__setattr__(config.parallel_config, name, size)
    kv_cache = KVCacheConfig(64, [], [KVCacheGroupSpec(LAYERS, SPEC)])
    with pytest.raises(ConfigError, match=next(iter(parallel))):
        KvtierConnector(config, KVConnectorRole.SCHEDULER, kv_cache)


@pytest.mark.parametrize(
    "groups",
    [
        [KVCacheGroupSpec(LAYERS, SlidingWindowSpec(32, **HEADS, sliding_window=64))],
        [KVCacheGroupSpec(LAYERS, MLAAttentionSpec(32, **{**HEADS, "num_kv_heads": 1}))],
        [KVCacheGroupSpec(LAYERS[:1], SPEC), KVCacheGroupSpec(LAYERS[1:], SPEC)],
    ],
    ids=["sliding-window", "mla", "two-groups"],
)
def test_kv_caches_other_than_one_full_attention_group_are_refused(
    model_dir: Path, node_dir: Path, groups: list[KVCacheGroupSpec]
) -> None:
    """Sliding-window-only, MLA and several groups are refused at start."""
    config = vllm_config(model_dir, node_dir, "specs", 96, False)
    with pytest.raises(ConfigError, match="one full-attention KV cache group"):
        KvtierConnector(config, KVConnectorRole.SCHEDULER, KVCacheConfig(64, [], groups))


def test_the_fingerprint_tells_every_page_format_apart() -> None:
    """Layout, dtype, block size, page bytes, layers, TP degree, and the variant (the cache
    dtype as configured, quantization, revision) each give another fingerprint."""
    base = ("LBHNC", "uint8", 16, 4096, 32, 1, "fp8_e4m3/None/None")
    changed = [
        ("HND", *base[1:]),
        (base[0], "float16", *base[2:]),
        (*base[:2], 32, *base[3:]),
        (*base[:3], 8192, *base[4:]),
        (*base[:4], 16, *base[5:]),
        (*base[:5], 2, base[6]),
        (*base[:6], "fp8_e5m2/None/None"),
        (*base[:6], "fp8_e4m3/awq/None"),
        (*base[:6], "fp8_e4m3/None/v2"),
    ]
    prints = {page_fingerprint(*args) for args in [base, *changed]}  # type: ignore[arg-type]
    assert len(prints) == 1 + len(changed)
    assert page_fingerprint(*base) == page_fingerprint(*base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "values"),
    [("cache_dtype", ("fp8_e4m3", "fp8_e5m2")), ("quantization", (None, "awq")),
     ("revision", (None, "v2"))],
)  # fmt: skip
def test_an_engine_configured_otherwise_has_another_fingerprint(
    model_dir: Path, node_dir: Path, field: str, values: tuple[str | None, str | None]
) -> None:
    """The KV cache dtype as configured, the quantization and the revision reach the keys."""
    prints = []
    for value in values:
        config = vllm_config(model_dir, node_dir, "variant", 96, False)
        owner = config.cache_config if field == "cache_dtype" else config.model_config
        object.__setattr__(owner, field, value)
        kv_cache = KVCacheConfig(64, [], [KVCacheGroupSpec(LAYERS, SPEC)])
        connector = KvtierConnector(config, KVConnectorRole.WORKER, kv_cache)
        prints.append(connector.fingerprint)
        connector.store.close()
    assert prints[0] != prints[1]


def test_each_tensor_parallel_rank_stores_under_its_own_keys() -> None:
    """Every TP rank's keys differ from every other rank's; tp=1 keeps the chunk keys."""
    keys = [bytes([i]) * 16 for i in range(3)]
    assert rank_keys(keys, 0, 1) == keys
    ranks = [rank_keys(keys, r, 4) for r in range(4)]
    assert len({k for rank in ranks for k in rank}) == 12
    assert rank_keys(keys, 1, 4) == ranks[1] and rank_keys(keys, 1, 2) != ranks[1]


def test_a_full_attention_spec_with_a_sliding_window_is_served() -> None:
    """vLLM turns a model mixing sliding-window and full layers into full attention when a
    KV connector is set (hybrid cache off): every layer keeps its whole KV, so kvtier serves
    it, as the docs say."""
    from kvtier.integrations.vllm.connector import _attention_spec

    spec = FullAttentionSpec(32, **HEADS, sliding_window=64)
    assert _attention_spec(KVCacheConfig(64, [], [KVCacheGroupSpec(LAYERS, spec)])) is spec
