"""Defects a new user met on the first day and an adversary found (issue 23), each reproduced as the issue
describes it: a run the plan says will not fit, start-up files that blocked the next run, token ids beyond
the vocabulary behind a meta.json that under-states them, messages that misled, and the end of a run."""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig

import finetune_generative as ft
from finetune import checkpoints as ckpt
from finetune import plan as plan_module
from finetune.config import TrainConfig
from finetune.rundir import resume_command
from helpers import BLOCK, assert_clean_error, base_args, error_lines, run_main, train_records

# -----------------------------------------------------------------------------
# #1: a run the memory estimate says will not fit is refused before the weights load


def test_a_run_that_will_not_fit_is_refused_before_loading(tmp_path, tiny_model_dir, tiny_data_dir, capsys,
                                                           monkeypatch):
    loaded = []
    monkeypatch.setattr("finetune.models.load_weights", lambda *a, **k: loaded.append(a))
    out = tmp_path / "out"
    # The tiny model's estimate is ~0.4 GiB (the interpreter itself): a 0.1 GiB device cannot hold it.
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--device-memory-gib", "0.1")
    refused = run_main(ft.main, args, capsys)
    assert_clean_error(refused)
    (line,) = error_lines(refused.stderr)
    assert line.startswith("error: the plan's memory estimate, ~0.4")
    assert line.endswith(
        " GiB per process, is more than the 0.1 GiB of cpu memory (--device-memory-gib), so the run would not fit "
        "and was not started. HINT: train LoRA adapters instead (--lora-r 16), add --gradient-checkpointing, lower "
        f"--batch-size (now 8) or --block-size (now {BLOCK}), or shard the model over more processes with --fsdp "
        "(torchrun --nproc_per_node=N); or add --ignore-memory-estimate to start it anyway")
    assert not loaded and not out.exists()

    dry = run_main(ft.main, [*args, "--dry-run"], capsys)  # the plan, and the exit code of the run it describes
    assert dry.returncode == 2 and error_lines(dry.stderr) == [line]
    assert "more than the 0.1 GiB of cpu memory (--device-memory-gib): it will not fit\n" in dry.stdout + "\n"
    anyway = run_main(ft.main, [*args, "--dry-run", "--ignore-memory-estimate"], capsys)
    assert anyway.returncode == 0 and not error_lines(anyway.stderr)
    assert "it will not fit; starting anyway (--ignore-memory-estimate)" in anyway.stdout
    assert run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--dry-run"), capsys).returncode == 0
    assert not loaded and not out.exists()


def test_processes_on_one_cpu_machine_are_checked_together_against_its_memory(tmp_path, tiny_model_dir,
                                                                              tiny_data_dir, capsys):
    """--nproc N on a CPU: the N processes share the machine's RAM, so N x the estimate must fit (issue 27, 5)."""
    out = tmp_path / "out"
    one = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--dry-run"), capsys)
    per_process = float(one.stdout.split("memory estimate  ~")[1].split()[0])
    limit = f"{per_process * 1.5:.2f}"  # one process fits, two do not
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--dry-run", "--device-memory-gib", limit)
    assert run_main(ft.main, args, capsys).returncode == 0
    two = run_main(ft.main, [*args, "--nproc", "2"], capsys)
    assert_clean_error(two)
    (line,) = error_lines(two.stderr)
    shown = re.match(r"error: the plan's memory estimate, ~([\d.]+) GiB per process, ~([\d.]+) GiB for the 2 "
                     r"processes that share this machine's memory, is more than the ([\d.]+) GiB of cpu memory "
                     r"\(--device-memory-gib\)", line)
    each, both, available = map(float, shown.groups())
    assert each == pytest.approx(per_process, abs=0.01) and both == pytest.approx(2 * each, abs=0.02)  # each shown rounded
    assert both > available == float(f"{float(limit):.1f}") > each
    assert "HINT: run fewer processes (now 2 on this machine), train LoRA" in line and "--fsdp" not in line
    assert f"~{both:.2f} GiB for the 2 processes that share this machine's memory" in two.stdout
    assert not out.exists()


