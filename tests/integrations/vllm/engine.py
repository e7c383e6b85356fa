"""Run a real vLLM engine with kvtier's connector over a list of prompts; print one JSON line.

Usage: python engine.py '{"model": DIR, "extra": {...}, "jobs": [{"prompt": [...], "salt": null}]}'
(optional: "tp": tensor-parallel size, "kv_cache_bytes").
Each job's result: generated token ids, the sampled tokens' logprobs, num_cached_tokens; a job
`{"batch": [[...], ...]}` generates its prompts together, with a result for each.
Other jobs, with no result: `{"reset": true}` empties vLLM's own prefix cache,
`{"kill_node": true}` sends SIGKILL to the node-local kvtier process (`extra.node_dir`), and
`{"wait_node": true}` waits (60 s at most) until another one is up.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvtier.integrations.vllm import kv_transfer_config

    transfer = kv_transfer_config(spec["extra"])
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        block_size=32,
        max_model_len=2048,
        kv_cache_memory_bytes=spec.get("kv_cache_bytes", 32 << 20),
        kv_transfer_config=transfer,
        disable_log_stats=True,
        tensor_parallel_size=spec.get("tp", 1),
    )
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, detokenize=False)
    results = []
    killed: set[int] = set()
    for job in spec["jobs"]:
        if job.get("reset"):
            llm.reset_prefix_cache()
            continue
        if job.get("kill_node"):
            for pid in node_pids(spec["extra"]["node_dir"]):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            continue
        if job.get("wait_node"):
            deadline = time.monotonic() + 60
            while not node_pids(spec["extra"]["node_dir"]) - killed:
                assert time.monotonic() < deadline, "no node process came back"
                time.sleep(0.05)
            continue
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job.get("batch", [job.get("prompt")])]
        for prompt in prompts:
            if job.get("salt"):
                prompt["cache_salt"] = job["salt"]
        for out in llm.generate(prompts, params, use_tqdm=False):
            sample = out.outputs[0]
            logprobs = [
                step[tok].logprob
                for step, tok in zip(sample.logprobs, sample.token_ids, strict=True)
            ]
            results.append(
                {
                    "tokens": list(sample.token_ids),
                    "logprobs": logprobs,
                    "cached": out.num_cached_tokens,
                }
            )
    print("RESULTS " + json.dumps(results), flush=True)


def node_pids(node_dir: str) -> set[int]:
    """The live node-local processes under `node_dir`."""
    pids = set()
    for path in Path(node_dir).glob("*/node.json"):
        try:
            pid = int(json.loads(path.read_text())["pid"])
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError):
            continue
        pids.add(pid)
    return pids


if __name__ == "__main__":
    main()
