"""`kvtier bench vllm`: chat and agent sessions, and a workload with no reuse, against a real
vLLM engine, with more live sessions than vLLM's KV cache holds.

Configurations, each in fresh engine processes (`kvtier.bench.vllm_engine`, one per engine,
driven over JSON lines: no HTTP server or tokenizer in the timed path, and the engine core
runs in that process so TTFT is timed around `LLMEngine.step()` and the connector's counters
are readable): `vllm` (vLLM alone, its prefix cache on), `kvtier` (the connector, node-local
DRAM + disk), `shared` (two engines, each with its own node-local DRAM + disk, and a kvtier
server behind both; requests go to the engines round-robin, no session routing).

Requests run one at a time in arrival order (TTFT is the service time). Then, for the
single-engine configurations of the workloads named by `--slo-workloads`, the same requests
are sent again at a rate, `--slo-probes` times, to measure the highest rate each sustains
within the TTFT SLO. The no-reuse workload measures throughput: a batch of fresh prompts per
round, `vllm` and `kvtier` engines both up and taking turns (the order alternates each round),
the throughput that of each one's median batch, so a burst of load from elsewhere on the
machine or a drift over the run weighs on neither. The default model is a random-weight Llama
built here (CPU, float32); `--model DIR` serves a real checkpoint (e.g. on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from kvtier.bench import vllm_report as rep
from kvtier.bench import workloads as wl
from kvtier.bench.metrics import percentiles_ms
from kvtier.bench.vllm_engine import EngineProcess
from kvtier.bench.vllm_model import Fleet, Model, build_default, describe
from kvtier.config import env_default

BLOCK_TOKENS = 32
CONFIGS = ("vllm", "kvtier", "shared")
# Turn lengths as LMSYS-Chat-1M measured them (mean user prompt 69.5 tokens, response 214.5).
CHAT = wl.ChatSpec(
    users=16, rounds=5, system_tokens=256, user_tokens=(32, 128), answer_tokens=(128, 320),
    think_s=30.0, start_window_s=60.0,
)  # fmt: skip
AGENT = wl.AgentSpec(
    sessions=6, steps=6, roles=2, context_tokens=(1024, 1536), thought_tokens=(32, 64),
    observation_tokens=(96, 256), step_s=4.0, parallel_every=3, parallel_calls=2, subagents=1,
    subagent_steps=1, pause_every=3, idle_s=60.0, start_window_s=30.0,
)  # fmt: skip
DEFAULT_MODEL = {
    "num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1536,
    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class NoReuseSpec:
    """Unique prompts sharing no token: nothing for any cache to reuse."""

    requests: int = 24  # per round: one batch
    prompt_tokens: int = 512
    rounds: int = 5
    seed: int = 0


def noreuse(spec: NoReuseSpec) -> Iterator[wl.Request]:
    """`rounds` batches of `requests` prompts; `turn` is the round."""
    for r in range(spec.rounds):
        for i in range(spec.requests):
            n = r * spec.requests + i
            tokens = wl.segment(spec.seed + 1000, n, spec.prompt_tokens)
            yield wl.Request(0.0, f"n{n}", tokens, 1, turn=r)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default=env_default("KVTIER_BENCH_MODEL"), help="checkpoint dir (GPU)")
    add("--chunk-tokens", type=int, default=env_default("KVTIER_CHUNK_TOKENS", "64"))
    add("--users", type=int, default=env_default("KVTIER_BENCH_USERS"), help="chat users")
    add("--sessions", type=int, default=env_default("KVTIER_BENCH_SESSIONS"), help="agents")
    add(
        "--gen-tokens",
        type=int,
        default=env_default("KVTIER_BENCH_GEN_TOKENS"),
        help="cap on generated tokens per request (default: the workload's answer lengths)",
    )
    add("--slo-ms", type=float, default=env_default("KVTIER_BENCH_SLO_MS", "1500"))
    add(
        "--slo-probes",
        type=int,
        default=env_default("KVTIER_BENCH_SLO_PROBES", "4"),
        help="runs at a rate per configuration to measure its rate at the SLO (0: modelled only)",
    )
    add(
        "--slo-workloads",
        default=env_default("KVTIER_BENCH_SLO_WORKLOADS", "agent"),
        help="workloads whose rate at the SLO is measured (chat's takes ~6 min per config on "
        "2 CPU cores: its rate there is under 2 req/s of 80 requests)",
    )
    add("--workloads", default=env_default("KVTIER_BENCH_WORKLOADS", "chat,agent,noreuse"))
    add("--seed", type=int, default=env_default("KVTIER_BENCH_SEED", "0"))
    add("--json", action="store_true", help="print one JSON object")
    add("--out", type=Path, default=env_default("KVTIER_BENCH_OUT", "results"))
    add("--work-dir", type=Path, default=env_default("KVTIER_BENCH_WORK_DIR"))


def run(args: argparse.Namespace) -> int:
    try:
        result = bench(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kvtier bench vllm: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else rep.markdown(result))
    return 0


def workloads(args: argparse.Namespace) -> dict[str, list[wl.Request]]:
    """The requests of each chosen workload, in arrival order."""
    chat = CHAT if args.users is None else _replace(CHAT, users=int(args.users))
    agent = AGENT if args.sessions is None else _replace(AGENT, sessions=int(args.sessions))
    makers = {
        "chat": lambda: wl.chat(_replace(chat, seed=args.seed)),
        "agent": lambda: wl.agent(_replace(agent, seed=args.seed)),
        "noreuse": lambda: noreuse(NoReuseSpec(seed=args.seed)),
    }
    chosen = [w.strip() for w in str(args.workloads).split(",") if w.strip()]
    unknown = sorted(set(chosen) - set(makers))
    if unknown or not chosen:
        raise ValueError(f"--workloads: unknown {unknown}; choose from {', '.join(makers)}")
    return {w: list(makers[w]()) for w in chosen}


def _replace(spec: Any, **changes: Any) -> Any:
    return type(spec)(**{**asdict(spec), **changes})


class Sizing(NamedTuple):
    kv_cache_tokens: int  # vLLM's KV cache
    sessions_held: float  # average sessions' contexts that fit in it
    sessions: int
    context_tokens: int  # every session's longest context, summed
    max_model_len: int


def sizing(requests: list[wl.Request], gen_tokens: int | None) -> Sizing:
    """vLLM's KV cache holds ~1/4 of the sessions' contexts (never less than the longest
    request, which vLLM refuses to start without)."""
    context: dict[str, int] = {}
    for r in requests:
        longest = len(r.tokens) + _gen_tokens(r, gen_tokens)
        context[r.session] = max(context.get(r.session, 0), longest)
    total = sum(context.values())
    longest = -(-(max(context.values()) + 1) // BLOCK_TOKENS) * BLOCK_TOKENS
    # vLLM keeps one block back (its null block)
    tokens = -(-max(total // 4, longest + BLOCK_TOKENS) // BLOCK_TOKENS) * BLOCK_TOKENS
    return Sizing(tokens, tokens / (total / len(context)), len(context), total, longest)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    works = workloads(args)
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-vllm-", dir=args.work_dir) as tmp:
        root = Path(tmp)
        model = describe(Path(args.model)) if args.model else build_default(root, DEFAULT_MODEL)
        measured = {w.strip() for w in str(args.slo_workloads).split(",") if w.strip()}
        if measured - {"chat", "agent"}:
            raise ValueError(f"--slo-workloads: {sorted(measured)}; choose from chat, agent")
        measured &= set(works)
        probes = {w: max(0, int(args.slo_probes)) if w in measured else 0 for w in works}
        total = sum(len(reqs) * (2 if w == "noreuse" else 3 + 2 * probes[w])
                    for w, reqs in works.items())  # fmt: skip
        passes: dict[str, dict[str, list[rep.Record]]] = {}
        summaries: dict[str, dict[str, dict[str, Any]]] = {}
        sizes: dict[str, Any] = {}
        with tqdm(total=total, desc="bench vllm", unit="req", file=sys.stderr) as bar:
            for work, reqs in works.items():
                size = sizing([r for r in reqs if r.turn == 0] if work == "noreuse" else reqs,
                              args.gen_tokens)  # fmt: skip
                sizes[work] = size._asdict()
                spec = model.spec(size.kv_cache_tokens, size.max_model_len)
                kv_bytes = size.context_tokens * model.kv_bytes_per_token
                passes[work], summaries[work] = {}, {}
                if work == "noreuse":
                    fleets = {c: Fleet(c, spec, root / f"{work}-{c}", int(args.chunk_tokens),
                                       kv_bytes) for c in CONFIGS[:2]}  # fmt: skip
                    passes[work], summaries[work] = _alternating(fleets, reqs, model, args, bar)
                    continue
                for config in CONFIGS:
                    bar.set_description(f"{work} {config}")
                    pass_dir = root / f"{work}-{config}"
                    pass_dir.mkdir()
                    with Fleet(config, spec, pass_dir, int(args.chunk_tokens), kv_bytes) as fleet:
                        recs, wall, prompts = _pass(fleet, work, reqs, model.vocab_size, args, bar)
                        s = rep.summary(recs, wall, float(args.slo_ms))
                        if probes[work] and len(fleet.engines) == 1:
                            bar.set_description(f"{work} {config} at rates")
                            _rate_at_slo(fleet, reqs, prompts, recs, s, args, bar)
                    passes[work][config] = recs
                    summaries[work][config] = s
    return _result(args, model, works, passes, summaries, sizes, time.perf_counter() - start)


def _pass(
    fleet: Fleet,
    work: str,
    requests: list[wl.Request],
    vocab: int,
    args: argparse.Namespace,
    bar: tqdm[Any],
) -> tuple[list[rep.Record], float, list[list[int]]]:
    """Requests one at a time in arrival order, round-robin over the fleet's engines; the
    records, the engines' busy time and the prompts sent."""
    records = []
    prompts: list[list[int]] = []
    wall = 0.0
    answers = Answers(requests)
    for i, r in enumerate(requests):
        engine = i % len(fleet.engines)
        prompt = (answers.prompt(i) % vocab).tolist()
        prompts.append(prompt)
        job = {"id": f"{i}", "prompt": prompt, "max_tokens": _gen_tokens(r, args.gen_tokens)}
        reply = fleet.engines[engine].run([job])
        answers.answered(i, reply["results"][0]["tokens"])
        wall += reply["wall_s"]
        records.append(_record(f"{i}", r, engine, reply, 0, True))
        records[-1]["connector_s"] = reply.get("connector_s", 0.0)
        bar.update()
    return records, wall, prompts


