"""Training on chat data (issue 20, the training side): packed blocks, the masked loss, exact resume, the
template saved with the model, TRL's SFTTrainer as the reference, and generate.py --chat.

The data folders are written by tests/chat_data.py (the token files of CHAT_FORMAT.md, made with numpy from
conversations rendered with a template set on the tiny tokenizer). Everything runs on the CPU in fp32.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_generative as ft
from finetune.data.dataset import EpochShuffleSampler, load_meta
from finetune.data.packing import PackedChatDataset, best_fit_decreasing, split_packing
from finetune.models.loading import make_optimizer
from finetune.train.plan import make_scheduler
from helpers import (
    TEST_TEMPLATE,
    assert_same_weights,
    assert_trained_alike,
    make_conversations,
    torchrun,
    train_records,
    write_chat_data,
)

BLOCK = 128
LOSS_TOLERANCE = 1e-5


def tiny_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir, attn: str = "eager"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).eval()


@pytest.fixture(scope="module")
def chat_data_dir(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("chat") / "data"
    return write_chat_data(folder, tiny_tokenizer(tiny_model_dir), make_conversations(24, seed=1),
                           make_conversations(6, seed=2))


def chat_args(model_dir, data_dir, out, *extra) -> list[str]:
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(out),
            "--block-size", str(BLOCK), "--batch-size", "2", "--grad-accum", "2", "--epochs", "2", "--lr", "3e-3",
            "--warmup-steps", "2", "--dropout", "0", "--precision", "fp32", "--device", "cpu", "--num-workers", "0",
            "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--save-total-limit", "0", "--seed", "5",
            *map(str, extra)]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_model_dir, chat_data_dir):
    """2 epochs of the packed chat data, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("chat_run") / "out"
    assert ft.main(chat_args(tiny_model_dir, chat_data_dir, out, "--save-every", 2)) == 0
    return out


@pytest.mark.slow
def test_two_processes_train_chat_data_like_one(tmp_path, tiny_model_dir, chat_data_dir):
    """torchrun, 2 processes x batch 1 against 1 process x batch 2 (the same global batch, the same blocks in
    each of the 4 full steps): the step's trained tokens are counted over both ranks, so the per-step losses
    and the weights agree."""
    from safetensors.torch import load_file

    steps = ("--max-steps", 4)
    assert ft.main(chat_args(tiny_model_dir, chat_data_dir, tmp_path / "one", *steps)) == 0
    result = torchrun(2, *chat_args(tiny_model_dir, chat_data_dir, tmp_path / "two", *steps, "--batch-size", 1))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    w_one, w_two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert_trained_alike(w_two, w_one, [r["lr"] for r in one])


# -----------------------------------------------------------------------------
# Packing


def test_best_fit_decreasing_packs_whole_examples_tightly():
    lengths = np.array([70, 60, 50, 40, 30, 20, 10, 128, 5])
    block_of = best_fit_decreasing(lengths, 128)
    fill = np.bincount(block_of, weights=lengths)
    assert fill.max() <= 128 and len(fill) == 4  # 413 tokens: 4 blocks is the least possible
    assert block_of[7] == 0  # the longest opens the first block, alone


def test_packed_blocks_hold_every_example_once_with_its_labels(chat_data_dir):
    meta = load_meta(chat_data_dir)
    dataset = PackedChatDataset.from_data_dir(chat_data_dir, "train", BLOCK, meta)
    packing = dataset.packing
    tokens = np.fromfile(chat_data_dir / "train.bin", dtype=meta["dtype"]).astype(np.int64)
    mask = np.fromfile(chat_data_dir / "train.mask.bin", dtype=np.uint8)
    assert packing.examples == 24 and packing.skipped == 0
    assert sorted(packing.starts.tolist()) == np.flatnonzero(mask & 2).tolist()  # each example exactly once
    seen_targets = 0
    for b in range(len(dataset)):
        item = dataset[b]
        starts = np.flatnonzero(item["position_ids"].numpy() == 0)
        for e, at in zip(range(packing.block_offsets[b], packing.block_offsets[b + 1]), starts):
            start, length = packing.starts[e], packing.lengths[e]
            assert item["input_ids"][at:at + length].tolist() == tokens[start:start + length].tolist()
            expected = np.where(mask[start:start + length] & 1, tokens[start:start + length], -100)
            expected[0] = -100
            assert item["labels"][at:at + length].tolist() == expected.tolist()
        seen_targets += int((item["labels"] != -100).sum())
    assert seen_targets == packing.targets == int((mask & 1).sum())  # no example starts with a target here


