"""prepare_data.py on chat records (messages, instruction, prompt/completion; JSON lines, JSON, CSV, Parquet):
train.bin + train.mask.bin (and val) against an independent reference per record: transformers'
apply_chat_template with return_assistant_tokens_mask for conversations, TRL's join for prompt/completion.
Runs are in-process (prep.main) to stay fast."""
from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

import prepare_data as prep
from finetune.formats import chat
from finetune.formats.chat import DEFAULT_CHAT_TEMPLATE
from finetune.formats.tokenfiles import load_meta
from helpers import assert_one_line_error, run_main


def run(args: list, capsys):
    return run_main(prep.main, args, capsys)


WORDS = "the a sea ship captain whale wind storm quiet morning old house garden said found".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize()


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-2 exchanges, some with a system turn or text parts; every 7th without a reply."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = [{"role": "system", "content": sentence(rng, 4)}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            user = sentence(rng, 6)
            if i % 5 == 0:
                user = [{"type": "text", "text": user[:5]}, {"type": "text", "text": user[5:]}]
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": sentence(rng, 8) + "."}]
        if i % 7 == 3:
            messages = messages[:-1]
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            messages = [m for m in messages if m["role"] != "assistant"]
        records.append({"id": i, "messages": messages})
    return records


def instructions(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": sentence(rng, 5), "input": sentence(rng, 3) if i % 2 else "", "output": sentence(rng, 7)}
            for i in range(n)]


def pairs(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, 5) + ":", "completion": " " + sentence(rng, 6)} for i in range(n)]


def reference(tok, record: dict) -> tuple[list[int], list[int]] | None:
    """(ids, mask bytes) of one record, computed without finetune/formats/chat.py; None when it is skipped."""
    eos = tok.eos_token
    if "prompt" in record:
        ids = tok(record["prompt"] + record["completion"] + eos, add_special_tokens=False)["input_ids"]
        start = len(tok(record["prompt"], add_special_tokens=False)["input_ids"])
        mask = [0] * start + [1] * (len(ids) - start)
    else:
        if "messages" in record:
            messages = record["messages"]
        else:
            user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        if not any(m["role"] == "assistant" for m in messages):
            return None
        hf = tok.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, mask = list(hf["input_ids"]), list(hf["assistant_masks"])
    mask[0] |= 2
    return ids, mask


def reassembled(out) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """ids and masks of both splits put back in input order, and where each validation range went."""
    meta = load_meta(out)
    files = {split: (np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]),
                     np.fromfile(out / f"{split}.mask.bin", dtype=np.uint8)) for split in ("train", "val")}
    for split, (ids, mask) in files.items():
        assert len(ids) == len(mask) == meta["splits"][split]["tokens"]  # one mask byte per token
    ids, masks, placed, t = [], [], [], 0
    (train, train_mask), (val, val_mask) = files["train"], files["val"]
    for r in meta["split"]["val_ranges"]:
        ids += [train[t:r["train_tokens_before"]]]
        masks += [train_mask[t:r["train_tokens_before"]]]
        at = sum(map(len, ids))
        ids.append(val[r["val_token_start"]:r["val_token_start"] + r["tokens"]])
        masks.append(val_mask[r["val_token_start"]:r["val_token_start"] + r["tokens"]])
        placed.append((at, at + r["tokens"]))
        t = r["train_tokens_before"]
    ids.append(train[t:])
    masks.append(train_mask[t:])
    return np.concatenate(ids), np.concatenate(masks), placed


def write(path, records: list[dict], fmt: str) -> None:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        def plain(m):  # a Parquet column holds one type: text parts joined
            return {**m, "content": m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])}

        rows = [{**r, "messages": [plain(m) for m in r["messages"]]} if "messages" in r else r for r in records]
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=9)


CASES = [("messages", "chats.jsonl", conversations), ("instruction", "alpaca.json", instructions),
         ("prompt_completion", "pairs.csv", pairs), ("messages", "chats.csv", conversations),
         ("messages", "chats.parquet", conversations)]


@pytest.mark.parametrize("fmt,name,make", CASES, ids=[name for _, name, _ in CASES])
def test_chat_records_give_the_reference_ids_and_masks(tmp_path, tiny_tokenizer_dir, capsys, fmt, name, make):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    records = make(40)
    path, out = tmp_path / name, tmp_path / "data"
    write(path, records, name.rsplit(".", 1)[1])
    result = run(["--input", path, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                  "--val-fraction", 0.3, "--seed", 3], capsys)
    assert result.returncode == 0, result.stderr
    refs = [reference(tok, r) for r in records]
    expected_ids = [i for ref in refs if ref for i in ref[0]]
    expected_mask = [m for ref in refs if ref for m in ref[1]]
    ids, mask, placed = reassembled(out)
    assert ids.tolist() == expected_ids and mask.tolist() == expected_mask
    starts = set(np.flatnonzero(mask & 2).tolist())  # validation takes whole examples
    assert placed and all(a in starts and (b in starts or b == len(ids)) for a, b in placed)
    meta = load_meta(out)
    chat = meta["chat"]
    kept = sum(1 for ref in refs if ref)
    assert chat["format"] == fmt and chat["template"] == DEFAULT_CHAT_TEMPLATE and chat["template_source"] == "default"
    assert chat["examples"]["train"] + chat["examples"]["val"] == kept and chat["examples"]["val"] > 0
    assert chat["skipped"] == {"no_assistant_turn": len(records) - kept, "nothing_to_train": 0}
    assert chat["trained_tokens"]["train"] + chat["trained_tokens"]["val"] == sum(m & 1 for m in expected_mask)
    assert "records" not in meta and f"{chat['examples']['train']} train and" in result.stdout