def _rate_at_slo(
    fleet: Fleet,
    requests: list[wl.Request],
    prompts: list[list[int]],
    records: list[rep.Record],
    summary: dict[str, Any],
    args: argparse.Namespace,
    bar: tqdm[Any],
) -> None:
    """Measures the rate at which the fleet's engine keeps TTFT p90 within the SLO, into
    `summary`: `slo_rate_measured_rps`; `slo_rate_bracketed`, whether a run passed and a
    faster one failed; `slo_probes`, each run's rate and p90; `slo_runs`, each run's figures.
    `rep.highest_rate` searches from between the two modelled rates. A run sends the pass's
    prompts again, each generating as many tokens as in the pass, arriving at the workload's
    arrival times scaled to the rate, all under a salt of that run (no hit on an earlier
    run's KV, in vLLM's cache or kvtier's). The node writes back what it saved before each
    run starts.

    The arrivals are open: a turn arrives at its time even if the session's previous answer
    has not ended (it then cannot reuse that answer's KV, with or without kvtier). Waiting
    for the answer instead (tried: b54ae72) measures the sessions' chains, not the engine's
    capacity: with 12 agent sessions, kvtier passed every rate up to 15 req/s while serving
    4.5 req/s."""
    offsets = np.array([r.arrival_s for r in requests]) - requests[0].arrival_s
    span = float(offsets[-1]) or 1.0
    runs: list[dict[str, Any]] = []

    def p90_at(rate: float) -> float:
        scale = len(requests) / rate / span
        jobs = [
            {"id": f"r{i}", "prompt": prompt, "max_tokens": len(rec["tokens"]),
             "at_s": float(offsets[i] * scale), "salt": f"rate-run-{len(runs)}"}
            for i, (prompt, rec) in enumerate(zip(prompts, records, strict=True))
        ]  # fmt: skip
        fleet.settle()  # no write-back of the pass or an earlier run runs into this one
        reply = fleet.engines[0].run(jobs)
        bar.update(len(jobs))
        results = reply["results"]
        ttft = [x["ttft_s"] for x in results]
        runs.append({
            "rate_rps": rate, "ttft_ms": percentiles_ms(ttft), "wall_s": reply["wall_s"],
            "cached_tokens": sum(x["cached"] for x in results),
            "kvtier_tokens": reply["kvtier_tokens"],
        })  # fmt: skip
        return float(np.percentile(ttft, 90))

    modelled = [summary["slo_rate_rps"], summary["slo_rate_serial_rps"]]
    start = math.sqrt(modelled[0] * modelled[1]) if all(modelled) else len(requests) / span
    slo_s = float(args.slo_ms) / 1000.0
    rate, tried = rep.highest_rate(p90_at, slo_s, start, int(args.slo_probes))
    bracketed = None not in rep.bracket(tried, slo_s)
    summary.update(
        slo_rate_measured_rps=rate, slo_rate_bracketed=bracketed, slo_probes=tried, slo_runs=runs
    )


