"""The vLLM connector's salt: a request's cache_salt (str or bytes) and LoRA adapter."""

from __future__ import annotations

from types import SimpleNamespace

from kvtier.integrations.vllm.scheduler import _salt


def _request(cache_salt: object = None, lora: bool = False) -> SimpleNamespace:
    adapter = SimpleNamespace(lora_name="a", lora_path="/p") if lora else None
    return SimpleNamespace(cache_salt=cache_salt, lora_request=adapter)


def test_str_and_bytes_cache_salt_give_the_same_salt() -> None:
    """cache_salt s and s.encode() give the same kvtier salt, with or without an adapter."""
    for lora in (False, True):
        assert _salt(_request("t-é", lora)) == _salt(_request("t-é".encode(), lora))
    assert _salt(_request("t-salt", lora=True)) == b"salt:t-salt|lora:a:/p"


def test_no_salt_and_no_adapter_is_no_salt() -> None:
    """A request without cache_salt or adapter has no salt; each alone gives distinct salts."""
    assert _salt(_request()) is None
    assert _salt(_request(b"")) is None
    assert len({_salt(_request("x")), _salt(_request(lora=True)), _salt(_request("x", True))}) == 3
