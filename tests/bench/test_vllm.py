"""`kvtier bench vllm`'s pure parts: workload sizing, returning turns, token comparison, the
SLO rate model and the judged JSON fields (no engine is started here)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
from tqdm import tqdm

from kvtier.bench import vllm as bench
from kvtier.bench import vllm_report as rep


def args(**changes: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvtier bench vllm")
    bench.add_arguments(parser)
    return parser.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in changes.items()])


def record(i: int, session: str, prompt: int, cached: int, ttft: float, **kw: Any) -> rep.Record:
    return {"id": str(i), "session": session, "turn": kw.get("turn", 0), "arrival_s": 0.0,
            "prompt_tokens": prompt, "engine": kw.get("engine", 0), "ttft_s": ttft,
            "tokens": kw.get("tokens", [1, 2]), "cached": cached,
            "hits": kw.get("hits", {"gpu": cached})}  # fmt: skip


def test_vllm_cache_holds_a_quarter_of_the_sessions() -> None:
    """The default chat and agent workloads have four times the sessions vLLM's KV cache
    holds, and the cache still fits the longest request (with vLLM's null block)."""
    for work, reqs in bench.workloads(args(workloads="chat,agent")).items():
        size = bench.sizing(reqs, 4)
        longest = max(len(r.tokens) for r in reqs) + 4
        assert size.kv_cache_tokens % bench.BLOCK_TOKENS == 0, work
        assert size.kv_cache_tokens >= size.max_model_len + bench.BLOCK_TOKENS > longest
        assert 3.0 <= size.sessions_held <= 5.0, (work, size)
        assert size.sessions >= 4 * size.sessions_held * 0.9


def test_noreuse_prompts_share_no_prefix_block() -> None:
    """No two no-reuse prompts share their first block of tokens, across rounds too; each
    round is one batch of `requests` prompts."""
    spec = bench.NoReuseSpec()
    reqs = bench.workloads(args(workloads="noreuse"))["noreuse"]
    heads = {tuple(r.tokens[: bench.BLOCK_TOKENS].tolist()) for r in reqs}
    assert len(heads) == len(reqs) == spec.requests * spec.rounds
    assert [sum(r.turn == t for r in reqs) for t in range(spec.rounds)] == [spec.requests] * 5


class FakeEngine:
    def __init__(self, name: str, walls: list[float], log: list[str]) -> None:
        self.name, self.walls, self.log = name, walls, log

    def run(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        self.log.append(self.name)
        results = [{"ttft_s": 0.1, "done_s": 0.1, "tokens": [1], "cached": 0} for _ in jobs]
        inside = 0.05 if self.name == "kvtier" else 0.0
        return {"results": results, "wall_s": self.walls.pop(0), "kvtier_tokens": 0,
                "tier_chunks": {}, "connector_s": inside}  # fmt: skip


class FakeFleet:
    def __init__(self, work: Any, engine: FakeEngine) -> None:
        self.work, self.engines = work, [engine]

    def __enter__(self) -> FakeFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def settle(self) -> None:
        self.engines[0].log.append("settled")


def test_noreuse_rounds_alternate_and_take_the_median_batch(tmp_path: Any) -> None:
    """Both configurations run each round's batch, taking turns in an order that alternates
    by round; the throughput is that of the median batch, so one slow batch (load from
    elsewhere on the machine) moves neither figure."""
    reqs = list(bench.noreuse(bench.NoReuseSpec(requests=2, prompt_tokens=32, rounds=5)))
    log: list[str] = []
    fleets: Any = {
        "vllm": FakeFleet(tmp_path / "a", FakeEngine("vllm", [1.0, 1.0, 9.0, 1.0, 1.0], log)),
        "kvtier": FakeFleet(tmp_path / "b", FakeEngine("kvtier", [1.25] * 4 + [0.1], log)),
    }
    model: Any = argparse.Namespace(vocab_size=100)

    bar: Any = argparse.Namespace(update=lambda n: None, set_description=lambda text: None)
    passes, summaries = bench._alternating(fleets, reqs, model, args(), bar)
    # each batch is followed by its fleet's write-back before the next batch starts
    assert log[1::2] == ["settled"] * 10
    assert log[::2] == ["vllm", "kvtier", "kvtier", "vllm"] * 2 + ["vllm", "kvtier"]
    assert len(summaries["kvtier"]["writeback_tail_s"]) == 5
    assert summaries["vllm"]["throughput_tokens_s"] == 2 * 32 / 1.0
    assert summaries["kvtier"]["throughput_tokens_s"] == 2 * 32 / 1.25
    assert len(passes["kvtier"]) == len(reqs)
    h = rep.headline({"noreuse": passes}, {"noreuse": summaries}, 32)
    assert h["throughput_ratio_noreuse"] == 0.8 and h["differing_tokens"] == 0
    # kvtier's own time in the engine, over all its batches (not only the median one)
    assert summaries["kvtier"]["batch_connector_s"] == [0.05] * 5
    assert math.isclose(h["connector_share_noreuse"], 5 * 0.05 / (4 * 1.25 + 0.1))


def test_rate_runs_scale_the_arrivals_and_salt_each_run(tmp_path: Any) -> None:
    """Each run at a rate sends the pass's prompts with their answer lengths, arriving at the
    workload's times scaled to that rate, under a salt no other run uses; the node settles
    after each; the measured rate and every run's figures land in the summary."""
    reqs = bench.workloads(args(workloads="agent"))["agent"][:12]
    sent: list[list[dict[str, Any]]] = []

    class RateEngine(FakeEngine):
        def run(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
            sent.append(jobs)
            rate = len(jobs) / jobs[-1]["at_s"]
            ttft = 0.2 if rate <= 3.0 else 4.0  # the SLO (1.5 s) holds up to 3 req/s
            results = [{"ttft_s": ttft, "done_s": ttft, "tokens": [1], "cached": 0}] * len(jobs)
            self.log.append(self.name)
            return {"results": results, "wall_s": 1.0, "kvtier_tokens": 7, "tier_chunks": {}}

    log: list[str] = []
    fleet = FakeFleet(tmp_path, RateEngine("kvtier", [], log))
    recs = [record(i, r.session, len(r.tokens), 0, 0.1, tokens=[5] * (i + 1))
            for i, r in enumerate(reqs)]  # fmt: skip
    summary = {"slo_rate_rps": 8.0, "slo_rate_serial_rps": 2.0}
    prompts = [[i] for i in range(len(reqs))]
    with tqdm(disable=True) as bar:
        bench._rate_at_slo(fleet, reqs, prompts, recs, summary, args(slo_probes=4), bar)
    tried = summary["slo_probes"]
    assert tried[0][0] == 4.0  # between the modelled rates
    passed = max(r for r, p90 in tried if p90 <= 1.5)
    failed = min(r for r, p90 in tried if p90 > 1.5)
    assert 2.9 < passed <= 3.0 < failed < 3.3  # bracketed
    assert passed < summary["slo_rate_measured_rps"] < failed
    assert len({jobs[0]["salt"] for jobs in sent}) == len(sent) == 4
    assert log == ["settled", "kvtier"] * 4  # the pass's write-back ends before the first
    assert summary["slo_rate_bracketed"]
    first = sent[0]
    assert [j["prompt"] for j in first] == prompts
    assert [j["max_tokens"] for j in first] == list(range(1, len(reqs) + 1))
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    gaps = [reqs[i].arrival_s - reqs[0].arrival_s for i in range(len(reqs))]
    assert np.allclose([j["at_s"] for j in first], np.array(gaps) * len(reqs) / 4.0 / span)
    assert [run["kvtier_tokens"] for run in summary["slo_runs"]] == [7] * 4


def test_returning_turns_are_those_vllm_evicted() -> None:
    """A turn returns when vLLM alone's own hit fell short of the session's previous prompt
    (whole blocks); a session's first turn never does."""
    base = [
        record(0, "a", 100, 0, 1.0),
        record(1, "b", 100, 0, 1.0),
        record(2, "a", 200, 96, 1.0, turn=1),  # kept a's 3 whole blocks
        record(3, "b", 200, 32, 1.0, turn=1),  # lost part of b
    ]
    assert rep.returning_ids(base, 32) == {"3"}


def test_ratios_and_differing_tokens() -> None:
    """The judged fields: p50 ratio over returning turns, throughput ratios (no reuse, at
    the SLO), and differing tokens counted position by position."""
    base = [record(0, "a", 1000, 0, 2.0), record(1, "a", 1100, 0, 2.0, turn=1)]
    mine = [record(0, "a", 1000, 0, 2.0), record(1, "a", 1100, 960, 0.5, turn=1, tokens=[1, 3])]
    passes = {"chat": {"vllm": base, "kvtier": mine}}
    summaries = {"chat": {n: rep.summary(r, 4.0, 3000) for n, r in passes["chat"].items()}}
    n_base = [record(i, f"n{i}", 512, 0, 1.0) for i in range(4)]
    n_mine = [record(i, f"n{i}", 512, 0, 1.0) for i in range(4)]
    summaries["noreuse"] = {"vllm": rep.summary(n_base, 2.0, 3000),
                            "kvtier": rep.summary(n_mine, 2.5, 3000)}  # fmt: skip
    h = rep.headline(passes, summaries, 32)
    assert h["ttft_p50_ratio_returning"] == 0.25
    assert h["throughput_ratio_noreuse"] == 0.8
    assert h["throughput_ratio_at_slo"] > 1.0
    assert h["differing_tokens"] == 1
    assert rep.differing_tokens(base, [record(0, "a", 1, 0, 1.0, tokens=[1])]) == 1


def test_slo_rate_is_sustainable_and_monotone() -> None:
    """The SLO rate never exceeds the engines' capacity, doubles with twice the engines or
    half the service time (roughly), drops when each request holds its engine longer than
    its first token takes, and is 0 when service alone misses the SLO."""
    one = rep.slo_rate([0.5] * 10, 1, 2.0)
    assert 0.0 < one < 2.0
    assert rep.slo_rate([0.25] * 10, 1, 2.0) > 1.8 * one
    assert rep.slo_rate([0.5] * 10, 2, 2.0) > 1.8 * one
    assert rep.slo_rate([3.0] * 10, 1, 2.0) == 0.0
    assert rep.p90_at_rate([0.5] * 10, 1, 2.5, 2000) > 2.0  # beyond capacity: unbounded
    # an engine busy until a request's last token (twice its first here) sustains less
    serial = rep.slo_rate([0.5] * 10, 1, 2.0, busy_s=[1.0] * 10)
    assert 0.3 * one < serial < 0.6 * one
    assert rep.slo_rate([0.5] * 10, 1, 2.0, busy_s=[0.5] * 10) == one


def test_the_measured_rate_search_brackets_the_slo() -> None:
    """From a start that passes it climbs until a rate fails, from one that fails it
    descends, then narrows the gap; the answer lies between the highest passing rate and
    the lowest failing one, interpolated by their p90s, and every measurement is reported."""

    def p90_at(rate: float) -> float:  # within the SLO (1 s) up to 7 req/s
        return rate / 7.0

    up, tried = rep.highest_rate(p90_at, 1.0, 2.0, 6)
    assert [r for r, _ in tried[:5]] == [2.0, 3.0, 4.5, 6.75, 10.125]  # x1.5 until one fails
    assert math.isclose(tried[5][0], math.sqrt(6.75 * 10.125))  # then the middle
    assert math.isclose(up, 7.0)  # p90 is linear in the rate here: interpolation is exact
    down, tried = rep.highest_rate(p90_at, 1.0, 20.0, 4)
    assert [round(r, 2) for r, _ in tried[:4]] == [20.0, 13.33, 8.89, 5.93]
    assert math.isclose(down, 7.0)
    assert rep.highest_rate(p90_at, 1.0, 1.0, 2) == (1.5, [(1.0, 1 / 7), (1.5, 1.5 / 7)])
    assert rep.highest_rate(lambda rate: 9.0, 1.0, 1.0, 3)[0] == 0.0  # none passed
    noisy = [(4.0, 0.5), (6.0, 2.0), (9.0, 0.8)]  # a pass above a failure is not believed
    assert rep.bracket(noisy, 1.0) == ((4.0, 0.5), (6.0, 2.0))
    assert rep.bracket(noisy[:1], 1.0) == ((4.0, 0.5), None)


def test_the_slo_ratio_is_the_measured_one_when_both_were_measured() -> None:
    """With both configurations' rates measured on a workload the SLO ratio is theirs (the
    modelled one kept beside it), and a workload measured outweighs one only modelled;
    with none measured it is the lower modelled one."""
    base = [record(0, "a", 1000, 0, 1.0), record(1, "a", 1100, 0, 1.0, turn=1)]
    mine = [record(0, "a", 1000, 0, 1.0), record(1, "a", 1100, 960, 0.25, turn=1)]
    passes = {w: {"vllm": base, "kvtier": mine} for w in ("chat", "agent")}
    summaries = {w: {n: rep.summary(r, 2.0, 3000) for n, r in passes[w].items()} for w in passes}
    modelled = rep.headline(passes, summaries, 32)
    assert modelled["throughput_ratio_at_slo_is"] == "modelled"
    summaries["agent"]["vllm"]["slo_rate_measured_rps"] = 2.0
    assert rep.headline(passes, summaries, 32)["throughput_ratio_at_slo_is"] == "modelled"
    summaries["agent"]["kvtier"]["slo_rate_measured_rps"] = 5.0
    summaries["agent"]["vllm"]["slo_rate_bracketed"] = True
    h = rep.headline(passes, summaries, 32)
    assert h["throughput_ratio_at_slo"] == h["throughput_ratio_at_slo_agent"] == 2.5
    assert h["throughput_ratio_at_slo_is"] == "measured, not bracketed: agent"  # kvtier's
    summaries["agent"]["kvtier"]["slo_rate_bracketed"] = True
    h = rep.headline(passes, summaries, 32)
    assert h["throughput_ratio_at_slo_is"] == "measured"
    assert "throughput_ratio_at_slo_chat" not in h
    want = modelled["throughput_ratio_at_slo"]
    assert h["throughput_ratio_at_slo_modelled_chat"] == want != 2.5


def test_json_fields_and_markdown(tmp_path: Any) -> None:
    """The result carries the judged fields as numbers and the markdown names the SLO and
    the break-even bandwidth."""
    base = [record(0, "a", 1000, 0, 2.0), record(1, "a", 1100, 0, 2.0, turn=1)]
    summaries = {"chat": {"vllm": rep.summary(base, 4.0, 3000)}}
    summaries["chat"]["vllm"].update(slo_rate_measured_rps=1.5, slo_probes=[(1.5, 0.9), (2.25, 4)])
    result = {
        "model": {"name": "m", "kv_bytes_per_token": 8192}, "device": "CPU: 2 cores",
        "sizing": {}, "slo_ms": 3000.0, "summaries": summaries, "wall_s": 1.0,
        "break_even": {"bytes_per_s": 8192 * 1000.0, "prefill_tokens_s": 1000.0},
        "headline": {"differing_tokens": 0, "ttft_p50_ratio_returning": math.nan},
    }  # fmt: skip
    text = rep.markdown(result)
    assert "8.2 MB/s" in text and "3000 ms" in text
    assert "| 1.500 / " in text and "1.50 -> 900, 2.25 -> 4000" in text
    rep.plot(tmp_path / "p.png", result)
    assert (tmp_path / "p.png").stat().st_size > 0


def test_engine_answers_replace_the_workload_answers() -> None:
    """Every later prompt that holds a request's answer gets the engine's generated tokens
    there instead (as many as it generated), sub-agents included; nothing else changes."""
    reqs = bench.workloads(args(workloads="chat,agent", users=3, sessions=2))
    for work, requests in reqs.items():
        answers = bench.Answers(requests)
        for i, r in enumerate(requests):
            before = answers.prompt(i)
            assert len(before) == len(r.tokens)
            answers.answered(i, [7] * min(r.output_tokens, 5))
        replaced = 0
        for i, r in enumerate(requests):
            now = answers.prompt(i)
            changed = np.flatnonzero(now != r.tokens)
            assert (now[changed] == 7).all(), work
            replaced += len(changed)
        # every request but the last of each session has its answer in a later prompt
        continued = len(requests) - len({r.session for r in requests})
        assert replaced >= 5 * continued, (work, replaced, continued)
