"""finetune/train/plan.py: the steps, the evaluation and save schedule, the memory estimate and the refusal of a run it
says will not fit (before the weights load), the schedule planned again by --resume --extend, and the --dry-run
plan of a run far too long to list, checked by arithmetic and end to end through the training script."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import random
import re

import pytest
import torch

import finetune_generative as ft
from dataset import load_meta
from finetune.formats import checkpoints as ckpt
from finetune.models import cpu_dropout
from finetune.train import plan as plan_module
from finetune.train.config import TrainConfig, parse_config
from helpers import BLOCK, assert_clean_error, base_args, error_lines, run_main, train_records

TRILLION = 1_000_000_000_000


# -----------------------------------------------------------------------------
# The time estimate: matmul work at the probed matmul speed, plus each block's attention as timed


def default_gpt2_plan(**changes):
    from transformers import GPT2Config

    meta = {"splits": {"train": {"tokens": 123 * 1024}, "val": {"tokens": 12 * 1024}}}
    cfg = TrainConfig(**changes)  # block 1024 (the model's), batch 8, 3 epochs
    return GPT2Config(), cfg, plan_module.make_plan(cfg, meta, 1024, world_size=1)


def test_the_time_estimate_adds_the_timed_attention_of_every_block_and_layer():
    """Training = weight FLOPs at 70 % of the fp32 matmul speed + (blocks x layers) timed attentions;
    evaluation = a third of a training step's FLOPs per token, attention counted, at the same speed. A
    shorter block's attention is the timed one scaled by the square of the block (the (query, key) pairs)."""
    config, cfg, plan = default_gpt2_plan()
    n_params, cpu = 124_439_808, torch.device("cpu")
    speed = plan_module.SpeedProbe(gflops=100.0, seconds=0.5, rows=1024, attention_seconds=0.5, attention_block=1024)
    rate = 0.7 * 100e9
    blocks = plan.total_steps * plan.tokens_per_step // 1024
    train = blocks * 1024 * 6 * n_params / rate + blocks * 12 * 0.5
    evaluation = 4 * 12 * 1024 * (6 * n_params + 12 * 12 * 768 * 1024) / 3 / rate  # steps 0, 16, 32, 48
    assert plan_module.run_seconds(cfg, plan, config, n_params, speed, "fp32", 1, cpu, lora=False) == \
        pytest.approx(train + evaluation, rel=1e-12)
    short = plan_module.dataclasses_replace(plan, block_size=256)
    short_train = blocks * 1024 * 6 * n_params / rate + blocks * 4 * 12 * 0.5 / 16
    short_eval = plan_module.count_evaluations(cfg, short) * plan_module.eval_blocks(cfg, short) * 256 * \
        (6 * n_params + 12 * 12 * 768 * 256) / 3 / rate
    assert plan_module.run_seconds(cfg, short, config, n_params, speed, "fp32", 1, cpu, lora=False) == \
        pytest.approx(short_train + short_eval, rel=1e-12)
    # gradient checkpointing: 2 more FLOPs per weight and one more attention forward (a third of one)
    _, checkpointed, _ = default_gpt2_plan(gradient_checkpointing=True)
    assert plan_module.run_seconds(checkpointed, plan, config, n_params, speed, "fp32", 1, cpu, lora=False) == \
        pytest.approx(train + blocks * 1024 * 2 * n_params / rate + blocks * 12 * 0.5 / 3 + evaluation, rel=1e-12)


def test_attention_is_timed_with_the_dropout_and_function_the_run_uses(monkeypatch):
    """The probe's attention runs the fast-dropout function on a CPU with attention dropout (unless
    --torch-dropout), torch's SDPA otherwise, with --dropout over the model's own attn_pdrop."""
    from transformers import GPT2Config

    config = GPT2Config(n_layer=1, n_embd=64, n_head=4, attn_pdrop=0.1)
    calls = []
    fast, sdpa = cpu_dropout.attention_with_cpu_dropout, torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(cpu_dropout, "attention_with_cpu_dropout",
                        lambda *a, **k: calls.append(("fast", k["dropout"])) or fast(*a, **k))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(("sdpa", k["dropout_p"])) or sdpa(*a, **k))
    cpu = torch.device("cpu")
    for cfg, expected in [(TrainConfig(), ("fast", 0.1)), (TrainConfig(dropout=0.0), ("sdpa", 0.0)),
                          (TrainConfig(torch_dropout=True), ("sdpa", 0.1)), (TrainConfig(dropout=0.2), ("fast", 0.2))]:
        calls.clear()
        seconds = plan_module.attention_seconds(config, 32, torch.float32, cpu, plan_module.attention_dropout(config, cfg),
                                                fast_cpu_dropout=not cfg.torch_dropout, seconds=0.01)
        assert seconds > 0 and set(calls) == {expected}, (cfg, calls)
    torch.manual_seed(7)
    plan_module.attention_seconds(config, 32, torch.float32, cpu, 0.1, fast_cpu_dropout=True, seconds=0.01)
    after_probe = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after_probe, torch.rand(4))  # the probe's masks come from a fork of the generator


