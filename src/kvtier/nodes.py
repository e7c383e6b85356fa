"""`kvtier nodes`: the node-local kvtier processes that vLLM engines on this machine share,
with their store's stats as they are now (the connector's own counters are in vLLM's log and
`/metrics`; these are kvtier's: chunks, bytes, hits and misses of each tier, and the writes to
disk or a shared tier not yet done)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvtier.integrations.vllm.node import default_node_dir, running_nodes

TIER_FIELDS = ("chunks", "bytes", "capacity_bytes", "hits", "misses", "evictions", "errors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node-dir", type=Path, default=None, help=f"node_dir (default {default_node_dir()})"
    )
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")


def run(args: argparse.Namespace) -> int:
    nodes = [{"run_dir": str(n.run_dir), **n.stats} for n in running_nodes(args.node_dir)]
    if args.json:
        print(json.dumps(nodes))
        return 0
    if not nodes:
        print(
            f"no node-local kvtier process is running under {args.node_dir or default_node_dir()}"
        )
        return 0
    for node in nodes:
        print(_describe(node))
    return 0


def _describe(node: dict[str, Any]) -> str:
    lines = [
        f"{node['run_dir']}: pid {node['pid']}, 127.0.0.1:{node['port']}, "
        f"{node.get('pending_writes', 0)} lower-tier writes pending"
    ]
    lines.append("  " + " ".join(f"{f:>14}" for f in ("tier", *TIER_FIELDS)))
    for name, tier in node.get("tiers", {}).items():
        lines.append(
            "  " + " ".join(f"{v!s:>14}" for v in (name, *(tier.get(f, "") for f in TIER_FIELDS)))
        )
    return "\n".join(lines)