def _gen_tokens(r: wl.Request, cap: int | None) -> int:
    return r.output_tokens if cap is None else min(r.output_tokens, int(cap))


class Answers:
    """Puts the engine's own answers into later prompts, as a chat client does.

    A workload gives each request's answer only as tokens inside the requests that continue
    it. Here the tokens the engine generated replace those answer tokens (as many as it
    generated) in every later prompt that contains them, at the same positions: a returning
    turn's history is then KV the engine computed while decoding (and kvtier saved then), and
    only the new user turn or tool observation is new. Prompt lengths do not change. Answer
    segments are unique random tokens, so finding one at its position identifies it."""

    def __init__(self, requests: list[wl.Request]) -> None:
        self._requests = requests
        self._continued = _continuations(requests)
        self._subs: list[tuple[int, np.ndarray, np.ndarray]] = []  # (at, workload's, engine's)

    def prompt(self, i: int) -> np.ndarray:
        tokens = self._requests[i].tokens
        out = tokens.copy()
        for at, theirs, ours in self._subs:
            end = at + len(theirs)
            if end <= len(tokens) and np.array_equal(tokens[at:end], theirs):
                out[at:end] = ours
        return out

    def answered(self, i: int, generated: list[int]) -> None:
        later = self._continued.get(i)
        if later is None or not generated:
            return
        at = len(self._requests[i].tokens)
        theirs = self._requests[later].tokens[at : at + len(generated)]
        self._subs.append((at, theirs, np.asarray(generated[: len(theirs)], dtype=theirs.dtype)))