# -----------------------------------------------------------------------------
# The memory estimate: a run that will not fit is refused before the weights load


def test_the_memory_estimate_counts_attention_pairs_as_the_run_keeps_them():
    """The fast CPU dropout keeps 6 B per (query, key) pair (the fp32 softmax output; the rest is recomputed);
    torch's dropout (--torch-dropout, or on a GPU) is counted as Korthikanti et al.'s 10 B in fp32."""
    config, cfg, plan = default_gpt2_plan()
    _, torch_cfg, _ = default_gpt2_plan(torch_dropout=True)
    n_params = 124_439_808
    cpu = plan_module.estimate_memory_gib(config, n_params, cfg, plan, "fp32", device_type="cpu")
    gpu = plan_module.estimate_memory_gib(config, n_params, cfg, plan, "fp32", device_type="cuda")
    torch_dropout = plan_module.estimate_memory_gib(config, n_params, torch_cfg, plan, "fp32", device_type="cpu")
    pairs = 8 * 12 * 1024 * 1024 * 12  # sequences x heads x block^2 x layers
    assert gpu == torch_dropout
    assert torch_dropout - cpu == pytest.approx((10 - 6) * pairs / 2**30, rel=1e-9)


def test_a_run_that_will_not_fit_is_refused_before_loading(tmp_path, tiny_model_dir, tiny_data_dir, capsys,
                                                           monkeypatch):
    loaded = []
    monkeypatch.setattr("finetune.models.loading.load_weights", lambda *a, **k: loaded.append(a))
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
    """--nproc N on a CPU: the N processes share the machine's RAM, so N x the estimate must fit """
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
# The plan is for the batch that runs


def test_plan_and_memory_for_a_batch_larger_than_the_train_split(tiny_model_dir):
    from transformers import AutoConfig

    meta = {"splits": {"train": {"tokens": 11 * BLOCK + 5}, "val": {"tokens": 3 * BLOCK}}}
    config = AutoConfig.from_pretrained(tiny_model_dir)
    huge, fitting = TrainConfig(batch_size=100_000), TrainConfig(batch_size=11)
    plan = plan_module.make_plan(huge, meta, BLOCK, world_size=1)
    assert (plan.batch_size, plan.grad_accum, plan.tokens_per_step, plan.steps_per_epoch) == (11, 1, 11 * BLOCK, 1)
    assert plan == plan_module.make_plan(fitting, meta, BLOCK, world_size=1)
    memory = plan_module.estimate_memory_gib(config, 10_000, huge, plan, "fp32")
    assert memory == plan_module.estimate_memory_gib(config, 10_000, fitting, plan, "fp32")
    text = plan_module.describe_plan(plan, huge, meta, 10_000, memory, "cpu", "fp32", 1)
    assert "11 x 1 accum x 1 process(es), 11 sequences, 352 tokens per step (--batch-size 100000 cut to what " \
           "runs: the train split holds 11 blocks per process)" in text
    # two processes share the 11 blocks: 5 each; a --grad-accum beyond one epoch's micro-batches is cut too
    plan = plan_module.make_plan(TrainConfig(batch_size=2, grad_accum=8), meta, BLOCK, world_size=2)
    assert (plan.batch_size, plan.grad_accum, plan.tokens_per_step) == (2, 3, 2 * 5 * BLOCK)
    assert "--grad-accum 8 cut to what runs: the train split holds 5 blocks per process" in \
        plan_module.describe_plan(plan, TrainConfig(batch_size=2, grad_accum=8), meta, 1, 0.0, "cpu", "fp32", 2)


# -----------------------------------------------------------------------------
# The evaluation and save schedule


