"""kvtier as a vLLM KV connector: `kvtier.integrations.vllm.KvtierConnector`.

The class is imported lazily so that the pure parts (`plan`, `node`) load without vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvtierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvtierConnector":
        from kvtier.integrations.vllm.connector import KvtierConnector

        return KvtierConnector
    raise AttributeError(name)
