"""kvtier as a vLLM KV connector: `kvtier.integrations.vllm.KvtierConnector`, and
`kv_transfer_config(extra)` that enables it.

Both are imported lazily so that the pure parts (`plan`, `node`) load without vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvtierConnector", "kv_transfer_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kvtier.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(name)