def test_no_epoch_end_evaluation_a_few_steps_before_an_eval_every_one():
    plan = plan_module.Plan(block_size=32, train_blocks=2000, val_blocks=20, steps_per_epoch=246, total_steps=400,
                            warmup_steps=0, tokens_per_step=256, epochs=400 / 246, eval_every=250)
    cfg = TrainConfig(eval_every=250)
    assert plan_module.evaluation_steps(cfg, plan) == [0, 250, 400]  # was 0, 246, 250, 400
    assert plan_module.count_evaluations(cfg, plan) == 3 and not plan.evaluates_at(246)
    # Against the rule written out (an epoch end within a tenth of the shorter period of an --eval-every
    # evaluation or of the last step gets none of its own): listed, asked and counted by arithmetic alike.
    rng = random.Random(0)
    for case in range(400):
        short = case % 2  # half of them with short periods, where a tenth of a period is under one step
        epoch, every = rng.randint(1, 12 if short else 300), rng.choice([0, rng.randint(1, 25 if short else 400)])
        total = rng.randint(1, 1000)
        plan = dataclasses.replace(plan, steps_per_epoch=epoch, total_steps=total, eval_every=every)
        window = max(1, min(every or epoch, epoch) // 10)
        near = lambda s: ((every and min(s % every, every - s % every) <= window)  # noqa: E731, B023
                          or total - s <= window)  # noqa: B023
        expected = sorted({0, total, *(range(every, total + 1, every) if every else ()),
                           *(s for s in range(epoch, total, epoch) if not near(s))})
        cfg = TrainConfig(eval_every=every)
        assert plan_module.evaluation_steps(cfg, plan) == expected, (epoch, every, total)
        assert [s for s in range(total + 1) if plan.evaluates_at(s)] == expected
        assert plan_module.count_evaluations(cfg, plan) == len(expected)



def test_no_epoch_end_evaluation_on_the_step_after_an_eval_every_one_or_before_the_last():
    """Epochs of 7 steps and --eval-every 20 evaluated at 20 and 21, and 41 and 42 (a tenth of 7 steps is
    no step): an epoch end one step from another evaluation now gets none of its own."""
    plan = plan_module.Plan(block_size=32, train_blocks=70, val_blocks=20, steps_per_epoch=7, total_steps=43,
                            warmup_steps=0, tokens_per_step=256, epochs=43 / 7, eval_every=20)
    cfg = TrainConfig(eval_every=20)
    steps = plan_module.evaluation_steps(cfg, plan)
    assert steps == [0, 7, 14, 20, 28, 35, 40, 43]  # was 0, 7, 14, 20, 21, 28, 35, 40, 42, 43
    assert plan_module.count_evaluations(cfg, plan) == len(steps)
    assert not any(b - a == 1 for a, b in itertools.pairwise(steps))
    no_eval_every = dataclasses.replace(plan, eval_every=0, total_steps=22)  # epoch end 21, last step 22
    assert plan_module.evaluation_steps(TrainConfig(eval_every=0), no_eval_every) == [0, 7, 14, 22]


def test_the_plan_answers_by_arithmetic_what_the_listed_steps_say(tiny_model_dir, tiny_data_dir):
    """evaluates_at/saves_at/count_evaluations agree with the listed steps, here small enough to list."""
    args = base_args(tiny_model_dir, tiny_data_dir, "unused", "--max-steps", "50", "--eval-every", "7",
                     "--save-every", "4")
    cfg, _ = parse_config(args)
    plan = plan_module.make_plan(cfg, load_meta(tiny_data_dir), 32, world_size=1)
    listed = plan_module.evaluation_steps(cfg, plan)
    assert [s for s in range(60) if plan.evaluates_at(s)] == listed
    assert plan_module.count_evaluations(cfg, plan) == len(listed)
    assert [s for s in range(60) if plan.saves_at(s)] == [*range(4, 50, 4), 50]


def test_a_dry_run_of_a_trillion_steps_prints_the_plan(tmp_path, tiny_model_dir, tiny_data_dir):
    args = base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out", "--max-steps", TRILLION,
                     "--eval-every", "250", "--save-every", "500", "--dry-run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assert ft.main(args) == 0
    printed = out.getvalue()
    epoch = plan_module.make_plan(parse_config(args)[0], load_meta(tiny_data_dir), 32, world_size=1).steps_per_epoch
    assert f"{epoch:,} per epoch, {TRILLION:,} total" in printed
    # every 250 steps and every epoch end (the last step is both); those of both counted once; and step 0;
    # less the epoch ends within a tenth of the shorter period of a multiple of 250 (no evaluation of their own), which
    # repeat in each stretch of lcm(250, epoch) steps (the last step is a multiple of 250: no more near it)
    window, period = epoch // 10, math.lcm(250, epoch)
    near = lambda s: 0 < min(s % 250, 250 - s % 250) <= window  # noqa: E731
    full = TRILLION // period * period
    dropped = (TRILLION // period * sum(near(s) for s in range(epoch, period, epoch))
               + sum(near(s) for s in range(full + epoch, TRILLION, epoch)))
    count = TRILLION // 250 + TRILLION // epoch - TRILLION // period + 1 - dropped
    first = sorted(s for s in {*range(250, 1300, 250), *range(epoch, 1300, epoch)} if not near(s))[:5]
    assert f"at steps 0, {', '.join(map(str, first))}, ... ({count:,} in all)" in printed
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# --resume --extend: a finished run trained on, its lr schedule planned again, and said so


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
    # Where it went on is in metrics.jsonl (loss.png draws a dotted line there), once, after the step reached.
    (mark,) = train_records(out, "resume")
    assert mark == {"kind": "resume", "step": 2, "tokens": records[1]["tokens"], "total_steps": 4, "extended": True}
    kinds = [(r["kind"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert kinds[kinds.index(("resume", 2)) - 1:][:3] == [("eval", 2), ("resume", 2), ("train", 3)]
    # linear decay over 4 steps after 1 warmup step: (4 - s) / 3 of the peak after s steps (lr 0 before)
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 3e-3, 3e-3 * 2 / 3, 3e-3 / 3])
    assert TrainConfig(**ckpt.load_training_state(out / "checkpoint-4")["config"]).warmup_steps == 1
