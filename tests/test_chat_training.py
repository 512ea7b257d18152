"""Training on chat data (issue 20, the training side): packed blocks, the masked loss, exact resume, the
template saved with the model, TRL's SFTTrainer as the reference, and generate.py --chat.

The data folders are written by tests/chat_data.py (the token files of CHAT_FORMAT.md, made with numpy from
conversations rendered with a template set on the tiny tokenizer). Everything runs on the CPU in fp32.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from chat_data import TEST_TEMPLATE, make_conversations, write_chat_data
from test_finetune import assert_same_weights, train_records

import finetune_generative as ft
from finetune.data import EpochShuffleSampler, load_meta
from finetune.models import make_optimizer
from finetune.packing import PackedChatDataset, best_fit_decreasing, split_packing
from finetune.plan import make_scheduler

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


# -----------------------------------------------------------------------------
# Isolation: inside a block each example sees only itself


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_cpu_dropout"])
def test_packed_example_has_the_logits_it_has_alone(tiny_model_dir, chat_data_dir, attn):
    """eager, sdpa, and the attention training runs on CPU (cpu_dropout.py's, registered under its own name:
    transformers built no mask at all for it until its mask function was registered too)."""
    from finetune.cpu_dropout import use_fast_cpu_dropout

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


def unpacked_step_losses(model_dir, data_dir, steps: int) -> list[float]:
    """The reference: the chat run's steps (same blocks, same order, same optimizer and schedule), with every
    example run on its own, unpadded, its loss a sum over its targets divided by the step's targets."""
    dataset = PackedChatDataset.from_data_dir(data_dir, "train", BLOCK, load_meta(data_dir))
    packing, (tokens, mask) = dataset.packing, dataset._map()
    model = load_model(model_dir).train()
    optimizer = make_optimizer(model, torch.device("cpu"), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.999))
    scheduler = make_scheduler("linear", optimizer, 2, steps)
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
    reference = unpacked_step_losses(tiny_model_dir, chat_data_dir, 6)  # 6: past the epoch boundary at 5
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
