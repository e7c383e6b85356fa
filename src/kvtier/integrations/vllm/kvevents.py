"""vLLM KV events for the chunks kvtier saves, so a gateway knows what a worker can load.

vLLM publishes `BlockStored` events for the blocks in its GPU prefix cache (with
`--kv-events-config`) and, after them, whatever its connector's `take_events` returns. For
each chunk the connector saves, this builds the event vLLM's own CPU offloading would send:
the blocks' engine hashes (chained to the block before), their token ids, LoRA and
`cache_salt` extra keys, medium `CPU` (the node's DRAM). A gateway that indexes vLLM's events
(`kvtier gateway --kv-events`) then credits the worker with those blocks at their load cost
once they have left its GPU cache.

Limits: the events say what was saved, never what was evicted (kvtier's tiers are shared by
a node's engines and evict on their own), and a save dropped in the worker is announced all
the same. The gateway bounds what it keeps per worker, so such entries age out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vllm.distributed.kv_events import MEDIUM_CPU, BlockStored
from vllm.v1.core.kv_cache_utils import (
    generate_block_hash_extra_keys,
    maybe_convert_block_hash,
    to_event_extra_keys,
)

from kvtier.integrations.vllm.plan import Geometry
from kvtier.integrations.vllm.scheduler import SavedChunks

log = logging.getLogger("kvtier.vllm")


def stored_events(saved: Sequence[SavedChunks], geometry: Geometry) -> list[BlockStored]:
    """One `BlockStored` per run of saved chunks; none for a request whose block hashes
    are not one per block (a hash block size other than the block size)."""
    events = []
    b, k = geometry.block_size, geometry.blocks_per_chunk
    for request, first, end in saved:
        hashes = request.block_hashes
        if len(hashes) != request.num_tokens // b:
            log.debug("kvtier: no KV event for %s: block hashes do not match its blocks",
                      request.request_id)  # fmt: skip
            continue
        start, stop = first * k, min(end * k, len(hashes))
        if stop <= start:
            continue
        extra = [generate_block_hash_extra_keys(request, i * b, (i + 1) * b, 0)[0]
                 for i in range(start, stop)]  # fmt: skip
        lora = request.lora_request
        events.append(
            BlockStored(
                block_hashes=[maybe_convert_block_hash(h) for h in hashes[start:stop]],
                parent_block_hash=maybe_convert_block_hash(hashes[start - 1]) if start else None,
                token_ids=list(request.all_token_ids[start * b : stop * b]),
                block_size=b,
                lora_id=lora.adapter_id if lora else None,
                medium=MEDIUM_CPU,
                lora_name=lora.name if lora else None,
                extra_keys=to_event_extra_keys(extra),
            )
        )
    return events