def _continuations(requests: list[wl.Request]) -> dict[int, int]:
    """Each request -> the next request of its session whose prompt extends it by at least
    its answer (that prompt holds the answer right after the request's own tokens)."""
    out: dict[int, int] = {}
    last: dict[str, int] = {}
    for j, r in enumerate(requests):
        i = last.get(r.session)
        if i is not None:
            prev = requests[i].tokens
            if len(r.tokens) >= len(prev) + requests[i].output_tokens and np.array_equal(
                r.tokens[: len(prev)], prev
            ):
                out[i] = j
        last[r.session] = j
    return out


def _alternating(
    fleets: dict[str, Fleet],
    requests: list[wl.Request],
    model: Model,
    args: argparse.Namespace,
    bar: tqdm[Any],
) -> tuple[dict[str, list[rep.Record]], dict[str, dict[str, Any]]]:
    """The no-reuse rounds: each round's batch on every fleet in turn (its own tiers, so
    nothing is reused), the order alternating; summaries with the median batch's throughput.
    After each batch its fleet's node finishes writing back what it saved (`writeback_tail_s`,
    not in the batch's wall time, as the write-back that ran during the batch is), so that no
    fleet's batch pays for another's background writes."""
    records: dict[str, list[rep.Record]] = {c: [] for c in fleets}
    walls: dict[str, list[float]] = {c: [] for c in fleets}
    tails: dict[str, list[float]] = {c: [] for c in fleets}
    inside: dict[str, list[float]] = {c: [] for c in fleets}  # in the connector's hooks
    with contextlib.ExitStack() as stack:
        for fleet in fleets.values():
            fleet.work.mkdir()
            stack.enter_context(fleet)
        for r in sorted({q.turn for q in requests}):
            batch = [q for q in requests if q.turn == r]
            order = list(fleets) if r % 2 == 0 else list(reversed(fleets))
            for config in order:
                bar.set_description(f"noreuse {config} round {r + 1}")
                recs, reply = _batch(fleets[config].engines[0], batch, model.vocab_size, bar)
                t0 = time.perf_counter()
                fleets[config].settle()  # its write-back never runs into the next batch
                tails[config].append(time.perf_counter() - t0)
                records[config] += recs
                walls[config].append(reply["wall_s"])
                inside[config].append(reply.get("connector_s", 0.0))
    summaries = {}
    for config, recs in records.items():
        s = rep.summary(recs, sum(walls[config]), float(args.slo_ms))
        median = float(np.median(walls[config]))
        per_batch = len(recs) / len(walls[config])
        s["batch_wall_s"] = walls[config]
        s["writeback_tail_s"] = tails[config]  # after each batch, until its node wrote back
        s["batch_connector_s"] = inside[config]
        s["connector_s"] = sum(inside[config])
        s["throughput_rps"] = per_batch / median
        s["throughput_tokens_s"] = s["prompt_tokens"] / len(walls[config]) / median
        summaries[config] = s
    return records, summaries


