"""`/metrics` of `kvtier worker-sim` in Prometheus text format, under the names vLLM and
kvtier's vLLM connector use, so the gateway scrapes a simulated worker as it would a real
one. Every sample carries vLLM's `model_name` label."""

from __future__ import annotations

from collections.abc import Mapping

from kvtier.gateway.simengine import SimEngine


def render(engine: SimEngine) -> str:
    """The engine's counters and gauges."""
    n = engine.counters
    label = f'model_name="{_escape(engine.config.model)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: Mapping[str, float]) -> None:
        lines.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
        sample = name + ("_total" if kind == "counter" else "")
        for extra, value in samples.items():
            labels = label + (f",{extra}" if extra else "")
            lines.append(f"{sample}{{{labels}}} {_number(value)}")

    metric("vllm:prompt_tokens", "counter", "prompt tokens processed", {"": n.prompt_tokens})
    metric(
        "vllm:prompt_tokens_cached",
        "counter",
        "prompt tokens served from a cache",
        {"": n.cached_tokens},
    )
    metric("vllm:generation_tokens", "counter", "tokens generated", {"": n.generation_tokens})
    lines.extend(
        (
            "# HELP vllm:request_prefill_time_seconds time in the prefill lane, loads included",
            "# TYPE vllm:request_prefill_time_seconds histogram",
            f"vllm:request_prefill_time_seconds_sum{{{label}}} {_number(n.prefill_s_sum)}",
            f"vllm:request_prefill_time_seconds_count{{{label}}} {n.prefill_count}",
        )
    )
    tiers = {'tier="dram"': n.dram_hit_tokens, 'tier="shared"': n.shared_hit_tokens}
    metric("kvtier_vllm_hit_tokens", "counter", "prompt tokens loaded from a kvtier tier", tiers)
    loads = {'tier="dram"': n.dram_load_s, 'tier="shared"': n.shared_load_s}
    metric("kvtier_vllm_load_seconds", "counter", "seconds spent loading from a kvtier tier", loads)
    metric("vllm:num_requests_running", "gauge", "requests prefilling or decoding", {"": n.running})
    metric("vllm:num_requests_waiting", "gauge", "requests waiting for prefill", {"": n.waiting})
    usage = engine.cache.gpu_usage()
    metric(
        "vllm:kv_cache_usage_perc", "gauge", "fraction of GPU KV blocks in use (0..1)", {"": usage}
    )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
