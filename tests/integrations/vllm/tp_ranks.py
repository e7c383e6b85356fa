"""One tensor-parallel rank's ChunkMover over CPU pages, joined to its peer through vLLM's
own process groups (gloo on CPU, as in a TP engine): only rank 0 holds its shard of a
chunk, so rank 1's load of it fails, and both ranks must drop that step's saves and the
next step's, through the real all-reduce (`connector._any_tp_rank`).

Usage: python tp_ranks.py RANK PORT NODE_DIR; prints `RESULT {json}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def main() -> None:
    rank, port, node_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_DIST_IDENT", f"kvtier-tp-{port}")  # vLLM's CPU group shm name
    import torch
    from tests.integrations.vllm.test_pages import _caches, _paged
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import get_tp_group
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from kvtier.config import StoreConfig
    from kvtier.integrations.vllm.connector import _any_tp_rank
    from kvtier.integrations.vllm.node import engine_config
    from kvtier.integrations.vllm.plan import ChunkCopy, RequestJobs, StepPlan, rank_keys
    from kvtier.integrations.vllm.worker import ChunkMover
    from kvtier.store import Store

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=2, rank=rank, local_rank=rank, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )  # fmt: skip
        initialize_model_parallel(tensor_model_parallel_size=2)
        caches, page_bytes = _caches(KVCacheLayout["LBHNC"], 16)
        for t in caches.values():
            t.copy_(torch.randn(t.shape).to(t.dtype))
        store = Store(engine_config(StoreConfig(chunk_tokens=32, dram_bytes=16 << 20), node_dir))
        mover = ChunkMover(store, _paged(caches, page_bytes), 2, (rank, 2), _any_tp_rank)
        held, *saved = [
            hashlib.blake2b(f"tp-{i}".encode(), digest_size=16).digest() for i in range(4)
        ]
        if rank == 0:  # rank 1 never saved its shard of `held`
            mover.save(StepPlan(saves=[RequestJobs("a", [ChunkCopy(held, (0, 1))])]))
        torch.distributed.barrier(group=get_tp_group().cpu_group)
        mover.tally.drain()
        failed = []
        loads = [[ChunkCopy(held, (4, 5))], [], []]
        for load, key, blocks in zip(loads, saved, [(6, 7), (8, 9), (10, 11)], strict=True):
            plan = StepPlan(loads=[RequestJobs("b", load)] if load else [],
                            saves=[RequestJobs("c", [ChunkCopy(key, blocks)])])  # fmt: skip
            mover.load(plan)
            mover.finish_loads()
            mover.save(plan)
            failed.append(sorted(mover.take_failed()))
        tally = mover.tally.drain()
        held_after = [store.locate([k]).chunks for k in rank_keys(saved, rank, 2)]
        mover.close()
        store.close()
    result = {"rank": rank, "failed": failed, "skipped_saves": tally.get("skipped_saves", 0),
              "held": held_after}  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
