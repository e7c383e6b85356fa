"""Hugging Face transformers integration: `CachedModel` reuses stored prefix KV in `generate()`.

Lookup -> load the stored prefix into the model's own `DynamicCache` (layer by layer, overlapped
with the new tokens' prefill when the store has a DRAM tier) -> compute only the remaining
tokens (always at least the last prompt token) -> generate -> save the new full chunks of the
prompt and the answer in the background once generation returns (saving during decode would
compete with it for the CPU).

Only requests whose cache keeps row i = the KV of token i are served (`hf_request`: greedy and
sampling with the KV cache on; `use_cache=False`, assisted and prompt-lookup decoding, beams and
caller caches are refused with `UnsupportedModel`), and a cache that does not hold exactly one row
per processed token after `generate` is not saved (`CachedModel.unsafe_saves_skipped`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kvtier.errors import ChunkMissing
from kvtier.integrations.hf_load import (
    ChunkLoader,
    HostStaging,
    LayerKV,
    LayerLoader,
    PrefixLayer,
    ReadyLoader,
)
from kvtier.integrations.hf_request import UnsupportedModel as UnsupportedModel
from kvtier.integrations.hf_request import check_generate_kwargs
from kvtier.integrations.hf_save import ChunkSaver, TokenArray
from kvtier.keys import Key, Salt
from kvtier.layout import KVLayout
from kvtier.store import Store


class RequestStats(NamedTuple):
    """What one `generate` call reused and how long it took."""

    prompt_tokens: int
    hit_tokens: int
    hit_tier: str | None  # "dram", "disk", "dram+disk", ...; None on a miss
    ttft_s: float  # call start to the end of the prefill forward pass
    new_tokens: int
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode speed after the first token (0.0 with a single new token)."""
        steps = self.new_tokens - 1
        return steps / (self.total_s - self.ttft_s) if steps > 0 else 0.0


class Prefix(NamedTuple):
    loader: LayerLoader | None
    tokens: int
    tier: str | None


def default_model_id(config: Any) -> str:
    """`name_or_path` (or model_type) plus a digest of the config, so that two configs under
    one name never share keys. Random-weight models should pass an explicit `model_id=`."""
    values = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("_name_or_path", "name_or_path", "transformers_version")
    }
    text = json.dumps(values, sort_keys=True, default=str)
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    name = getattr(config, "name_or_path", "") or config.model_type
    return f"{name}@{digest}"


