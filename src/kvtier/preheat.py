"""`kvtier preheat FILE`: compute, store and pin the KV of a list of prompts or documents.

FILE holds one prompt per line: plain text, or (a `.jsonl` file, or `--format jsonl`) one JSON
object per line, `{"text": "..."}` or `{"tokens": [ids...]}`; blank lines are skipped. Text is
tokenized by the tokenizer of `--model DIR` with its defaults (special tokens added); the
built-in random model has none, so there each UTF-8 byte is a token (id = byte + 3). Give
`tokens` to control the ids exactly.

Each prompt goes through `CachedModel.generate(max_new_tokens=1)`: a prefix already stored is
loaded, not recomputed; the prompt's full chunks are saved, then pinned (`BoundCache.pin`), so
they stay stored however much else is saved later, across restarts too. Store options follow the
other commands (each also a KVTIER_* variable); the KV must outlive this command, so a disk tier
or a remote is required. With `--vllm URL` a vLLM server running kvtier's connector does the
work instead (`preheat_vllm.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import kvtier
from kvtier.config import env_default
from kvtier.errors import ConfigError

BYTE_OFFSET = 3  # the random model's text encoding: token id = UTF-8 byte + 3


class Prompt(NamedTuple):
    line: int
    text: str | None
    tokens: list[int] | None


class Preheated(NamedTuple):
    prompts: int
    prompt_tokens: int
    pinned_tokens: int
    short_prompts: int  # shorter than one chunk: nothing to store
    model_id: str
    tiers: dict[str, dict[str, int]]  # tier -> pinned_bytes, pinned_chunks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = env_default
    add = parser.add_argument
    add(
        "file",
        help="prompts: one per line (text), or JSONL lines {'text': ...} / {'tokens': [...]}",
    )
    add("--format", choices=("auto", "text", "jsonl"), default=env("KVTIER_PREHEAT_FORMAT", "auto"),
        help="auto: jsonl for a .jsonl file, else text")  # fmt: skip
    add("--model", default=env("KVTIER_MODEL"), help="local checkpoint dir (default: random)")
    add("--model-id", default=env("KVTIER_MODEL_ID"),
        help="key namespace; default: CachedModel's for --model (name, config digest)")  # fmt: skip
    add("--salt", default=env("KVTIER_SALT"), help="tenant salt (as CachedModel's salt=)")
    add("--device", default=env("KVTIER_DEVICE", "cpu"), help="cpu or cuda")
    add("--seed", type=int, default=int(env("KVTIER_SEED", "0") or 0), help="random model seed")
    add("--hidden", type=int, default=int(env("KVTIER_HIDDEN", "256") or 256), help="random model")
    add("--layers", type=int, default=int(env("KVTIER_LAYERS", "6") or 6), help="random model")
    add("--chunk-tokens", type=int, default=int(env("KVTIER_CHUNK_TOKENS", "256") or 256))
    add("--dram", default=env("KVTIER_DRAM", "1GiB"), help="DRAM tier size, or off")
    add("--disk-dir", default=env("KVTIER_DISK_DIR"), help="disk tier directory")
    add("--disk", default=env("KVTIER_DISK"), help="disk tier size, e.g. 100GiB")
    add(
        "--remote",
        default=env("KVTIER_REMOTE"),
        help="kvtier://host:port; kvtiers:// with TLS (token: KVTIER_REMOTE_TOKEN)",
    )
    add("--remote-ca", default=env("KVTIER_REMOTE_CA"),
        help="kvtiers://: PEM file of the CA that signed the server's certificate (default: "
        "the system's CAs)")  # fmt: skip
    add("--pin-fraction", default=env("KVTIER_PIN_FRACTION", "0.5"),
        help="share of each local tier pinned chunks may take")  # fmt: skip
    add("--vllm", default=env("KVTIER_PREHEAT_VLLM"),
        help="instead: a vLLM OpenAI server URL running kvtier's connector; it computes, "
        "saves and pins (store options and --model are then the server's)")  # fmt: skip
    add("--served-model", default=env("KVTIER_SERVED_MODEL"),
        help="--vllm: the model name to ask for (default: the server's first)")  # fmt: skip
    add("--json", action="store_true", default=env("KVTIER_JSON", "") not in ("", "0"))


def run(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(Path(args.file), args.format)
        config = None if args.vllm else store_config(args)
    except (ConfigError, OSError) as exc:
        print(f"kvtier preheat: {exc}", file=sys.stderr)
        return 2
    try:
        if config is None:
            from kvtier.preheat_vllm import preheat_vllm

            result = preheat_vllm(prompts, args.vllm, args.served_model, args.salt, args.file)
        else:
            result = preheat(prompts, config, args)
    except kvtier.KvtierError as exc:  # a refused pin, a bad line, the server (TLS, token)
        print(f"kvtier preheat: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result._asdict(), indent=1))
    else:
        print(summary(result, args.chunk_tokens))
    return 0


def store_config(args: argparse.Namespace) -> kvtier.StoreConfig:
    if not args.disk_dir and not args.remote:
        raise ConfigError(
            "give --disk-dir and --disk (or --remote kvtier://...) so the preheated KV outlives "
            "this command; to preheat a running server's cache, use --remote"
        )
    return kvtier.StoreConfig(
        chunk_tokens=args.chunk_tokens,
        dram_bytes=None if str(args.dram).lower() in ("off", "none") else args.dram,
        disk_dir=args.disk_dir or None,
        disk_bytes=args.disk if args.disk_dir else None,
        remote=args.remote or None,
        remote_token=env_default("KVTIER_REMOTE_TOKEN"),
        remote_ca=args.remote_ca or None,
        pin_fraction=args.pin_fraction,
    )


def read_prompts(path: Path, fmt: str) -> list[Prompt]:
    """The prompts of FILE; ConfigError naming the line for anything else."""
    jsonl = fmt == "jsonl" or (fmt == "auto" and path.suffix == ".jsonl")
    prompts = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        prompts.append(_json_prompt(path, number, line) if jsonl else Prompt(number, line, None))
    if not prompts:
        raise ConfigError(f"{path}: no prompts (one per line; blank lines are skipped)")
    return prompts


def _json_prompt(path: Path, number: int, line: str) -> Prompt:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ConfigError(f'{where}: not JSON ({exc}); write {{"text": ...}} lines') from exc
    text = item.get("text") if isinstance(item, dict) else None
    tokens = item.get("tokens") if isinstance(item, dict) else None
    if isinstance(text, str) and tokens is None:
        return Prompt(number, text, None)
    ints = isinstance(tokens, list) and all(type(t) is int and t >= 0 for t in tokens)
    if ints and tokens and text is None:
        return Prompt(number, None, tokens)
    raise ConfigError(
        f'{where}: expected {{"text": "..."}} or {{"tokens": [non-negative ints]}}, got {line[:80]}'
    )


def preheat(
    prompts: list[Prompt], config: kvtier.StoreConfig, args: argparse.Namespace
) -> Preheated:
    import torch
    from tqdm import tqdm

    from kvtier.demo import GREEDY, build_model
    from kvtier.integrations.transformers import CachedModel, default_model_id

    model = build_model(args)
    model_id = args.model_id or (
        default_model_id(model.config) if args.model else f"kvtier-random-seed{args.seed}"
    )
    encode = _encoder(args.model)
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    total = pinned = short = 0
    with kvtier.Store(config) as store:
        cm = CachedModel(model, store, args.salt or None, model_id)
        for prompt in tqdm(prompts, desc="kvtier preheat", unit="prompt", file=sys.stderr):
            tokens = prompt.tokens if prompt.tokens is not None else encode(prompt)
            if max(tokens, default=0) >= vocab:
                raise ConfigError(
                    f"{args.file}:{prompt.line}: token id {max(tokens)} is not below the model's "
                    f"vocabulary size {vocab}"
                )
            total += len(tokens)
            if len(tokens) < config.chunk_tokens:
                short += 1
                continue
            ids = torch.tensor([tokens], device=args.device)
            cm.generate(ids, max_new_tokens=1, **GREEDY)
            cm.flush()
            try:
                pinned += cm.cache.pin(tokens)
            except kvtier.PinRefused as exc:
                raise kvtier.PinRefused(f"{args.file}:{prompt.line}: {exc}") from exc
        cm.close()
        tiers = {
            t.name: {"pinned_bytes": t.pinned_bytes, "pinned_chunks": t.pinned_chunks}
            for t in store.stats().tiers
        }
    return Preheated(len(prompts), total, pinned, short, model_id, tiers)


def _encoder(model_dir: str | None) -> Callable[[Prompt], list[int]]:
    """Text -> token ids: the checkpoint's tokenizer, or UTF-8 bytes for the random model."""
    if model_dir is None:
        return lambda prompt: [b + BYTE_OFFSET for b in str(prompt.text).encode()]
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = str(exc)

        def no_tokenizer(prompt: Prompt) -> list[int]:
            raise ConfigError(
                f"line {prompt.line}: no tokenizer in {model_dir} ({reason}); give "
                '{"tokens": [...]} lines instead'
            )

        return no_tokenizer
    return lambda prompt: list(tokenizer(str(prompt.text))["input_ids"])


def summary(r: Preheated, chunk_tokens: int) -> str:
    tiers = ", ".join(
        f"{name} {v['pinned_chunks']} chunks ({v['pinned_bytes'] / 2**20:.1f} MiB)"
        for name, v in r.tiers.items()
    )
    lines = [
        f"kvtier preheat: {r.prompts} prompts, {r.prompt_tokens} tokens; {r.pinned_tokens} "
        f"tokens stored and pinned under model id {r.model_id!r}",
    ]
    if tiers:
        lines.append(f"pinned now: {tiers}")
    if r.short_prompts:
        lines.append(
            f"{r.short_prompts} prompts shorter than a chunk ({chunk_tokens} tokens): not stored"
        )
    return "\n".join(lines)
