"""One vLLM engine for `kvtier bench vllm`, in its own process, driven over JSON lines.

    python -m kvtier.bench.vllm_engine SPEC_JSON

SPEC: model, dtype, block_size, max_model_len, kv_cache_bytes and `extra` (the connector's
`kv_connector_extra_config`, or null for vLLM alone). The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the timing is one loop around `LLMEngine.step()` and
the connector's counters are readable. Each stdin line `{"requests": [...]}` (id, prompt,
max_tokens; optional `at_s`, its arrival in seconds after the line is read, and `salt`, its
`cache_salt`) adds each request when it arrives and steps until all finish; the reply (one
stdout line starting "KVB ") gives each request's TTFT (arrival -> first output token, so
the time it queued is in it), generated tokens and
cached prompt tokens, plus the kvtier tokens loaded, the node tiers' chunk hits and the
seconds the engine spent inside the connector's hooks (`connector_s`: kvtier's own work on the
engine's path, apart from what the node process's background writes take from the cores).

`EngineProcess` is the driver's side: it starts the process and sends the lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvtier.integrations.vllm.node import running_nodes

PREFIX = "KVB "
START_TIMEOUT_S = 600.0


class EngineProcess:
    """A running engine process; `run(requests)` returns its reply dict."""

    def __init__(self, spec: dict[str, Any], log_path: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("HF_HUB_OFFLINE", "1")
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.bench.vllm_engine", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )  # fmt: skip
        self.log_path = log_path
        self.info = self._reply()

    def run(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"requests": requests}) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(PREFIX):
                reply: dict[str, Any] = json.loads(line[len(PREFIX) :])
                return reply
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the vLLM engine process exited ({self.log_path}):\n{tail}")

    def close(self) -> None:
        if self._proc.stdin is not None and self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()


# -- inside the engine process ---------------------------------------------------------------


def _build(spec: dict[str, Any]) -> Any:
    from vllm import LLM

    from kvtier.integrations.vllm import kv_transfer_config

    transfer = None if spec.get("extra") is None else kv_transfer_config(spec["extra"])
    return LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=spec.get("enforce_eager", True),
        dtype=spec["dtype"],
        block_size=spec["block_size"],
        max_model_len=spec["max_model_len"],
        kv_cache_memory_bytes=spec["kv_cache_bytes"],
        gpu_memory_utilization=spec.get("gpu_memory_utilization", 0.9),
        enable_prefix_caching=True,
        kv_transfer_config=transfer,
        disable_log_stats=True,
    )


class HitCounter:
    """Tokens kvtier's connector served, read from the connector's stats (vLLM's public
    `get_kv_connector_stats`, drained by the scheduler each step: this wraps it and keeps
    a running total of its `hit_tokens/<tier>` counters)."""

    def __init__(self, llm: Any) -> None:
        self.tokens = 0.0
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)
        connector = getattr(getattr(core, "scheduler", None), "connector", None)
        if connector is not None:
            drain = connector.get_kv_connector_stats

            def counted() -> Any:
                stats = drain()
                for name, value in (getattr(stats, "data", None) or {}).items():
                    if name.startswith("hit_tokens/"):
                        self.tokens += value
                return stats

            connector.get_kv_connector_stats = counted


def node_tier_hits(node_dir: str | None) -> dict[str, int]:
    """Chunk hits per tier of the node-local kvtier process(es) under `node_dir`."""
    hits: dict[str, int] = {}
    for stats in _node_stats(node_dir):
        for name, tier in stats["tiers"].items():
            hits[name] = hits.get(name, 0) + int(tier.get("hits", 0))
    return hits


def node_pending_writes(node_dir: str | None) -> int:
    """Lower-tier (disk, remote) writes the node-local kvtier process(es) under `node_dir`
    have queued and not finished."""
    return sum(int(stats["pending_writes"]) for stats in _node_stats(node_dir))


def _node_stats(node_dir: str | None) -> Iterator[dict[str, Any]]:
    for node in running_nodes(Path(node_dir), strict=True) if node_dir else []:
        yield node.stats


HOOKS = (
    # scheduler side
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
    # worker side
    "start_load_kv",
    "wait_for_save",
    "get_finished",
    "get_block_ids_with_load_errors",
)


class ConnectorClock:
    """Seconds spent inside the connector's hooks, scheduler and worker side: each hook of
    both connector instances (one engine thread calls them all here) is wrapped by a timer."""

    def __init__(self, llm: Any) -> None:
        self.seconds = 0.0
        self.calls: dict[str, int] = {}
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)
        scheduler_side = getattr(getattr(core, "scheduler", None), "connector", None)
        if scheduler_side is None:
            return
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        worker_side = get_kv_transfer_group() if has_kv_transfer_group() else None
        for connector in (scheduler_side, worker_side):
            for name in HOOKS:
                if connector is not None and hasattr(connector, name):
                    setattr(connector, name, self._timed(name, getattr(connector, name)))

    def _timed(self, name: str, hook: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _serve(
    llm: Any,
    hits: HitCounter,
    clock: ConnectorClock,
    requests: list[dict[str, Any]],
    node_dir: str | None,
) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    loaded, tiers = hits.tokens, node_tier_hits(node_dir)
    inside, calls = clock.seconds, dict(clock.calls)
    start = time.perf_counter()
    first: dict[str, float] = {}
    done: dict[str, dict[str, Any]] = {}
    ours: dict[str, str] = {}  # vLLM may append a suffix to an id
    arrived = {r["id"]: float(r.get("at_s", 0.0)) for r in requests}
    due = sorted(requests, key=lambda r: arrived[r["id"]])
    while due or engine.has_unfinished_requests():
        while due and arrived[due[0]["id"]] <= time.perf_counter() - start:
            r = due.pop(0)
            params = SamplingParams(
                max_tokens=r["max_tokens"], temperature=0.0, detokenize=False, ignore_eos=True
            )
            prompt = TokensPrompt(prompt_token_ids=r["prompt"])
            if r.get("salt"):
                prompt["cache_salt"] = r["salt"]
            ours[engine.add_request(r["id"], prompt, params)] = ours[r["id"]] = r["id"]
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrived[due[0]["id"]] - (time.perf_counter() - start)))
            continue
        for out in engine.step():
            now, rid = time.perf_counter() - start, ours[out.request_id]
            if out.outputs and out.outputs[0].token_ids and rid not in first:
                first[rid] = now
            if out.finished:
                done[rid] = {
                    "id": rid,
                    "ttft_s": first.get(rid, now) - arrived[rid],
                    "done_s": now,
                    "tokens": list(out.outputs[0].token_ids),
                    "cached": int(out.num_cached_tokens or 0),
                }
    wall = time.perf_counter() - start
    return {
        "results": [done[r["id"]] for r in requests],
        "wall_s": wall,
        "kvtier_tokens": round(hits.tokens - loaded),
        "tier_chunks": _delta(node_tier_hits(node_dir), tiers),
        "connector_s": clock.seconds - inside,
        "connector_calls": _delta(clock.calls, calls),
    }


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = json.loads(sys.argv[1])
    start = time.perf_counter()
    llm = _build(spec)
    hits, clock = HitCounter(llm), ConnectorClock(llm)
    warm = [{"id": "warm-up", "prompt": [0] * 2 * spec["block_size"], "max_tokens": 2}]
    _serve(llm, hits, clock, warm, None)  # first-step costs out of the first measured request
    node_dir = (spec.get("extra") or {}).get("node_dir")
    print(PREFIX + json.dumps({"start_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        reply = _serve(llm, hits, clock, json.loads(line)["requests"], node_dir)
        print(PREFIX + json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