def test_the_memory_hint_names_only_the_levers_not_yet_pulled():
    meta = {"splits": {"train": {"tokens": 40 * BLOCK}, "val": {"tokens": 4 * BLOCK}}}
    cfg = TrainConfig(lora_r=4, gradient_checkpointing=True, batch_size=1, device_memory_gib=0.5)
    plan = plan_module.make_plan(cfg, meta, BLOCK, world_size=1)
    cpu = torch.device("cpu")
    assert plan_module.memory_refusal(cfg, plan, 0.4, cpu, lora={}) is None  # it fits
    assert plan_module.memory_refusal(cfg, plan, 0.6, cpu, lora={}).endswith(
        f"HINT: lower --block-size (now {BLOCK}); or add --ignore-memory-estimate to start it anyway")
    cfg = TrainConfig(batch_size=4, device_memory_gib=0.5, ignore_memory_estimate=True)
    assert plan_module.memory_refusal(cfg, plan, 0.6, cpu, lora=None) is None


# -----------------------------------------------------------------------------
# #16: token ids beyond the model's vocabulary, behind a meta.json that under-states them


def test_token_ids_beyond_the_vocabulary_are_refused_whatever_meta_json_says(tmp_path, tiny_model_dir,
                                                                            tiny_data_dir, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    assert meta["max_token_id"] < vocab and meta["dtype"] == "uint16"
    tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    tokens[123] = vocab + 7  # meta.json, the sizes and the dtype still agree: only the ids tell
    tokens.flush()
    del tokens
    out = tmp_path / "out"
    result = run_main(ft.main, base_args(tiny_model_dir, data, out, "--dry-run"), capsys)
    assert_clean_error(result)
    assert error_lines(result.stderr) == [
        f"error: {data / 'train.bin'} holds token id {vocab + 7} but the model's vocabulary has only {vocab} entries, "
        f"though meta.json says the largest id is {meta['max_token_id']} (the files no longer match what "
        f"prepare_data.py wrote). HINT: prepare the data again with this model's tokenizer: python prepare_data.py "
        f"--tokenizer MODEL --output-dir {data}"]
    assert result.stdout == "" and not out.exists()


# -----------------------------------------------------------------------------
# #18: the printed resume command names the interpreter that ran (test_training_defects runs it, one process)


def test_the_resume_command_of_several_processes_uses_this_interpreters_torchrun(tmp_path):
    script, out = tmp_path / "train.py", tmp_path / "my run"
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = shlex.quote(str(torchrun)) if torchrun.is_file() else f"{shlex.quote(sys.executable)} -m torch.distributed.run"
    assert resume_command(script, out, world_size=2) == (
        f"{launcher} --nproc_per_node=2 {shlex.quote(str(script))} --output-dir {shlex.quote(str(out))} --resume")
    assert resume_command(script, out, world_size=1).startswith(f"{shlex.quote(sys.executable)} ")


# -----------------------------------------------------------------------------
# #8: noise a user sees every time


def test_greedy_does_not_offer_a_seed_to_repeat_its_samples(tiny_model_dir, capsys):
    import generate

    common = ("--device", "cpu", "--precision", "fp32", "--model", str(tiny_model_dir), "--prompt", "the river",
              "--max-new-tokens", "4")
    assert generate.main([*common, "--greedy"]) == 0
    assert "--seed" not in capsys.readouterr().err  # the same text every time: no seed to pass
    assert generate.main(list(common)) == 0
    assert "to get the same samples again" in capsys.readouterr().err  # sampling still says it


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, tiny_model_dir, tiny_data_dir, capsys,
                                                         monkeypatch):
    def interrupted(*args, **kwargs):  # what Python's own SIGINT handler raises wherever the program is
        raise KeyboardInterrupt

    monkeypatch.setattr("finetune.data.data_fingerprint", interrupted)  # reading the token files at start-up
    out = tmp_path / "out"
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out), capsys)
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["error: interrupted (Ctrl-C) while starting, before any work was done. "
                                          "HINT: run the same command again"]
    assert not out.exists()