def test_long_examples_truncated_and_untrainable_ones_skipped(tmp_path, tiny_model_dir):
    long = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "the sea " * 60}]
    nothing_left = [{"role": "user", "content": "the old captain " * 60}, {"role": "assistant", "content": "yes"}]
    folder = write_chat_data(tmp_path / "data", tiny_tokenizer(tiny_model_dir),
                             [long, nothing_left, *make_conversations(3, seed=4)], make_conversations(2, seed=5))
    packing = split_packing(folder, "train", 64, load_meta(folder))
    assert (packing.examples, packing.truncated, packing.skipped) == (5, 2, 1)
    assert packing.lengths.max() == 64 and len(packing.starts) == 4


def test_missing_or_short_mask_file_is_one_clear_error(chat_data_dir, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(chat_data_dir, data)
    for damage, fragment in ((lambda p: p.write_bytes(p.read_bytes()[:-1]), "holds"), (Path.unlink, "is missing")):
        damage(data / "train.mask.bin")
        with pytest.raises(SystemExit) as exit_info:
            ft.main(chat_args(tiny_model_dir, data, tmp_path / "out"))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "train.mask.bin" in line and fragment in line and "HINT" in line
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Isolation: inside a block each example sees only itself


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_cpu_dropout"])
def test_packed_example_has_the_logits_it_has_alone(tiny_model_dir, chat_data_dir, attn):
    """eager, sdpa, and the attention training runs on CPU (cpu_dropout.py's, registered under its own name:
    transformers built no mask at all for it until its mask function was registered too)."""
    from finetune.models.cpu_dropout import use_fast_cpu_dropout

    dataset = PackedChatDataset.from_data_dir(chat_data_dir, "train", BLOCK, load_meta(chat_data_dir))
    block = next(b for b in range(len(dataset)) if np.diff(dataset.packing.block_offsets)[b] >= 2)
    item = dataset[block]
    model = load_model(tiny_model_dir, "eager" if attn == "eager" else "sdpa")
    if attn == "sdpa_cpu_dropout":
        use_fast_cpu_dropout(model)
        assert model.config._attn_implementation == attn
    starts = np.flatnonzero(item["position_ids"].numpy() == 0)
    second, end = int(starts[1]), int(starts[2]) if len(starts) > 2 else BLOCK
    with torch.no_grad():
        packed = model(input_ids=item["input_ids"][None], position_ids=item["position_ids"][None],
                       use_cache=False).logits[0]
        alone = model(input_ids=item["input_ids"][None, second:end], use_cache=False).logits[0]
        # the control: the same block with positions running on, as if the examples were one text
        flat = model(input_ids=item["input_ids"][None], use_cache=False).logits[0]
    assert (packed[second:end] - alone).abs().max().item() <= 1e-5
    assert (flat[second:end] - alone).abs().max().item() > 1e-2


# -----------------------------------------------------------------------------
# Training


def unpacked_step_losses(model_dir, data_dir, total_steps: int, steps: int) -> list[float]:
    """The reference: the chat run's steps (same blocks, same order, same optimizer and schedule), with every
    example run on its own, unpadded, its loss a sum over its targets divided by the step's targets."""
    dataset = PackedChatDataset.from_data_dir(data_dir, "train", BLOCK, load_meta(data_dir))
    packing, (tokens, mask) = dataset.packing, dataset._map()
    model = load_model(model_dir).train()
    optimizer = make_optimizer(model, torch.device("cpu"), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.999))
    scheduler = make_scheduler("linear", optimizer, 2, total_steps)  # the run's schedule; `steps` of it are taken
    sampler = EpochShuffleSampler(len(dataset), seed=5)
    windows = []  # the blocks of each step: 2 x 2 per step, fewer at the end of an epoch
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = sampler.epoch_order()
        windows += [order[i:i + 4] for i in range(0, len(order), 4)]
    losses = []
    for window in windows[:steps]:
        examples = [e for b in window for e in range(packing.block_offsets[b], packing.block_offsets[b + 1])]
        pieces = []
        for e in examples:
            start, length = int(packing.starts[e]), int(packing.lengths[e])
            ids = torch.from_numpy(tokens[start:start + length].astype(np.int64))
            labels = torch.where(torch.from_numpy(mask[start:start + length] & 1).bool(), ids, -100)
            pieces.append((ids, labels))
        n_targets = sum(int((labels[1:] != -100).sum()) for _, labels in pieces)
        total = 0.0
        for ids, labels in pieces:
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum") / n_targets
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(total)
    return losses


