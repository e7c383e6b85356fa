"""`kvtier demo`: an offline multi-turn conversation on a small local model.

Per turn it measures time to first token three ways: full recompute, the prefix resident in the
model's own DynamicCache (the ideal, kept from the previous turn), and kvtier. Then it reopens
the store (as after a restart) and resumes the conversation from disk. A summary measures a
request with nothing to reuse (kvtier vs none) and decode speed with background saving on/off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch

import kvtier
from kvtier.config import env_default, parse_size

RESUME_TURNS = 2


class TurnRow(NamedTuple):
    turn: int
    phase: str  # "live" or "restarted"
    prompt_tokens: int
    hit_tokens: int
    tier: str | None
    ttft_recompute_s: float
    ttft_resident_s: float
    ttft_kvtier_s: float
    same_output: bool  # kvtier's answer equals the resident-cache answer


class Summary(NamedTuple):
    miss_prompt_tokens: int
    ttft_miss_plain_s: float  # median, model.generate without kvtier
    ttft_miss_kvtier_s: float  # median, CachedModel with nothing stored
    decode_save_on_tok_s: float  # median decode speed while the prompt's KV is being saved
    decode_save_off_tok_s: float
    dram_vs_resident: float | None  # median ttft_kvtier / ttft_resident over DRAM hits
    disk_vs_resident: float | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = env_default
    add = parser.add_argument
    add("--turns", type=int, default=int(env("KVTIER_TURNS", "8") or 8), help="live turns")
    add("--chunk-tokens", type=int, default=int(env("KVTIER_CHUNK_TOKENS", "64") or 64))
    add("--dram", default=env("KVTIER_DRAM", "256MiB"), help="DRAM tier size, or off")
    add("--disk-dir", default=env("KVTIER_DISK_DIR"), help="default: a temp dir removed at exit")
    add("--disk", default=env("KVTIER_DISK", "1GiB"), help="disk tier size")
    add("--model", default=env("KVTIER_MODEL"), help="local checkpoint dir (default: random)")
    add("--device", default=env("KVTIER_DEVICE", "cpu"), help="cpu or cuda")
    add("--json", action="store_true", default=env("KVTIER_JSON", "") not in ("", "0"))
    add("--seed", type=int, default=int(env("KVTIER_SEED", "0") or 0))
    add("--user-tokens", type=int, default=int(env("KVTIER_USER_TOKENS", "512") or 512))
    add("--new-tokens", type=int, default=int(env("KVTIER_NEW_TOKENS", "24") or 24))
    add("--hidden", type=int, default=int(env("KVTIER_HIDDEN", "256") or 256))
    add("--layers", type=int, default=int(env("KVTIER_LAYERS", "6") or 6))
    add("--repeats", type=int, default=int(env("KVTIER_REPEATS", "5") or 5), help="best of")
    add("--threads", type=int, default=int(env("KVTIER_THREADS", "0") or 0), help="0: all")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier demo")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    model = build_model(args)
    with disk_dir(args.disk_dir) as directory:
        config = kvtier.StoreConfig(
            chunk_tokens=args.chunk_tokens,
            dram_bytes=None if str(args.dram).lower() in ("off", "none") else args.dram,
            disk_dir=directory,
            disk_bytes=parse_size(args.disk, "--disk"),
        )
        rows, summary = Conversation(model, config, args).run()
    if args.json:
        print(json.dumps([r._asdict() for r in rows] + [{"summary": summary._asdict()}], indent=1))
    else:
        print(format_table(rows, summary))
    return 0


@contextmanager
def disk_dir(path: str | None) -> Iterator[str]:
    if path:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as tmp:
        yield tmp


def build_model(args: argparse.Namespace) -> Any:
    """A local checkpoint (`--model DIR`) or a Llama-style model with random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    model: Any
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    else:
        heads = max(1, args.hidden // 64)
        config = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            vocab_size=2048,
            max_position_embeddings=32768,
            dtype="float32",
        )
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.generation_config.eos_token_id = None  # random weights: keep answers full length
    return model.to(args.device).eval()


