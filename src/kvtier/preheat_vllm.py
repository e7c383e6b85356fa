"""`kvtier preheat FILE --vllm URL`: preheat through a vLLM OpenAI server running kvtier's
connector. Each prompt is sent as a completion of one token with `kv_transfer_params:
{"kvtier_pin": true}`: the engine computes (or loads) its KV, the connector saves the full
chunks into its node and pins them there when the request finishes, and the answer's
`kv_transfer_params.kvtier_pinned_tokens` says how many tokens it pinned. The keys are the
connector's own (its layout fingerprint, block size, TP), so only the engine can make them.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.preheat import Preheated, Prompt

TIMEOUT_S = 600.0  # one prompt's prefill on a slow engine


def preheat_vllm(
    prompts: list[Prompt], url: str, model: str | None, salt: str | None, source: str
) -> Preheated:
    """Send every prompt through the server at `url`; what was pinned. ConfigError (naming
    the prompt's line) when the server refuses or does not run kvtier's connector."""
    from tqdm import tqdm

    from kvtier.preheat import Preheated

    base = url.rstrip("/")
    model = model or _served_model(base)
    total = pinned = 0
    for prompt in tqdm(prompts, desc="kvtier preheat (vLLM)", unit="prompt", file=sys.stderr):
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt.tokens if prompt.tokens is not None else prompt.text,
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": {"kvtier_pin": True},
        }
        if salt:
            body["cache_salt"] = salt
        answer = _post(base + "/v1/completions", body, f"{source}:{prompt.line}")
        params = answer.get("kv_transfer_params") or {}
        if "kvtier_pinned_tokens" not in params:
            raise ConfigError(
                f"{base} answered without kv_transfer_params.kvtier_pinned_tokens: it does not "
                "run kvtier's connector (--kv-transfer-config with KvtierConnector)"
            )
        total += int(answer.get("usage", {}).get("prompt_tokens", 0))
        pinned += int(params["kvtier_pinned_tokens"])
    return Preheated(len(prompts), total, pinned, 0, model, {})


def _served_model(base: str) -> str:
    try:
        with urllib.request.urlopen(base + "/v1/models", timeout=30) as reply:
            models = json.loads(reply.read())["data"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--vllm {base}: cannot list its models ({exc})") from exc
    if not models:
        raise ConfigError(f"--vllm {base}: serves no model")
    return str(models[0]["id"])


def _post(url: str, body: dict[str, Any], where: str) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            answer: dict[str, Any] = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise ConfigError(f"{where}: {url} answered {exc.code}: {detail}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {url} failed: {exc}") from exc
    return answer
