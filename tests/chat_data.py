"""A writer of chat data folders for the training-side tests (the format of CHAT_FORMAT.md), made directly
with numpy: each conversation rendered with a chat template set on the tiny tokenizer, the assistant
tokens (the template's {% generation %} spans: each reply and its end-of-turn token) marked as targets.

It stands in for prepare_data.py's chat path in the tests of tests/test_chat_training.py; the folder it
writes has the files and meta.json keys that finetune_generative.py reads.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from conftest import WORDS
from finetune.tokenfiles import META_FORMAT, META_VERSION, token_dtype, tokenizer_fingerprint

# Adds no token to the tiny tokenizer (eos ends every turn); the headers end in a newline, so the rendering
# of a conversation up to "Assistant:\n" is a token prefix of the conversation with the reply.
TEST_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize + ':\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\n' }}{%- endif -%}"
)


def sentence(rng: random.Random, low: int, high: int) -> str:
    ascii_words = [w for w in WORDS if w.isascii()]
    return " ".join(rng.choice(ascii_words) for _ in range(rng.randint(low, high)))


def make_conversations(n: int, seed: int = 0, max_words: int = 12, turns: tuple[int, int] = (1, 2)) -> list[list[dict]]:
    """n conversations of mixed lengths: sometimes a system turn, 1-2 user/assistant exchanges."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(rng, 2, 5)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(*turns)):
            messages.append({"role": "user", "content": sentence(rng, 2, max_words)})
            messages.append({"role": "assistant", "content": sentence(rng, 1, max_words)})
        conversations.append(messages)
    return conversations


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, mask bytes) of one conversation: bit 0 on the assistant tokens, bit 1 on the first token."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    mask = [1 if m else 0 for m in encoded["assistant_masks"]]
    mask[0] |= 2
    return list(encoded["input_ids"]), mask


def write_chat_data(folder: Path, tokenizer, train: list[list[dict]], val: list[list[dict]],
                    template: str = TEST_TEMPLATE) -> Path:
    """train.bin/val.bin, train.mask.bin/val.mask.bin and meta.json (with its "chat" key) in `folder`."""
    tokenizer.chat_template = template
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(len(tokenizer) - 1)
    splits, max_id = {}, 0
    for split, conversations in (("train", train), ("val", val)):
        rendered = [render(tokenizer, messages) for messages in conversations]
        ids = np.array([t for r in rendered for t in r[0]], dtype=dtype)
        mask = np.array([m for r in rendered for m in r[1]], dtype=np.uint8)
        ids.tofile(folder / f"{split}.bin")
        mask.tofile(folder / f"{split}.mask.bin")
        max_id = max(max_id, int(ids.max()))
        splits[split] = {"file": f"{split}.bin", "tokens": len(ids), "chars": 0}
    meta = {
        "format": META_FORMAT, "version": META_VERSION, "dtype": dtype.name, "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id, "max_token_id": max_id,
        "tokenizer": {"name_or_path": str(tokenizer.name_or_path), "fingerprint": tokenizer_fingerprint(tokenizer),
                      "class": type(tokenizer).__name__, "add_special_tokens": False},
        "splits": splits, "sources": [], "split": {"policy": "test"},
        "chat": {"format": "messages", "template": template, "template_source": "test",
                 "train_only_replies": True, "examples": {"train": len(train), "val": len(val)},
                 "skipped": {"no_assistant_turn": 0, "nothing_to_train": 0}},
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder
