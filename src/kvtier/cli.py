"""The `kvtier` command. Each subcommand lives in its own module, imported only when used,
with `add_arguments(parser)` and `run(args) -> int`. Every option also reads a KVTIER_*
variable (see kvtier.config)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("kvtier.demo", "offline multi-turn conversation: TTFT with and without reuse"),
    "serve": ("kvtier.server.main", "run a shared cache server"),
    "inspect": ("kvtier.inspect", "list what a disk tier holds; --verify checks every checksum"),
    "nodes": ("kvtier.nodes", "the node-local stores vLLM engines share here, with their stats"),
    "preheat": ("kvtier.preheat", "compute, store and pin the KV of a file of prompts"),
    "plan": ("kvtier.bench.plan", "how much DRAM and SSD a trace needs"),
    "gateway": ("kvtier.gateway.main", "OpenAI-compatible gateway with KV-aware routing"),
    "worker-sim": ("kvtier.gateway.sim", "a fake OpenAI-compatible worker for tests and benches"),
    "queue-worker": ("kvtier.gateway.queue_worker", "run queued tasks on one engine"),
}
BENCHMARKS = {
    "io": ("kvtier.bench.io", "each tier against the raw hardware path"),
    "gpu": ("kvtier.bench.gpu", "the vLLM connector on a CUDA GPU: ordering, bandwidth, TTFT"),
    "load": ("kvtier.bench.load", "many concurrent clients against a cache server"),
    "chat": ("kvtier.bench.workload", "multi-turn chat workload"),
    "agent": ("kvtier.bench.workload", "ReAct agent workload"),
    "rag": ("kvtier.bench.workload", "RAG documents with Zipf popularity"),
    "trace": ("kvtier.bench.workload", "replay a Mooncake-format JSONL trace"),
    "vllm": ("kvtier.bench.vllm", "chat, agent and no-reuse workloads on a real vLLM engine"),
    "gateway": ("kvtier.bench.gateway", "routing policies via kvtier gateway to simulated workers"),
    "queue": ("kvtier.bench.queue", "durable queue under kill -9 of consumers: lost, doubled, DLQ"),
    "limits": ("kvtier.bench.limits", "rate limits across 4 limiter processes, priority queue"),
}


def _usage() -> str:
    lines = ["usage: kvtier COMMAND [options]   (kvtier COMMAND --help for its options)", ""]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += [f"  bench {name:<6} {text}" for name, (_, text) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "bench":
        if len(args) < 2 or args[1] not in BENCHMARKS:
            print(_usage(), file=sys.stderr)
            return 2
        prog, (module_name, text), rest = f"kvtier bench {args[1]}", BENCHMARKS[args[1]], args[2:]
    elif args[0] in COMMANDS:
        prog, (module_name, text), rest = f"kvtier {args[0]}", COMMANDS[args[0]], args[1:]
    else:
        print(f"kvtier: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=text)
    module.add_arguments(parser)
    parsed = parser.parse_args(rest)
    parsed.command = prog.split()[-1]
    result: int = module.run(parsed)
    return result


if __name__ == "__main__":
    sys.exit(main())