def kv_layout(model: Any) -> KVLayout:
    """The KVLayout of a decoder-only model's per-layer cache, from its config and dtype."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dtype = str(model.dtype).removeprefix("torch.")
    return KVLayout(config.num_hidden_layers, kv_heads, head_dim, dtype)


def check_supported(model: Any) -> None:
    """Refuse models whose cache is not one standard full-attention layer per decoder layer."""
    config = model.config
    what = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(
            f"{what} is an encoder-decoder model; kvtier serves decoder-only models only"
        )
    if not hasattr(model, "generate"):
        raise UnsupportedModel(f"{what} has no generate(); load it with AutoModelForCausalLM")
    if not hasattr(model, "_prepare_generation_config"):  # read by hf_request (transformers 5.x)
        raise UnsupportedModel(f"{what}.generate is not transformers 5.x GenerationMixin's")
    layers = DynamicCache(config=config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise UnsupportedModel(
            f"{what} uses cache layers {odd} (sliding window, linear/hybrid state or shared KV); "
            "kvtier only serves full-attention layers. If the window is larger than any context "
            "you use, set config.sliding_window = None (and config.layer_types) before loading"
        )
    expected = kv_layout(model).num_layers
    if len(layers) != expected:
        raise UnsupportedModel(f"{what} has {len(layers)} cache layers, expected {expected}")


class CachedModel:
    """Wraps a decoder-only transformers model so `generate` reuses KV stored in `store`.

    Not re-entrant: one `generate` at a time per CachedModel (calls are serialised).
    """

    def __init__(
        self,
        model: Any,
        store: Store,
        salt: Salt | None = None,
        model_id: str | None = None,
        save: bool = True,
        ttl_s: float | None = None,
    ) -> None:
        """`ttl_s`: the KV it saves expires that many seconds after it was saved
        (`Store.bind`)."""
        check_supported(model)
        self.model = model
        self.store = store
        self.layout = kv_layout(model)
        model_id = model_id or default_model_id(model.config)
        self.cache = store.bind(model_id, self.layout, salt, ttl_s)
        self.save = save
        self.last_request: RequestStats | None = None
        self._staging = HostStaging(self.layout, model.dtype)
        self._saver = ChunkSaver(self.cache, model.dtype)
        self._lock = threading.Lock()

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """`model.generate(input_ids, **kwargs)`, reusing the stored prefix of the prompt.

        Served: one unpadded sequence, greedy decoding or sampling with the KV cache on, and
        any logits processors, stopping criteria, streamers and `output_*` options. Anything
        else raises `UnsupportedModel` (a `ValueError`) naming the option, before any load.
        `use_cache=False` (passed, or in `model.generation_config`, which copies
        `model.config.use_cache` at load) is refused rather than served by a plain
        `model.generate` behind kvtier's back: CachedModel exists to reuse a KV cache, so a
        silent bypass would hide a quadratic decode with no reuse, and forcing the cache on
        would not return `model.generate`'s own uncached output. Set
        `model.generation_config.use_cache = True` to serve such a checkpoint.
        """
        tokens = self._check_request(input_ids, kwargs)
        with self._lock:
            start = time.perf_counter()
            prefix = self._load_prefix(tokens)
            cache = DynamicCache(config=self.model.config)
            if prefix.loader is not None:
                loader = prefix.loader
                cache.layers = [PrefixLayer(loader, i) for i in range(self.layout.num_layers)]
            first: list[float] = []
            hook = self.model.register_forward_hook(lambda *_: self._after_prefill(first))
            try:
                out = self.model.generate(input_ids, past_key_values=cache, **kwargs)
            finally:
                hook.remove()
                if prefix.loader is not None:
                    prefix.loader.finish()
            end = time.perf_counter()
            seq = out if isinstance(out, torch.Tensor) else out.sequences
            if self.save:
                full = seq[0].detach().cpu().numpy().astype(np.int64)
                first_chunk = prefix.tokens // self.cache.chunk_tokens
                self._saver.submit(tokens, full, _layers(cache), first_chunk)
            ttft = (first[0] if first else end) - start
            new = int(seq.shape[1]) - len(tokens)
            self.last_request = RequestStats(
                len(tokens), prefix.tokens, prefix.tier, ttft, new, end - start
            )
            return out

    def flush(self) -> None:
        """Wait until every background save has reached every tier of the store."""
        self._saver.flush()
        self.store.flush()

    def close(self) -> None:
        """Finish background saves; the store stays open (its owner closes it)."""
        self._saver.flush()
        self._saver.close()

    @property
    def save_errors(self) -> int:
        """Background saves that failed (they degrade to misses)."""
        return self._saver.errors

    @property
    def unsafe_saves_skipped(self) -> int:
        """Requests whose KV was not saved because the cache after `generate` did not hold
        exactly one row per processed token (sequence length - 1) for every layer, or the
        sequence did not start with the prompt. Expected to stay 0; anything else means a
        generation path this integration does not know (saving it would store wrong KV)."""
        return self._saver.unsafe_skipped

    # -- internals -------------------------------------------------------------------------

    def _check_request(self, input_ids: Any, kwargs: dict[str, Any]) -> TokenArray:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids: expected a (batch, tokens) LongTensor, as model.generate")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids: batch size {input_ids.shape[0]}; CachedModel serves one sequence "
                "per call: call generate once per row"
            )
        check_generate_kwargs(self.model, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(torch.all(mask != 0)):
            raise ValueError("attention_mask: padding is not supported; pass unpadded input_ids")
        tokens: TokenArray = input_ids[0].detach().cpu().numpy().astype(np.int64)
        return tokens

    def _load_prefix(self, tokens: TokenArray) -> Prefix:
        """Find the stored prefix (leaving at least one prompt token to compute) and start
        loading it; a chunk gone since lookup shortens the prefix instead of failing."""
        c = self.cache.chunk_tokens
        keys = self.cache.keys(tokens[: (len(tokens) - 1) // c * c])
        located = self.store.locate(keys)
        if not located.chunks:
            return Prefix(None, 0, None)
        if self.store.config.dram_bytes is not None:
            return self._acquire(keys[: located.chunks])
        n = located.chunks * c
        kv = torch.empty(self.layout.shape(n), dtype=self.model.dtype)  # (L, 2, T, H, D)
        try:
            self.cache.load(tokens[:n], out=kv)
        except ChunkMissing as exc:
            n = exc.loaded_tokens
        if not n:
            return Prefix(None, 0, None)
        loader = ReadyLoader(kv[:, :, :n], self.model.device)
        return Prefix(loader, n, _tier_name(located.tiers[: n // c]))

    def _acquire(self, keys: list[Key]) -> Prefix:
        """Pin the leading chunks in DRAM (promoting from lower tiers), then copy them into
        the cache layer by layer on a background thread."""
        views: list[memoryview] = []
        tiers: list[str] = []
        for key in keys:
            got = self.store.acquire_chunk(key, self.cache.chunk_bytes)
            if got is None:
                break
            views.append(got.view)
            tiers.append(got.tier)
        if not views:
            return Prefix(None, 0, None)
        held = keys[: len(views)]
        self.store.touch(held)

        def release() -> None:
            for key in held:
                self.store.release_chunk(key)

        c = self.cache.chunk_tokens
        loader = ChunkLoader(views, release, c, self._staging, self.model.device)
        return Prefix(loader, len(views) * c, _tier_name(tiers))

    @staticmethod
    def _after_prefill(first: list[float]) -> None:
        """Forward hook: note the first token's time."""
        if not first:
            first.append(time.perf_counter())


def _layers(cache: Any) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]  # (1, H, T, D) each, or None


def _tier_name(tiers: tuple[str, ...] | list[str]) -> str:
    return "+".join(dict.fromkeys(tiers))
