"""A tokenizer built in code (nothing downloaded) for the tests of `--tokenizer` and of vLLM's
OpenAI server, whose chats need one."""

from __future__ import annotations

from pathlib import Path


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer of 410 ids (words `w0`..`w399`) with a chat template, built
    here: the OpenAI server's chats need one, and nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|", "|>", "user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(400)])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<| {{ m['role'] }} |> {{ m['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}<| assistant |>{% endif %}"
    )
    tokenizer.save_pretrained(path)
