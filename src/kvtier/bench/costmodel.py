"""A cost model of one GPU (or tensor-parallel group) serving one model, for `--sim`.

Figures are public datasheet numbers (dense bf16 FLOP/s, HBM bandwidth) and typical
achievable link rates; every time the `sim` engine reports comes from here, so its results
are labelled as modelled.

- prefill_s(n new tokens after p cached) = (2 * params * n + 4 * layers * hidden * n * (p + n/2))
  / (peak FLOP/s * MFU): the weight matmuls plus causal attention over the whole prefix.
- load_s = KV bytes / bandwidth of the tier that served them: GPU cache at HBM speed, DRAM over
  PCIe, SSD at min(NVMe, PCIe), remote at min(network, PCIe). Loads are not overlapped with
  compute (a conservative choice; layer-wise overlap would hide part of them).
- A model whose weights do not fit in 70% of one GPU's memory runs tensor-parallel over the
  smallest number of GPUs where they do; FLOP/s and every bandwidth scale with that count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9
GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Gpu:
    name: str
    flops: float  # dense bf16 FLOP/s
    hbm_bytes_s: float
    memory_bytes: float
    pcie_bytes_s: float
    nvme_bytes_s: float = 7 * GB  # one datacenter NVMe SSD (Gen4); Gen5 drives reach ~14 GB/s
    network_bytes_s: float = 12.5 * GB  # 100 Gb/s


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    params: float
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden: int  # query heads x head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2  # K and V, bf16


GPUS = {
    "a100": Gpu("A100-SXM-80GB", 312e12, 2.039e12, 80 * GIB, 25 * GB),
    "h100": Gpu("H100-SXM-80GB", 989e12, 3.35e12, 80 * GIB, 50 * GB),
    "h200": Gpu("H200-SXM-141GB", 989e12, 4.8e12, 141 * GIB, 50 * GB),
    "l40s": Gpu("L40S-48GB", 362e12, 0.864e12, 48 * GIB, 25 * GB),
}
MODELS = {
    "llama-3-8b": Model("Llama-3-8B", 8.03e9, 32, 8, 128, 4096),
    "qwen2.5-7b": Model("Qwen2.5-7B", 7.62e9, 28, 4, 128, 3584),
    "llama-3-70b": Model("Llama-3-70B", 70.6e9, 80, 8, 128, 8192),
}
TIERS = ("gpu", "dram", "disk", "remote")


@dataclass(frozen=True, slots=True)
class CostModel:
    gpu: Gpu
    model: Model
    mfu: float = 0.5  # fraction of peak FLOP/s reached by prefill
    memory_util: float = 0.9  # fraction of GPU memory the engine uses (weights + KV)

    @property
    def name(self) -> str:
        tp = f" x{self.gpus}" if self.gpus > 1 else ""
        return f"{self.gpu.name}{tp} + {self.model.name}"

    @property
    def gpus(self) -> int:
        """Tensor-parallel degree needed to hold the weights (bf16) in 70% of GPU memory."""
        return max(1, math.ceil(2 * self.model.params / (0.7 * self.gpu.memory_bytes)))

    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        m = self.model
        dense = 2.0 * m.params * new_tokens
        attention = 4.0 * m.num_layers * m.hidden * new_tokens * (cached_tokens + new_tokens / 2)
        return (dense + attention) / (self.gpu.flops * self.mfu * self.gpus)

    def decode_step_s(self, context_tokens: int) -> float:
        """One decode step of one sequence: weights plus its KV read from HBM."""
        nbytes = 2 * self.model.params + context_tokens * self.model.kv_bytes_per_token
        return nbytes / (self.gpu.hbm_bytes_s * self.gpus)

    def bandwidth(self, tier: str) -> float:
        g = self.gpu
        speeds = {
            "gpu": g.hbm_bytes_s,
            "dram": g.pcie_bytes_s,
            "disk": min(g.nvme_bytes_s, g.pcie_bytes_s),
            "remote": min(g.network_bytes_s, g.pcie_bytes_s),
        }
        if tier not in speeds:
            raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")
        return speeds[tier] * self.gpus

    def load_s(self, tokens: int, tier: str) -> float:
        return tokens * self.model.kv_bytes_per_token / self.bandwidth(tier)

    def gpu_cache_tokens(self) -> int:
        """KV tokens that fit in GPU memory next to the weights: the engine's prefix cache."""
        free = self.memory_util * self.gpu.memory_bytes * self.gpus - 2 * self.model.params
        return max(0, int(free // self.model.kv_bytes_per_token))


def parse_sim(spec: str) -> CostModel:
    """`h100:llama-3-8b` -> CostModel; a clear error listing what is known otherwise."""
    gpu, sep, model = spec.lower().partition(":")
    if not sep or gpu not in GPUS or model not in MODELS:
        raise ValueError(
            f"--sim {spec!r}: expected GPU:MODEL with GPU in {', '.join(GPUS)} and MODEL in "
            f"{', '.join(MODELS)}, e.g. h100:llama-3-8b"
        )
    return CostModel(GPUS[gpu], MODELS[model])
