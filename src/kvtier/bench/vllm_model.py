"""The model and the engine processes of one `kvtier bench vllm` configuration.

`Model`: a checkpoint and what sizing needs (KV bytes per token from its config.json).
`Fleet`: the engine process(es) of one configuration and the kvtier parts behind them,
started on entry and all stopped on exit (node-local kvtier processes included).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from kvtier.bench.vllm_engine import EngineProcess

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MIN_DRAM_BYTES = 64 << 20
GPU_SHARE = 0.45  # of one GPU's memory per engine: two engines fit


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    path: Path
    dtype: str  # what vLLM is told: "float32" for the CPU default, "auto" for a checkpoint
    kv_bytes_per_token: int  # as vLLM stores it: layers x (K, V) x kv heads x head dim x dtype
    vocab_size: int
    max_positions: int
    device: str

    def spec(self, kv_cache_tokens: int, max_model_len: int) -> dict[str, Any]:
        """An engine process spec (`vllm_engine`) without the connector part."""
        return {
            "model": str(self.path),
            "dtype": self.dtype,
            "block_size": 32,
            "max_model_len": min(max_model_len, self.max_positions),
            "kv_cache_bytes": kv_cache_tokens * self.kv_bytes_per_token,
            # Two engines of a pass may share one GPU (the no-reuse pair, `shared`). The KV
            # cache is sized by kv_cache_bytes; this only lowers vLLM's start-up demand for
            # free device memory (0.9 of it by default), which a second engine cannot meet.
            "gpu_memory_utilization": GPU_SHARE,
            "extra": None,
        }


def describe(path: Path, dtype: str = "auto") -> Model:
    """A checkpoint directory (a Hugging Face config.json with standard attention fields)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--model {path}: no readable config.json ({exc})") from exc
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    stored = dtype if dtype != "auto" else str(cfg.get("torch_dtype") or "bfloat16")
    per_token = int(cfg["num_hidden_layers"]) * 2 * kv_heads * head_dim * DTYPE_BYTES[stored]
    return Model(
        name=path.name, path=path, dtype=dtype, kv_bytes_per_token=per_token,
        vocab_size=int(cfg["vocab_size"]),
        max_positions=int(cfg.get("max_position_embeddings", 4096)), device=_device(),
    )  # fmt: skip


def build_default(root: Path, fields: dict[str, Any]) -> Model:
    """A random-weight Llama (seeded) saved under `root`, served in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, initializer_range=0.02, **fields)
    path = root / "model"
    LlamaForCausalLM(config).save_pretrained(path)  # type: ignore[no-untyped-call]
    name = f"random Llama {fields['num_hidden_layers']}x{fields['hidden_size']} float32"
    return replace(describe(path, "float32"), name=name)


def _device() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return f"CPU: {os.cpu_count()} cores"


class Fleet:
    """`vllm`: one engine alone; `kvtier`: one engine with the connector (node-local DRAM +
    disk); `shared`: two engines, each its own node-local DRAM + disk, a kvtier server behind."""

    def __init__(
        self, config: str, spec: dict[str, Any], work: Path, chunk_tokens: int, kv_bytes: int
    ) -> None:
        self.config, self.spec, self.work = config, spec, work
        self.chunk_tokens, self.kv_bytes = chunk_tokens, kv_bytes
        self.engines: list[EngineProcess] = []
        self._nodes: list[Path] = []
        self._server: Any = None
        self._server_store: Any = None

    def __enter__(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        if self.config == "vllm":
            self.engines.append(EngineProcess(self.spec, self.work / "engine0.log"))
            return
        remote = None
        if self.config == "shared":
            from kvtier.config import StoreConfig
            from kvtier.server.server import ServerThread
            from kvtier.store import Store

            dram = max(MIN_DRAM_BYTES, 2 * self.kv_bytes)
            self._server_store = Store(StoreConfig(chunk_tokens=self.chunk_tokens, dram_bytes=dram))
            self._server = ServerThread(self._server_store)
            remote = self._server.url
        for i in range(2 if self.config == "shared" else 1):
            extra = self._node(i, remote)
            spec = {**self.spec, "extra": extra}
            self.engines.append(EngineProcess(spec, self.work / f"engine{i}.log"))

    def _node(self, i: int, remote: str | None) -> dict[str, Any]:
        """DRAM holds half the workload's KV, the disk all of it (and more)."""
        disk = self.work / f"disk{i}"
        disk.mkdir()
        self._nodes.append(self.work / f"node{i}")
        return {
            "chunk_tokens": self.chunk_tokens,
            "dram_bytes": max(MIN_DRAM_BYTES, self.kv_bytes // 2),
            "disk_dir": str(disk),
            "disk_bytes": max(4 * MIN_DRAM_BYTES, 4 * self.kv_bytes),
            "node_dir": str(self._nodes[-1]),
            "remote": remote,
        }

    def settle(self, timeout_s: float = 120.0) -> None:
        """Wait until the node processes have written to their lower tiers everything saved
        so far, so that no write-back of this fleet's runs while another fleet is measured."""
        from kvtier.bench.vllm_engine import node_pending_writes

        deadline = time.monotonic() + timeout_s
        while any(node_pending_writes(str(n)) for n in self._nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvtier's node writes did not finish in {timeout_s:g} s")
            time.sleep(0.02)

    def close(self) -> None:
        from kvtier.integrations.vllm.node import stop_nodes

        for engine in self.engines:
            engine.close()
        for node_dir in self._nodes:
            stop_nodes(node_dir)
        if self._server is not None:
            self._server.stop()
            self._server_store.close()