def timed_generate(model: Any, prompt: torch.Tensor, new: int, cache: Any = None) -> Any:
    """(output ids, seconds from the call to the end of the prefill forward pass)."""
    first: list[float] = []
    hook = model.register_forward_hook(
        lambda *_: None if first else first.append(time.perf_counter())
    )
    start = time.perf_counter()
    try:
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=new, **GREEDY)
    finally:
        hook.remove()
    return out, first[0] - start


GREEDY: dict[str, Any] = {"do_sample": False, "pad_token_id": 0}


class Conversation:
    """The demo's conversation: live turns, a restart, resumed turns, then the summary."""

    def __init__(self, model: Any, config: kvtier.StoreConfig, args: argparse.Namespace) -> None:
        self.model = model
        self.config = config
        self.args = args
        self.model_id = f"kvtier-demo-{args.model or 'random'}-seed{args.seed}"
        self.device = torch.device(args.device)
        self.conv = torch.empty((1, 0), dtype=torch.long, device=self.device)
        self.resident: Any = None
        self.rng = np.random.default_rng(args.seed)

    def run(self) -> tuple[list[TurnRow], Summary]:
        from tqdm import tqdm

        from kvtier.integrations.transformers import CachedModel

        args = self.args
        total = args.turns + RESUME_TURNS + 1
        rows: list[TurnRow] = []
        with tqdm(total=total, desc="kvtier demo", unit="turn", file=sys.stderr) as bar:
            timed_generate(self.model, self.user_tokens(64), 2)  # warm up kernels
            for phase, turns in (("live", args.turns), ("restarted", RESUME_TURNS)):
                with kvtier.Store(self.config) as store:
                    store.warm()  # DRAM is pre-allocated at start-up, before serving
                    cm = CachedModel(self.model, store, model_id=self.model_id)
                    probe = CachedModel(self.model, store, None, self.model_id, save=False)
                    for _ in range(turns):
                        rows.append(self.turn(cm, probe, len(rows) + 1, phase))
                        bar.update()
                    cm.close()
            summary = self.summary(rows)
            bar.update()
        return rows, summary

    def user_tokens(self, n: int) -> torch.Tensor:
        vocab = int(self.model.config.get_text_config(decoder=True).vocab_size)
        ids = self.rng.integers(3, vocab, size=(1, n))
        return torch.from_numpy(ids).to(self.device)

    def turn(self, cm: Any, probe: Any, number: int, phase: str) -> TurnRow:
        """One turn: TTFT three ways, each the best of `--repeats` runs. kvtier's quiet runs
        (no saving) come first, so the row reports the tier that served the first one."""
        new, reps = self.args.new_tokens, self.args.repeats
        prompt = torch.cat([self.conv, self.user_tokens(self.args.user_tokens)], 1)
        recompute = min(timed_generate(self.model, prompt, 1)[1] for _ in range(reps))
        if self.resident is None:
            from transformers import DynamicCache

            self.resident = DynamicCache(config=self.model.config)
        resident = [self.probe_resident(prompt) for _ in range(reps - 1)]
        ideal, ttft = timed_generate(self.model, prompt, new, self.resident)
        runs = []
        for _ in range(reps - 1):
            probe.generate(prompt, max_new_tokens=1, **GREEDY)
            runs.append(probe.last_request)
        out = cm.generate(prompt, max_new_tokens=new, **GREEDY)
        cm.flush()  # the user's think time: saves land before the next turn
        first = [*runs, cm.last_request][0]
        same = [r.ttft_s for r in [*runs, cm.last_request] if r[1:3] == first[1:3]]
        self.conv = out
        return TurnRow(
            number,
            phase,
            first.prompt_tokens,
            first.hit_tokens,
            first.hit_tier,
            recompute,
            min([*resident, ttft]),
            min(same),
            bool(torch.equal(out, ideal)),
        )

    def probe_resident(self, prompt: torch.Tensor) -> float:
        """TTFT with the resident cache, which is then cropped back as it was."""
        before = self.resident.get_seq_length()
        ttft: float = timed_generate(self.model, prompt, 1, self.resident)[1]
        self.resident.crop(before - self.resident.get_seq_length())
        return ttft

    def summary(self, rows: list[TurnRow]) -> Summary:
        """A miss with and without kvtier, and decode speed with saving on and off (medians,
        alternating the order of the runs)."""
        from kvtier.integrations.transformers import CachedModel

        prompt = self.user_tokens(min(2048, max(64, int(self.conv.shape[1]) // 2)))
        plain: list[float] = []
        miss: list[float] = []
        on: list[float] = []
        off: list[float] = []
        with kvtier.Store(self.config) as store:
            store.warm()
            for rep in range(2 * self.args.repeats):
                plain.append(timed_generate(self.model, prompt, 1)[1])
                for save, speeds in ((True, on), (False, off)):
                    salt = f"miss-{save}-{rep}"
                    cm = CachedModel(self.model, store, salt, self.model_id, save)
                    cm.generate(prompt, max_new_tokens=max(8, self.args.new_tokens), **GREEDY)
                    cm.close()
                    store.flush()  # its disk writes land before the next timed run
                    req = cm.last_request
                    assert req is not None and req.hit_tokens == 0
                    miss.append(req.ttft_s)
                    speeds.append(req.decode_tokens_per_s)
        median = statistics.median
        return Summary(
            int(prompt.shape[1]),
            median(plain),
            median(miss),
            median(on),
            median(off),
            ratio(rows, "dram"),
            ratio(rows, "disk"),
        )


def ratio(rows: list[TurnRow], tier: str) -> float | None:
    """Median of ttft_kvtier / ttft_resident over turns whose hit involved `tier`."""
    values = [r.ttft_kvtier_s / r.ttft_resident_s for r in rows if tier in (r.tier or "")]
    return statistics.median(values) if values else None


def format_table(rows: list[TurnRow], s: Summary) -> str:
    head = "turn phase      prompt   hit  tier       recompute  resident  kvtier  kv/res  same"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.turn:>4} {r.phase:<9} {r.prompt_tokens:>7} {r.hit_tokens:>5}  "
            f"{r.tier or 'miss':<9} {r.ttft_recompute_s * 1e3:>8.0f}ms "
            f"{r.ttft_resident_s * 1e3:>7.0f}ms "
            f"{r.ttft_kvtier_s * 1e3:>5.0f}ms {r.ttft_kvtier_s / r.ttft_resident_s:>6.2f}x  "
            f"{'yes' if r.same_output else 'NO'}"
        )
    miss = s.ttft_miss_kvtier_s / s.ttft_miss_plain_s
    decode = s.decode_save_on_tok_s / s.decode_save_off_tok_s
    lines += [
        "",
        f"kvtier from DRAM vs resident prefix: {fmt_ratio(s.dram_vs_resident)} (target <= 1.15x)",
        f"kvtier from disk vs resident prefix: {fmt_ratio(s.disk_vs_resident)} (target <= 1.50x)",
        f"miss, {s.miss_prompt_tokens} tokens: kvtier {s.ttft_miss_kvtier_s * 1e3:.0f}ms vs "
        f"plain {s.ttft_miss_plain_s * 1e3:.0f}ms = {miss:.3f}x (target <= 1.03x)",
        f"decode with background saving: {s.decode_save_on_tok_s:.1f} tok/s vs "
        f"{s.decode_save_off_tok_s:.1f} without = {decode:.3f}x (target >= 0.95x)",
        "(best of --repeats runs per turn, medians across turns; resident = the prefix kept in "
        "the model's own DynamicCache, which a restart loses)",
    ]
    return "\n".join(lines)


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
