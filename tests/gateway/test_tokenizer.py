"""`--tokenizer DIR`: prompts counted in the model's own tokens, as vLLM's OpenAI server
encodes them (the match with a real server's `prompt_token_ids` is checked in
tests/integrations/vllm/test_engine.py)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from tests.gateway.procs import GatewayProcess, SimProcess
from tests.gateway.tiny_tokenizer import save_tokenizer

from kvtier.errors import ConfigError
from kvtier.gateway.tokenizer import ModelTokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(path)
    return path


def ids(tokenizer: ModelTokenizer, body: dict[str, object]) -> list[list[int]]:
    return [p.tolist() for p in tokenizer.prompts(body)]


def test_chats_and_texts_in_the_models_tokens(tokenizer_dir: Path) -> None:
    """A chat through its template (generation prompt unless turned off; text parts joined
    by newlines), texts through the tokenizer, a batch each alone, token ids as they are."""
    t = ModelTokenizer(str(tokenizer_dir))
    bos, open_, close, user, assistant = 1, 3, 4, 5, 6
    w = {i: 8 + i for i in range(4)}  # w0.. w3
    chat = {"messages": [{"role": "user", "content": "w1 w2"}]}
    assert ids(t, chat) == [[bos, open_, user, close, w[1], w[2], open_, assistant, close]]
    head = [bos, open_, user, close, w[1], w[2]]
    assert ids(t, {**chat, "add_generation_prompt": False}) == [head]
    texts = [{"type": "text", "text": "w1"}, {"type": "text", "text": "w2"}]
    parts = {"messages": [{"role": "user", "content": texts}]}
    assert ids(t, parts) == ids(t, chat)
    assert ids(t, {"prompt": "w3 w0"}) == [[w[3], w[0]]]
    assert ids(t, {"prompt": ["w1", "w2 w3"]}) == [[w[1]], [w[2], w[3]]]
    assert ids(t, {"prompt": [7, 8]}) == [[7, 8]]
    assert ids(t, {"prompt": [[7], [8, 9]]}) == [[7], [8, 9]]
    ignored = {"chat_template": "{% for i in range(3) %}w3 {% endfor %}", "tokenize": False,
               "tools": [{"type": "function"}], "nested": {"a": 1}}  # fmt: skip
    assert ids(t, {**chat, "chat_template_kwargs": ignored}) == ids(t, chat)  # never the client's
    for bad in ({"prompt": ["w1", [3]]}, {"messages": []}, {"messages": ["hi"]}, {"prompt": 3}):
        with pytest.raises(ValueError):
            t.prompts(bad)


def test_a_missing_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    """A directory with no tokenizer is refused at start, naming the option."""
    with pytest.raises(ConfigError, match="--tokenizer"):
        ModelTokenizer(str(tmp_path / "none"))


def test_a_gateway_with_a_tokenizer_routes_and_answers(tokenizer_dir: Path) -> None:
    """Started with --tokenizer, the gateway serves chats and completions as before."""
    with SimProcess() as sim, GatewayProcess(sim.urls, "--tokenizer", str(tokenizer_dir)) as gw:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=20)
        messages = [{"role": "user", "content": "w1 w2 w3"}]
        answer = c.chat.completions.create(model="sim", messages=messages, max_tokens=2)  # type: ignore[arg-type]
        assert answer.choices[0].message.content
        assert c.completions.create(model="sim", prompt="w1 w2", max_tokens=2).choices[0].text