def test_no_epoch_end_evaluation_a_few_steps_before_an_eval_every_one():
    plan = plan_module.Plan(block_size=32, train_blocks=2000, val_blocks=20, steps_per_epoch=246, total_steps=400,
                            warmup_steps=0, tokens_per_step=256, epochs=400 / 246, eval_every=250)
    cfg = TrainConfig(eval_every=250)
    assert plan_module.evaluation_steps(cfg, plan) == [0, 250, 400]  # was 0, 246, 250, 400
    assert plan_module.count_evaluations(cfg, plan) == 3 and not plan.evaluates_at(246)
    # Against the rule written out (an epoch end within a tenth of the shorter period of an --eval-every
    # evaluation or of the last step gets none of its own): listed, asked and counted by arithmetic alike.
    rng = random.Random(0)
    for _ in range(200):
        epoch, every, total = rng.randint(1, 300), rng.choice([0, rng.randint(1, 400)]), rng.randint(1, 1000)
        plan = dataclasses.replace(plan, steps_per_epoch=epoch, total_steps=total, eval_every=every)
        window = min(every, epoch) // 10 if every else 0
        near = lambda s: window and (min(s % every, every - s % every) <= window or total - s <= window)  # noqa: E731, B023
        expected = sorted({0, total, *(range(every, total + 1, every) if every else ()),
                           *(s for s in range(epoch, total, epoch) if not near(s))})
        cfg = TrainConfig(eval_every=every)
        assert plan_module.evaluation_steps(cfg, plan) == expected, (epoch, every, total)
        assert [s for s in range(total + 1) if plan.evaluates_at(s)] == expected
        assert plan_module.count_evaluations(cfg, plan) == len(expected)


# -----------------------------------------------------------------------------
# #6: a finished run trained on with --resume --extend; the lr schedule planned again, and said so


def test_a_finished_run_is_extended_with_its_schedule_planned_again(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                    capsys):
    out = tmp_path / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "2", "--warmup-steps", "1")) == 0
    capsys.readouterr()
    longer = ["--output-dir", str(out), "--resume", "--max-steps", "4"]
    refused = run_main(ft.main, longer, capsys)
    assert_clean_error(refused, "--max-steps 4 differs from the checkpoint's 2; HINT: drop the flag to keep the "
                                "checkpoint's value, or add --extend to train on past the end it was planned for")
    for extra, message in ((["--max-steps", "2"], "--extend: the run was planned for 2 steps and these settings "
                                                  "plan 2, no more (HINT: pass a larger --max-steps"),
                           (["--max-steps", "4", "--lr", "1e-3"], "--lr 0.001 differs from the checkpoint's 0.003")):
        assert_clean_error(run_main(ft.main, ["--output-dir", str(out), "--resume", "--extend", *extra], capsys), message)
    assert_clean_error(run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, tmp_path / "new", "--extend"), capsys),
                       "--extend is for a run continued with --resume")

    extended = run_main(ft.main, [*longer, "--extend"], capsys)
    assert extended.returncode == 0, extended.stderr
    assert ("--extend: training on from step 2 to 4; the linear schedule is planned again over 4 steps with the "
            "run's 1 warmup steps, so the lr goes from 0 (where the checkpoint left it) to 0.002 at step 3, then "
            "follows the new schedule to its end") in extended.stderr
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # linear decay over 4 steps after 1 warmup step: (4 - s) / 3 of the peak after s steps (lr 0 before)
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 3e-3, 3e-3 * 2 / 3, 3e-3 / 3])
    assert TrainConfig(**ckpt.load_training_state(out / "checkpoint-4")["config"]).warmup_steps == 1
