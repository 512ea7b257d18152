"""prepare_data.py on preference pairs (issue 30, the data side): TRL's formats give TRL's tokens, stored as
prompt, chosen and rejected ids with mask bits (docs/preference.md, "Token files"); bad pairs are one line each.
The training side is tests/test_dpo.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import prepare_data
from finetune.data.dataset import load_meta
from helpers import (
    assert_one_line_error,
    conversational_pairs,
    prepare_pairs,
    run_main,
    stored_pairs,
    style_pairs,
    trl_dpo_trainer,
    write_jsonl,
)


@pytest.mark.parametrize("style", ["standard", "conversational"])
def test_same_tokens_as_trl(tmp_path, tiny_model_dir, style):
    """The same file means the same prompt / chosen / rejected tokens as DPOTrainer's (its tokenize step):
    standard pairs joined with the end token, conversational ones rendered with the chat template."""
    from transformers import AutoTokenizer

    from finetune.formats.chat import DEFAULT_CHAT_TEMPLATE

    train, val = style_pairs(12, seed=1), style_pairs(4, seed=2)
    if style == "conversational":
        train, val = conversational_pairs(train), conversational_pairs(val)
    data = prepare_pairs(tmp_path, tiny_model_dir, train, val)
    meta = load_meta(data)
    assert meta["preference"]["format"] == style and "chat" not in meta
    model_dir = tiny_model_dir
    if style == "conversational":  # the tiny tokenizer has none: TRL gets the template prepare_data.py used
        model_dir = tmp_path / "with-template"
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        tokenizer.save_pretrained(model_dir)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(Path(tiny_model_dir) / name, model_dir)
    trainer = trl_dpo_trainer(tmp_path, model_dir, train)
    theirs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset]
    assert stored_pairs(data) == theirs


@pytest.mark.parametrize("row, fragments", [
    ({"prompt": "Hi:", "chosen": " yes", "rejected": " yes"}, ("prefers nothing",)),
    ({"prompt": "Hi:", "chosen": " yes"}, ("'rejected'",)),
    ({"prompt": "", "chosen": " yes", "rejected": " no"}, ("empty", "'prompt'")),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "user", "content": "yes"}],
      "rejected": [{"role": "assistant", "content": "no"}]}, ("chosen[0]", "assistant")),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes"}],
      "rejected": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "no"}]},
     ("prompts of 'chosen' and 'rejected' differ",)),
    ({"prompt": "Hi:", "chosen": [{"role": "assistant", "content": "yes"}], "rejected": " no"}, ("mixes formats",)),
])
def test_bad_pairs_are_one_line_errors(tmp_path, tiny_model_dir, capsys, row, fragments):
    good = style_pairs(6, seed=5)
    path = write_jsonl(tmp_path / "pairs.jsonl", [*good[:3], row, *good[3:]])
    result = run_main(prepare_data.main, ["--input", path, "--tokenizer", tiny_model_dir,
                                          "--output-dir", tmp_path / "data"], capsys)
    assert_one_line_error(result, "pairs.jsonl", "line 4", "HINT", *fragments)
    assert not (tmp_path / "data" / "meta.json").exists()


def test_standard_and_conversational_pairs_do_not_mix(tmp_path, tiny_model_dir, capsys):
    rows = style_pairs(6, seed=5)
    path = write_jsonl(tmp_path / "pairs.jsonl", [*rows[:3], *conversational_pairs(rows[3:])])
    result = run_main(prepare_data.main, ["--input", path, "--tokenizer", tiny_model_dir,
                                          "--output-dir", tmp_path / "data"], capsys)
    assert_one_line_error(result, "line 4", "one format", "HINT")