def test_both_engines_write_the_same_files(tmp_path, tiny_tokenizer_dir, capsys):
    path = tmp_path / "chats.jsonl"
    write(path, conversations(30), "jsonl")
    outs = {}
    for engine in ("tiktoken", "hf"):
        outs[engine] = tmp_path / engine
        result = run(["--input", path, "--tokenizer", tiny_tokenizer_dir, "--output-dir", outs[engine],
                      "--engine", engine, "--val-fraction", 0.3], capsys)
        assert result.returncode == 0, result.stderr
    for name in ("train.bin", "val.bin", "train.mask.bin", "val.mask.bin"):
        assert (outs["tiktoken"] / name).read_bytes() == (outs["hf"] / name).read_bytes()


def test_train_on_everything_and_a_plain_run_over_a_chat_folder(tmp_path, tiny_tokenizer_dir, capsys):
    path, out = tmp_path / "pairs.jsonl", tmp_path / "data"
    write(path, pairs(30), "jsonl")
    result = run(["--input", path, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out,
                  "--train-on-everything", "--val-fraction", 0.3], capsys)
    assert result.returncode == 0, result.stderr
    assert (np.fromfile(out / "train.mask.bin", dtype=np.uint8) & 1).all()
    assert load_meta(out)["chat"]["train_only_replies"] is False
    # plain text replacing it: no mask file may stay behind to describe other ids
    text = tmp_path / "records.jsonl"
    write(text, [{"text": r["prompt"] + r["completion"]} for r in pairs(30)], "jsonl")
    result = run(["--input", text, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out, "--overwrite",
                  "--block-size", 8, "--val-fraction", 0.3], capsys)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert "chat" not in load_meta(out)


NO_REPLY = {"messages": [{"role": "user", "content": "hello"}]}
BAD = [
    ("notlist.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       {"messages": "hello"}],
     ["notlist.jsonl line 2: 'messages' is a string, not a list of messages", "HINT"]),
    ("image.jsonl", [{"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]}],
     ["image.jsonl line 1: messages[0] content[0] is a part of type 'image', not text"]),
    ("noreply.jsonl", [NO_REPLY, NO_REPLY], ["no conversation has an assistant turn (2 skipped)", "HINT"]),
    ("mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"instruction": "a", "output": "b"}],
     ["mixed.jsonl line 2: this record is instruction/input/output, but", "line 1 is prompt/completion",
      "--chat-format messages"]),
]


@pytest.mark.parametrize("name,records,fragments", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_input(tmp_path, tiny_tokenizer_dir, capsys, name, records, fragments):
    path, out = tmp_path / name, tmp_path / "out"
    write(path, records, "jsonl")
    assert_one_line_error(run(["--input", path, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out], capsys),
                          *fragments)
    assert not out.exists()


def test_bad_templates_and_mixing(tmp_path, tiny_tokenizer_dir, capsys, monkeypatch):
    chats, out = tmp_path / "chats.jsonl", tmp_path / "out"
    write(chats, conversations(5), "jsonl")
    base = ["--input", chats, "--tokenizer", tiny_tokenizer_dir, "--output-dir", out]
    hanging = tmp_path / "hanging.jinja"  # 10^10 iterations: stopped at the time limit (0.5 s here), named
    hanging.write_text("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)
    assert_one_line_error(run([*base, "--chat-template", hanging], capsys),
                          f"the chat template {hanging} did not finish rendering this conversation within 0.5 s")
    assert_one_line_error(run([*base, "--chat-template", tmp_path / "none.jinja"], capsys),
                          "--chat-template", "none.jinja does not exist")
    failing = tmp_path / "failing.jinja"
    failing.write_text("{{ raise_exception('only two turns') }}")
    assert_one_line_error(run([*base, "--chat-template", failing], capsys), "failing.jinja fails to render",
                          "only two turns")
    unstable = tmp_path / "unstable.jinja"
    unstable.write_text(DEFAULT_CHAT_TEMPLATE.replace("'Assistant:\\n'", "'Assistant: '"))
    records = tmp_path / "the.jsonl"
    write(records, [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "the sea"}]}],
          "jsonl")
    assert_one_line_error(run(["--input", records, *base[2:], "--chat-template", unstable], capsys),
                          "the.jsonl line 1", "not prefix-stable at messages[1]")
    text = tmp_path / "book.txt"
    text.write_text("Some plain text. " * 50)
    assert_one_line_error(run(["--input", chats, text, *base[2:]], capsys), "book.txt is a text file",
                          "chat data and plain text do not mix")
    assert_one_line_error(run(["--input", text, *base[2:], "--train-on-everything"], capsys),
                          "--train-on-everything is for chat records")
    assert not out.exists()