def test_packed_training_equals_unpacked_training(chat_run, tiny_model_dir, chat_data_dir):
    records = train_records(chat_run)
    steps = len(records)
    assert steps >= 4 and records[-1]["epoch"] == 2  # it crossed the epoch boundary
    reference = unpacked_step_losses(tiny_model_dir, chat_data_dir, steps, 6)  # 6: past the epoch boundary at 5
    assert len(reference) == 6
    for record, expected in zip(records, reference):
        assert record["loss"] == pytest.approx(expected, abs=LOSS_TOLERANCE), (record, expected)


def test_resume_on_chat_data_is_exact(chat_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(chat_run / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(chat_run / "metrics.jsonl", out / "metrics.jsonl")
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    assert [r["loss"] for r in train_records(out)] == [r["loss"] for r in train_records(chat_run)]
    assert [r["val_loss"] for r in train_records(out, "eval")] == [r["val_loss"] for r in train_records(chat_run, "eval")]
    assert_same_weights(chat_run, out)


def test_template_saved_with_every_model_folder(chat_run):
    from transformers import AutoTokenizer

    folders = [chat_run, chat_run / "best", *sorted(chat_run.glob("checkpoint-*"))]
    assert len(folders) >= 4
    for folder in folders:
        assert AutoTokenizer.from_pretrained(folder).chat_template == TEST_TEMPLATE, folder


def test_lora_on_chat_data_saves_the_template_too(tmp_path, tiny_model_dir, chat_data_dir):
    pytest.importorskip("peft")
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    assert ft.main(chat_args(tiny_model_dir, chat_data_dir, out, "--max-steps", 2, "--lora-r", 2)) == 0
    assert len(train_records(out)) == 2
    for folder in (out, out / "adapter", out / "checkpoint-2"):
        assert AutoTokenizer.from_pretrained(folder).chat_template == TEST_TEMPLATE, folder


def test_validation_loss_is_over_trained_tokens(chat_run, tiny_model_dir, chat_data_dir):
    """Step 0's val loss is the base model's mean cross-entropy over the val split's targets only."""
    (step0, *_) = train_records(chat_run, "eval")
    tokens = torch.from_numpy(np.fromfile(chat_data_dir / "val.bin", dtype=load_meta(chat_data_dir)["dtype"])
                              .astype(np.int64))
    mask = np.fromfile(chat_data_dir / "val.mask.bin", dtype=np.uint8)
    starts = [*np.flatnonzero(mask & 2).tolist(), len(mask)]
    model, total, count = load_model(tiny_model_dir), 0.0, 0
    with torch.no_grad():
        for start, end in zip(starts, starts[1:]):
            ids = tokens[start:end]
            labels = torch.where(torch.from_numpy(mask[start:end] & 1).bool(), ids, -100)
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    assert step0["val_loss"] == pytest.approx(total / count, abs=LOSS_TOLERANCE)


# -----------------------------------------------------------------------------
# TRL's SFTTrainer as the reference


TRL_HYPER = ["--max-steps", 1, "--batch-size", 8, "--grad-accum", 1, "--scheduler", "constant", "--warmup-steps", 0,
             "--lr", "1e-2", "--save-total-limit", 1]


def assert_one_step_matches_trl(tmp_path, model_dir, data, rows: list[dict], **only_loss) -> None:
    """Ours (packed) and TRL's SFTTrainer (unpacked, padded) on the same examples: the loss over the trained
    tokens of one optimizer step, and the weights after it. Aligned: one step over all examples (the sum
    over tokens is then order-free), constant lr without warmup (our warmup starts a step ahead of
    transformers'), dropout 0, fused AdamW, the same clipping, and TRL's bf16 and gradient checkpointing (on
    by default in SFTConfig) off: fp32 on both sides."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from safetensors.torch import load_file

    assert ft.main(chat_args(model_dir, data, tmp_path / "ours", *TRL_HYPER)) == 0
    (ours,) = train_records(tmp_path / "ours")
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), packing=False, max_length=BLOCK, **only_loss,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=1, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=0, seed=5, disable_tqdm=True,
        bf16=False, gradient_checkpointing=False)  # TRL's defaults are True (bf16 autocast: losses 2e-5 apart)
    tokenizer = tiny_tokenizer(model_dir)
    tokenizer.chat_template = load_meta(data)["chat"]["template"]
    trainer = trl.SFTTrainer(model=load_model(model_dir).train(), args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(rows))
    trainer.train()
    theirs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=LOSS_TOLERANCE)
    # The gradient before clipping: what the weights' comparison below cannot see (Adam's first step is about
    # lr * sign(g) whatever the gradient's size).
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    our_weights = load_file(tmp_path / "ours" / "model.safetensors")
    their_weights = {name: t for name, t in trainer.model.state_dict().items() if name in our_weights}
    assert_trained_alike(our_weights, their_weights, [ours["lr"]])
    moved = (our_weights["transformer.h.0.mlp.c_fc.weight"] - load_model(model_dir).state_dict()[
        "transformer.h.0.mlp.c_fc.weight"]).abs()
    assert (moved > ours["lr"] / 2).float().mean() > 0.5  # most weights moved by about lr: the step was taken


def test_conversations_match_trl_assistant_only_loss(tmp_path, tiny_model_dir):
    conversations = make_conversations(8, seed=3, max_words=8)
    data = write_chat_data(tmp_path / "data", tiny_tokenizer(tiny_model_dir), conversations,
                           make_conversations(2, seed=4))
    assert split_packing(data, "train", BLOCK, load_meta(data)).truncated == 0
    assert_one_step_matches_trl(tmp_path, tiny_model_dir, data, [{"messages": m} for m in conversations],
                                assistant_only_loss=True)


def test_prompt_completion_records_match_trl_completion_only_loss(tmp_path, tiny_model_dir):
    """Prompt/completion records through prepare_data.py, trained on the completion and its end token, as
    TRL's completion_only_loss trains them (the same file means the same tokens in both tools)."""
    import prepare_data

    words = "the old captain walked to the quiet sea and found a letter by the door of the house".split()
    rng = np.random.default_rng(6)
    pairs = [{"prompt": " ".join(rng.choice(words, 5)) + ":", "completion": " " + " ".join(rng.choice(words, 4))}
             for _ in range(10)]
    for name, rows in (("pairs.jsonl", pairs[:8]), ("held.jsonl", pairs[8:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = tmp_path / "data"
    assert prepare_data.main(["--input", str(tmp_path / "pairs.jsonl"), "--val-input", str(tmp_path / "held.jsonl"),
                              "--tokenizer", str(tiny_model_dir), "--output-dir", str(data),
                              "--block-size", "16"]) is not None
    assert load_meta(data)["chat"]["format"] == "prompt_completion"
    assert_one_step_matches_trl(tmp_path, tiny_model_dir, data, pairs[:8], completion_only_loss=True)


# -----------------------------------------------------------------------------
# generate.py --chat on a model that learned 4 conversations

EXCHANGES = [("the old captain", "a quiet sea"), ("where is the whale", "under the ship"),
             ("open the door", "the garden is small"), ("what did you hear", "wind and storm")]


@pytest.fixture(scope="module")
def overfit_model(tmp_path_factory, tiny_model_dir):
    """The tiny model trained until it knows the reply to each of 4 user turns, end to end: prepare_data.py
    on a JSONL of conversations (the tiny tokenizer has no template: the default one), the training script,
    then generate.py --chat below, so the three agree on the template token for token. The 4 conversations
    are repeated 32 times so that an epoch is 16 steps: the run evaluates (and writes best/ and loss.png) at
    each epoch end, which for 4 conversations in one block would be every step."""
    import prepare_data

    root = tmp_path_factory.mktemp("overfit")
    conversations = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in EXCHANGES]
    for name, rows in (("train.jsonl", conversations * 32), ("val.jsonl", conversations[:1])):
        (root / name).write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    data = root / "data"
    assert prepare_data.main(["--input", str(root / "train.jsonl"), "--val-input", str(root / "val.jsonl"),
                              "--tokenizer", str(tiny_model_dir), "--output-dir", str(data),
                              "--block-size", "64"]) is not None
    assert load_meta(data)["chat"]["template_source"] == "default"
    out = root / "out"
    assert ft.main(["--model", str(tiny_model_dir), "--data-dir", str(data), "--output-dir", str(out),
                    "--block-size", "64", "--batch-size", "4", "--max-steps", "120", "--lr", "1e-2", "--scheduler",
                    "constant", "--dropout", "0", "--precision", "fp32", "--device", "cpu", "--num-workers", "0",
                    "--log-every", "20", "--eval-every", "0", "--save-every", "0", "--save-total-limit", "1",
                    "--sample-prompt", EXCHANGES[0][0], "--sample-max-new-tokens", "8"]) == 0
    return out


def test_training_samples_are_replies_rendered_with_the_template(overfit_model):
    samples = [json.loads(line) for line in (overfit_model / "samples.jsonl").read_text().splitlines()]
    assert samples[-1]["step"] == 120 and samples[-1]["text"] == EXCHANGES[0][1]


def chat(capsys, *args) -> str:
    import generate

    assert generate.main(["--device", "cpu", "--precision", "fp32", "--chat", "--greedy", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_generate_chat_answers_with_the_trained_reply_and_stops(overfit_model, tmp_path, capsys):
    prompts = [x for user, _ in EXCHANGES for x in ("--prompt", user)]
    chat(capsys, "--model", overfit_model, "--max-new-tokens", 20, "--output", tmp_path / "replies.jsonl", *prompts)
    records = [json.loads(line) for line in (tmp_path / "replies.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["finish_reason"]) for r in records] == [
        (user, reply, "eos") for user, reply in EXCHANGES]
    # one prompt: the reply alone, nothing of the template or the prompt
    assert chat(capsys, "--model", overfit_model, "--max-new-tokens", 20, "--prompt", EXCHANGES[1][0]) == (
        EXCHANGES[1][1] + "\n\n")


def test_generate_chat_conversation_in_a_terminal(overfit_model, monkeypatch, capsys):
    """Two turns (the second sees the first), /reset, Ctrl-D: stdin stands in for the terminal."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    turns = [EXCHANGES[0][0], EXCHANGES[2][0], "/reset", EXCHANGES[3][0]]
    monkeypatch.setattr("sys.stdin", Terminal("\n".join(turns) + "\n"))
    out = chat(capsys, "--model", overfit_model, "--max-new-tokens", 20)
    replies = [re.sub(r"^(> )+", "", line) for line in out.splitlines() if line.strip() not in ("", ">")]
    assert replies[0] == EXCHANGES[0][1] and replies[-1] == EXCHANGES[3][1], out
    assert len(replies) == 3, out


def test_generate_chat_refuses_a_model_without_template(tiny_model_dir, capsys):
    import generate

    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(tiny_model_dir), "--chat", "--prompt", "hello", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "has none" in line and "HINT" in line and "Traceback" not in err


# A template that renders only conversations that open with a system turn (issue 27, 8).
SYSTEM_REQUIRED = ("{%- if messages[0]['role'] != 'system' -%}{{ raise_exception('a system turn comes first') }}"
                   "{%- endif -%}" + TEST_TEMPLATE)


def test_a_sample_prompt_the_data_template_cannot_render_is_refused_before_training(tmp_path, tiny_model_dir, capsys):
    """Every record had a system turn, so prepare passed; the --sample-prompt (a lone user turn) would have
    crashed the run at its first sample: refused before the weights load, one line, nothing written."""
    from helpers import assert_one_line_error, run_main

    with_system = [m if m[0]["role"] == "system" else [{"role": "system", "content": "Be brief."}, *m]
                   for m in make_conversations(8, seed=3)]
    data = write_chat_data(tmp_path / "data", tiny_tokenizer(tiny_model_dir), with_system[:6], with_system[6:],
                           template=SYSTEM_REQUIRED)
    out = tmp_path / "out"
    result = run_main(ft.main, chat_args(tiny_model_dir, data, out, "--sample-prompt", "the old captain"), capsys)
    assert_one_line_error(result, "--sample-prompt 'the old captain': the chat template of", "fails to render the "
                          "conversation (TemplateError: a system turn comes first)", "HINT: --sample-prompt renders "
                          "each prompt as a lone user turn")
    assert not out.exists()


def test_generate_chat_with_a_template_that_fails_or_hangs_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import generate
    from finetune.formats import chat as chat_module

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.setattr(chat_module, "RENDER_SECONDS", 0.5)
    for template, fragment in ((SYSTEM_REQUIRED, "fails to render the conversation (TemplateError: a system turn "
                                                 "comes first)"),
                               ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                                "did not finish rendering the conversation within 0.5 s")):
        (model / "chat_template.jinja").write_text(template)
        with pytest.raises(SystemExit) as exit_info:
            generate.main(["--model", str(model), "--chat", "--prompt", "hello", "--device", "cpu"])
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert f"the chat template of {model} {fragment}" in line and "HINT: fix or replace the template saved with " \
            "the model" in line, line
    # --system makes that template render: the system turn comes first
    (model / "chat_template.jinja").write_text(SYSTEM_REQUIRED)
    assert generate.main(["--model", str(model), "--chat", "--system", "Be brief.", "--prompt", "hello", "--device",
                          "cpu", "--greedy", "--max-new-tokens", "2"]) == 0


def spy_on_prompts(monkeypatch, interrupt_calls=()):
    """Record the prompt ids generate.py's chat passes to generate_samples; on the calls numbered in
    `interrupt_calls`, a real SIGINT arrives while the reply is being generated (Ctrl-C)."""
    import os
    import signal

    import generate

    prompts, real = [], generate.generate_samples

    def spy(model, tokenizer, prompt, *args, **kwargs):
        prompts.append(list(prompt))
        if len(prompts) in interrupt_calls:
            os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode: inside the real generation
        return real(model, tokenizer, prompt, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_samples", spy)
    return prompts


def test_generate_chat_system_turn_from_the_flag_and_the_command(overfit_model, monkeypatch, capsys):
    """--system starts every conversation with it; /system TEXT changes it, /system alone removes it (issue 27, 19)."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tok = tiny_tokenizer(overfit_model)
    prompts = spy_on_prompts(monkeypatch)
    chat(capsys, "--model", overfit_model, "--max-new-tokens", 4, "--system", "Be brief.", "--prompt", "hi")
    def rendered(*messages):
        return tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)

    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}
    assert prompts == [rendered(system, user)]
    prompts.clear()
    monkeypatch.setattr("sys.stdin", Terminal("hi\n/system Be kind.\nhi\n/system\nhi\n"))
    chat(capsys, "--model", overfit_model, "--max-new-tokens", 4, "--system", "Be brief.")
    assert tok.decode(prompts[0]).startswith("System:\nBe brief.") and tok.decode(prompts[1]).startswith(
        "System:\nBe kind.") and tok.decode(prompts[2]).startswith("User:\nhi")
    assert prompts[0] == rendered(system, user)


def test_ctrl_c_during_a_reply_stops_it_and_keeps_the_conversation(overfit_model, monkeypatch, capsys):
    """llama.cpp and Ollama stop the reply and keep the chat: so does generate.py --chat (issue 27, 19)."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    user, stopped, after = EXCHANGES[0][0], EXCHANGES[1][0], EXCHANGES[2][0]
    prompts = spy_on_prompts(monkeypatch, interrupt_calls={2})
    monkeypatch.setattr("sys.stdin", Terminal(f"{user}\n{stopped}\n{after}\n"))
    import generate

    assert generate.main(["--device", "cpu", "--precision", "fp32", "--chat", "--greedy", "--model",
                          str(overfit_model), "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    assert "(reply stopped; that message and its partial reply are not kept)" in captured.err
    tok = tiny_tokenizer(overfit_model)
    assert len(prompts) == 3
    kept = [{"role": "user", "content": user}, {"role": "assistant", "content": EXCHANGES[0][1]},
            {"role": "user", "content": after}]  # the first exchange kept, the stopped turn gone
    assert prompts[2] == tok.apply_chat_template(kept, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert captured.out.startswith(f"> {EXCHANGES[0][1]}\n")


def test_the_next_commands_after_a_chat_run_sample_with_chat(tmp_path, tiny_model_dir, chat_data_dir, capsys):
    """The "next:" lines of a run on chat data sample a reply (--chat), not a plain continuation (issue 27, 20)."""
    from helpers import run_main

    out = tmp_path / "out"
    result = run_main(ft.main, chat_args(tiny_model_dir, chat_data_dir, out, "--max-steps", 1), capsys)
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [t for t in result.stderr.splitlines() if "sample from it:" in t]
    assert f"generate.py --model {out} --chat --prompt 'Once upon a time'" in line
