"""Defects of the training script and generate.py found by a new user and an adversary (issue 15), each
reproduced as the issue describes it: a run that trains nothing, a plan for a batch that cannot run, the
logged config, unsafe or damaged files, unhelpful hints, a lock on --output-dir, the resume command and
signals during step 0."""
from __future__ import annotations

import json
import math

import pytest
import torch

import finetune_generative as ft
from finetune import plan as plan_module
from test_finetune import BLOCK, base_args, train_records, weights

# -----------------------------------------------------------------------------
# #10: no optimizer step at lr 0; best/ only when the base model is beaten


def test_one_step_changes_the_weights_and_logs_readable_settings(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    out = tmp_path / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1")) == 0
    (record,) = train_records(out)
    assert record["lr"] == pytest.approx(3e-3)  # the warmup (3 steps, cut to the 1 step run) ends at the peak
    base, trained = weights(tiny_model_dir), weights(out)
    changed = [name for name in base if not torch.equal(base[name], trained[name])]
    assert set(changed) == set(base)  # AdamW's first step moves every parameter
    evals = train_records(out, "eval")
    assert [e["step"] for e in evals] == [0, 1] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert (out / "best").is_dir()
    for name in base:
        assert torch.equal(weights(out / "best")[name], trained[name])
    # #13: the settings not at their defaults, one per line; the whole config in train_config.json
    err = capsys.readouterr().err
    assert "settings (not at their defaults; all of them in" in err
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if "settings (not at their defaults" in line)
    shown = []
    for line in lines[start + 1:]:
        if not line.startswith("  --"):
            break
        shown.append(line)
    cfg = ft.TrainConfig(**json.loads((out / "train_config.json").read_text()))
    assert cfg == ft.parse_config(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1"))[0]
    assert "  --max-steps 1" in shown and "  --lr 0.003" in shown and "  --batch-size 8" not in shown
    assert f"  --output-dir {out}" in shown and "  --scheduler linear" not in shown  # linear is the default
    assert len(shown) == sum(getattr(cfg, f) != getattr(ft.TrainConfig(), f) for f in ft.TrainConfig.__annotations__)
    assert not any(line.lstrip().startswith("{") for line in lines)  # no JSON blob in the log


def test_no_best_folder_without_an_improvement_over_the_base_model(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    out = tmp_path / "out"
    # AdamW's first step moves every parameter by about the lr: at 0.5 the model is much worse than before.
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1", "--lr", "0.5", "--warmup-steps", "0")
    assert ft.main(args) == 0
    evals = train_records(out, "eval")
    assert evals[1]["val_loss"] > evals[0]["val_loss"] + 1
    assert not (out / "best").exists() and (out / "model.safetensors").is_file()
    err = capsys.readouterr().err
    assert "best so far" not in err
    assert "no best/: no evaluation beat the base model's val loss at step 0" in err


# -----------------------------------------------------------------------------
# #11: the plan and the memory estimate are for the batch that runs


def test_plan_and_memory_for_a_batch_larger_than_the_train_split(tiny_model_dir):
    from transformers import AutoConfig

    meta = {"splits": {"train": {"tokens": 11 * BLOCK + 5}, "val": {"tokens": 3 * BLOCK}}}
    config = AutoConfig.from_pretrained(tiny_model_dir)
    huge, fitting = ft.TrainConfig(batch_size=100_000), ft.TrainConfig(batch_size=11)
    plan = plan_module.make_plan(huge, meta, BLOCK, world_size=1)
    assert (plan.batch_size, plan.grad_accum, plan.tokens_per_step, plan.steps_per_epoch) == (11, 1, 11 * BLOCK, 1)
    assert plan == plan_module.make_plan(fitting, meta, BLOCK, world_size=1)
    memory = plan_module.estimate_memory_gib(config, 10_000, huge, plan, "fp32")
    assert memory == plan_module.estimate_memory_gib(config, 10_000, fitting, plan, "fp32")
    text = plan_module.describe_plan(plan, huge, meta, 10_000, memory, "cpu", "fp32", 1)
    assert "11 x 1 accum x 1 process(es), 11 sequences, 352 tokens per step (--batch-size 100000 cut to what " \
           "runs: the train split holds 11 blocks per process)" in text
    # two processes share the 11 blocks: 5 each; a --grad-accum beyond one epoch's micro-batches is cut too
    plan = plan_module.make_plan(ft.TrainConfig(batch_size=2, grad_accum=8), meta, BLOCK, world_size=2)
    assert (plan.batch_size, plan.grad_accum, plan.tokens_per_step) == (2, 3, 2 * 5 * BLOCK)
    assert "--grad-accum 8 cut to what runs: the train split holds 5 blocks per process" in \
        plan_module.describe_plan(plan, ft.TrainConfig(batch_size=2, grad_accum=8), meta, 1, 0.0, "cpu", "fp32", 2)
