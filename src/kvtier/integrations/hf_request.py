"""Which `generate()` requests `CachedModel` serves: an allow-list, checked before any load.

kvtier keys KV by token ids alone and saves a cache on the premise that its row i is the K/V of
token i, computed by causal forward passes over the tokens before it. transformers keeps that
true only for plain greedy and sampling decoding with its KV cache on and no caller inputs that
change a token's KV. Everything else is refused with `UnsupportedModel` naming the option:
`use_cache=False` (every step's full recomputation is appended to the cache), assisted and
prompt-lookup decoding (they re-process the prompt into the cache and crop it), beam-style modes,
caller caches and cache implementations, inputs other than token ids (embeddings, positions,
images), token healing (rewrites the prompt). What the request resolves to is read from
transformers' own `_prepare_generation_config`, so every source counts: `generate` kwargs, a
`generation_config=` object, `model.generation_config` (which takes `use_cache` from
`model.config` when the model is loaded).
"""

from __future__ import annotations

from typing import Any, NoReturn

from transformers.generation.configuration_utils import GenerationMode

from kvtier.errors import KvtierError


class UnsupportedModel(KvtierError, ValueError):
    """The model (or request) cannot be served correctly with stored KV."""


_SERVED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

# generate()'s own arguments (named in its signature or popped from its kwargs, transformers 5.x)
_GENERATE_ARGS = frozenset(
    {
        "generation_config",
        "logits_processor",
        "stopping_criteria",
        "prefix_allowed_tokens_fn",
        "synced_gpus",
        "assistant_model",
        "streamer",
        "negative_prompt_ids",
        "negative_prompt_attention_mask",
        "custom_generate",
        "trust_remote_code",
        "tokenizer",
        "assistant_tokenizer",
    }
)
# of those, the ones that only choose among next tokens (never touch the cache); the others are
# accepted only as None or False
_SAFE_ARGS = frozenset(
    {
        "generation_config",
        "logits_processor",
        "stopping_criteria",
        "prefix_allowed_tokens_fn",
        "streamer",
        "tokenizer",
    }
)
# inputs passed on to the model's forward that leave each token's KV a function of the tokens
_SAFE_MODEL_KWARGS = frozenset({"attention_mask", "output_attentions", "output_hidden_states"})

_ASSISTED = "assisted decoding re-processes the prompt into the cache and crops it"
_ARG_REASONS = {
    "assistant_model": _ASSISTED,
    "assistant_tokenizer": _ASSISTED,
    "synced_gpus": "synced GPUs keep running forward passes into the cache after the end",
    "custom_generate": "a custom decoding loop may use the cache in any way",
}
_MODE_OPTIONS = {
    GenerationMode.ASSISTED_GENERATION: (
        "prompt_lookup_num_tokens=, assistant_early_exit= or use_mtp=: " + _ASSISTED
    ),
    GenerationMode.BEAM_SEARCH: "beam search (num_beams > 1) keeps one cache row per beam",
    GenerationMode.BEAM_SAMPLE: "beam sampling (num_beams > 1) keeps one cache row per beam",
}


def check_generate_kwargs(model: Any, kwargs: dict[str, Any]) -> None:
    """Raise `UnsupportedModel` unless `model.generate(ids, **kwargs)` is plain greedy or
    sampling decoding of one sequence, with the KV cache on and token ids as the only input."""
    for name in sorted(kwargs.keys() & (_GENERATE_ARGS - _SAFE_ARGS)):
        if kwargs[name] is not None and kwargs[name] is not False:  # may be a tensor
            _refuse(f"{name}=: {_ARG_REASONS.get(name, 'not served by CachedModel')}")
    config_kwargs = {k: v for k, v in kwargs.items() if k not in _GENERATE_ARGS}
    config, model_kwargs = model._prepare_generation_config(
        kwargs.get("generation_config"), **config_kwargs
    )
    odd = sorted(
        k for k, v in model_kwargs.items() if k not in _SAFE_MODEL_KWARGS and v is not None
    )
    if odd:
        _refuse(
            f"{', '.join(odd)}: not served by CachedModel; it manages the cache itself and stored "
            "KV is keyed by token ids alone (inputs that change a token's KV can't be reused)"
        )
    mode = config.get_generation_mode()
    if mode not in _SERVED_MODES:
        why = _MODE_OPTIONS.get(
            mode, f"{mode.value} decoding does not keep one cache row per token"
        )
        _refuse(f"{why}; CachedModel serves greedy decoding and sampling only")
    if config.use_cache is not True:
        _refuse(
            f"{_use_cache_source(kwargs)}: with use_cache=False transformers appends every "
            "step's full recomputation to the cache, so it cannot be reused. Pass use_cache=True "
            "or set model.generation_config.use_cache = True to use kvtier (tokens may then "
            "differ from uncached generation by float rounding)"
        )
    _check_fields(config)


def _check_fields(config: Any) -> None:
    if config.num_return_sequences not in (None, 1):
        _refuse("num_return_sequences > 1: CachedModel serves one sequence per call")
    if config.cache_implementation is not None:
        _refuse(f"cache_implementation={config.cache_implementation!r}: CachedModel brings its own")
    if getattr(config, "prefill_chunk_size", None) is not None:
        _refuse("prefill_chunk_size=: not served by CachedModel (it prefills only the new tokens)")
    if getattr(config, "token_healing", None):
        _refuse("token_healing=True rewrites the prompt; CachedModel serves the prompt as given")


def _use_cache_source(kwargs: dict[str, Any]) -> str:
    if kwargs.get("use_cache") is not None:
        return "use_cache=False was passed"
    passed = kwargs.get("generation_config")
    if passed is not None and passed.use_cache is not None:
        return "the generation_config passed has use_cache=False"
    return (
        "model.generation_config.use_cache is False (taken from model.config.use_cache when the "
        "model was loaded; common in checkpoints saved after gradient-checkpointed fine-tuning)"
    )


def _refuse(what: str) -> NoReturn:
    raise UnsupportedModel(f"{what}; call model.generate directly for this request")