def _batch(
    engine: EngineProcess, requests: list[wl.Request], vocab: int, bar: tqdm[Any]
) -> tuple[list[rep.Record], dict[str, Any]]:
    jobs = [{"id": r.session, "prompt": (r.tokens % vocab).tolist(), "max_tokens": 1}
            for r in requests]  # fmt: skip
    reply = engine.run(jobs)
    bar.update(len(requests))
    return [_record(r.session, r, 0, reply, i, False) for i, r in enumerate(requests)], reply


def _record(
    rid: str, r: wl.Request, engine: int, reply: dict[str, Any], index: int, alone: bool
) -> rep.Record:
    """One request's record; kvtier's loaded tokens are split over the node's tiers in
    proportion to the chunks each served (exact when the request ran `alone`; a batch's
    kvtier tokens are not attributed to its requests)."""
    out = reply["results"][index]
    loaded = int(reply["kvtier_tokens"]) if alone else 0
    chunks = {t: int(n) for t, n in reply["tier_chunks"].items() if t in ("dram", "disk", "remote")}
    served = sum(chunks.values())
    hits = {t: round(loaded * n / served) for t, n in chunks.items()} if served else {}
    hits["gpu"] = int(out["cached"]) - loaded
    return {
        "id": rid, "session": r.session, "turn": r.turn, "arrival_s": r.arrival_s,
        "prompt_tokens": len(r.tokens), "engine": engine, "ttft_s": out["ttft_s"],
        "done_s": out["done_s"],
        "tokens": out["tokens"], "cached": int(out["cached"]), "hits": hits,
    }  # fmt: skip


def _result(
    args: argparse.Namespace,
    model: Model,
    works: dict[str, list[wl.Request]],
    passes: dict[str, dict[str, list[rep.Record]]],
    summaries: dict[str, dict[str, dict[str, Any]]],
    sizes: dict[str, Any],
    wall_s: float,
) -> dict[str, Any]:
    base = summaries.get("noreuse", {}).get(rep.BASE)
    prefill = base["throughput_tokens_s"] if base else 0.0
    result: dict[str, Any] = {
        "benchmark": "vllm",
        "date": time.strftime("%Y-%m-%d"),
        "model": {"name": model.name, "kv_bytes_per_token": model.kv_bytes_per_token},
        "device": model.device,
        "chunk_tokens": int(args.chunk_tokens),
        "gen_tokens": "answer lengths" if args.gen_tokens is None else int(args.gen_tokens),
        "slo_ms": float(args.slo_ms),
        "slo_method": "measured (when slo_probes > 0): the pass's requests sent again to "
        "its engine at a rate (workload arrival times scaled, a fresh cache salt per run), "
        f"{int(args.slo_probes)} runs searching from between the two modelled rates; the rate "
        "where TTFT p90 reaches the SLO, interpolated between the nearest runs either side. "
        "Modelled: 2,000 Poisson arrivals, the pass's service times cycled in order, "
        "round-robin over its engines, one request at a time per engine (FIFO), each engine "
        "free at the first token (slo_rate_rps) or at the last (slo_rate_serial_rps)",
        "slo_probes": int(args.slo_probes),
        "sizing": sizes,
        "break_even": {
            "prefill_tokens_s": prefill,
            "bytes_per_s": prefill * model.kv_bytes_per_token,
            "how": "KV bytes per token x prefill tokens/s of vLLM alone on the no-reuse batch",
        },
        "workloads": {w: len(reqs) for w, reqs in works.items()},
        "summaries": summaries,
        "headline": rep.headline(passes, summaries, BLOCK_TOKENS),
        "wall_s": wall_s,
    }
    result.update(result["headline"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "vllm_requests.json").write_text(json.dumps(passes))
    (out / "vllm.md").write_text(rep.markdown(result))
    pngs = rep.plot(out / "vllm.png", result)
    result["files"] = [str(out / "vllm.json"), str(out / "vllm.md"), *map(str, pngs)]
    return result
