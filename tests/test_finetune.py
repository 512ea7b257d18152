"""End-to-end tests of finetune_generative.py on a tiny GPT-2, on CPU, in tmp_path.

Most runs call main() in-process (fast); signals and the clobber/usage errors go through a
subprocess, the way a user runs the script.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune_generative as ft
from dataset import load_meta
from finetune.core import console
from finetune.formats import checkpoints as ckpt
from finetune.train import plan as plan_module
from finetune.train.config import TrainConfig, parse_config
from helpers import (
    BLOCK,
    REPO_ROOT,
    assert_clean_error,
    assert_same_weights,
    assert_trained_alike,
    base_args,
    run_script,
    train_records,
    weights,
)


def expected_total_steps(data_dir: Path, batch: int, accum: int, epochs: int) -> int:
    blocks = load_meta(data_dir)["splits"]["train"]["tokens"] // BLOCK
    return math.ceil(blocks / (batch * accum)) * epochs


# -----------------------------------------------------------------------------
# The main run, shared by several tests (2 epochs, grad-accum 2, a checkpoint every 5 steps)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--save-every", "5")) == 0
    return out


def test_scheduler_total_and_step_count(full_run, tiny_data_dir):
    total = expected_total_steps(tiny_data_dir, batch=8, accum=2, epochs=2)
    records = train_records(full_run)
    assert [r["step"] for r in records] == list(range(1, total + 1))
    last_state = torch.load(full_run / f"checkpoint-{total}" / "training_state.pt", weights_only=True)
    assert last_state["scheduler"]["last_epoch"] == total
    # transformers' linear schedule, but warmup step k of 3 at peak x k / 3 (no step at lr 0), then its
    # linear decay towards 0 (make_scheduler).
    lrs = [r["lr"] for r in records]
    assert lrs[:5] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3 * (total - 4) / (total - 3)])
    assert lrs[-1] == pytest.approx(3e-3 / (total - 3))
    # The epoch ends exactly at half the steps.
    assert [r["epoch"] for r in records].index(1) == total // 2 - 1


def test_loss_falls(full_run):
    evals = train_records(full_run, "eval")
    assert evals[0]["step"] == 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals


def test_checkpoint_contents_and_final_model(full_run, tiny_data_dir):
    total = expected_total_steps(tiny_data_dir, batch=8, accum=2, epochs=2)
    checkpoint = full_run / f"checkpoint-{total}"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "training_state.pt"]
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["step"] == total and state["epoch"] == 2 and state["samples_in_epoch"] == 0
    assert {"optimizer", "scheduler", "scaler", "rng", "config", "data_fingerprint"} <= state.keys()
    assert state["config"]["grad_accum"] == 2
    # The final model at the output dir itself equals the last checkpoint's weights.
    assert_same_weights(full_run, checkpoint)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (full_run / name).is_file(), name
    assert (full_run / "best" / "model.safetensors").is_file()
    assert not list(full_run.glob(".tmp-*"))


def test_output_loads_with_from_pretrained_and_pipeline(full_run):
    from transformers import AutoModelForCausalLM, pipeline

    model = AutoModelForCausalLM.from_pretrained(full_run)
    assert model.config.n_layer == 2
    generator = pipeline("text-generation", model=str(full_run), device="cpu")
    out = generator("The ship", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The ship")


def test_resume_equals_uninterrupted_across_epoch_boundary(full_run, tmp_path, tiny_model_dir, tiny_data_dir):
    """Resume from a checkpoint in epoch 0 with grad-accum 2: same losses, lrs and final weights."""
    total = expected_total_steps(tiny_data_dir, batch=8, accum=2, epochs=2)
    resume_step = 5
    assert resume_step < total // 2  # so the resumed run crosses the epoch boundary
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(full_run / f"checkpoint-{resume_step}", out / f"checkpoint-{resume_step}")
    shutil.copy(full_run / "metrics.jsonl", out / "metrics.jsonl")  # lines past step 5 must be dropped
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    original, resumed = train_records(full_run), train_records(out)
    assert [r["step"] for r in resumed] == list(range(1, total + 1))
    for a, b in zip(original, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
        assert a["lr"] == b["lr"] and a["epoch"] == b["epoch"] and a["tokens"] == b["tokens"]
        assert a["epoch_progress"] == b["epoch_progress"]  # the position in the epoch comes back too
    assert_same_weights(full_run, out)


def test_save_total_limit_keeps_newest(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "7", "--save-every", "2",
                     "--save-total-limit", "2")
    assert ft.main(args) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    assert (out / "best").is_dir()


def test_max_steps_sets_schedule(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "4")) == 0
    records = train_records(out)
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3])
    assert records[-1]["epoch"] == 0  # 4 steps is less than one epoch
    assert (out / "checkpoint-4").is_dir()


def test_divergence_stops_and_keeps_last_checkpoint(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--lr", "1e9", "--warmup-steps", "0",
                     "--max-grad-norm", "0", "--save-every", "1", "--save-total-limit", "0")
    assert ft.main(args) == ft.EXIT_DIVERGED
    err = capsys.readouterr().err
    line = [text for text in err.splitlines() if text.startswith("error:")]
    assert len(line) == 1 and "--lr" in line[0] and "stopped before the optimizer step" in line[0]
    steps = sorted(ckpt.checkpoint_step(p) for p in out.glob("checkpoint-*"))
    diverged_at = int(line[0].split(" at step ")[1].split()[0])
    assert steps == list(range(1, diverged_at))
    state = ckpt.load_training_state(out / f"checkpoint-{steps[-1]}")
    assert state["step"] == steps[-1]


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    out = tmp_path / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--dry-run")) == 0
    text = capsys.readouterr().out
    total = expected_total_steps(tiny_data_dir, batch=8, accum=2, epochs=2)
    assert f"{total // 2:,} per epoch, {total:,} total" in text
    assert "3 warmup" in text and "512 tokens per step" in text and "GiB" in text
    assert "cpu, precision fp32" in text
    # how long it will take, from a matmul probe of this machine at this model's shapes (issue 27, 16)
    assert re.search(r"^time estimate    ~\d+\w+ \(\d+\w+ per step; this cpu did [\d,.e+-]+ GFLOP/s of fp32 matmuls at "
                     r"this model's shapes in a [\d.]+ s probe just now; rough, within about 2x\)$", text, re.MULTILINE)
    assert not out.exists()


def test_a_long_cpu_run_names_the_settings_that_shorten_it():
    """The Quickstart's defaults on GPT-2 124M at a slow CPU's 20 GFLOP/s: hours, so the plan names --max-steps,
    LoRA and --block-size with their own estimates; the same run on a GPU gets the time alone."""
    from transformers import GPT2Config

    config = GPT2Config()  # 124M: 12 layers, 768 wide, 50,257 tokens
    n_params = 124_439_808
    meta = {"splits": {"train": {"tokens": 123 * 1024}, "val": {"tokens": 12 * 1024}}}
    cfg = TrainConfig()  # block 1024 (the model's), batch 8, 3 epochs
    plan = plan_module.make_plan(cfg, meta, 1024, world_size=1)
    speed = plan_module.SpeedProbe(gflops=20.0, seconds=0.3, rows=1024)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    lines = plan_module.time_estimate_lines(cfg, plan, config, n_params, speed, "fp32", 1, cpu, lora=False)
    full = plan_module.run_seconds(cfg, plan, config, n_params, speed, "fp32", 1, cpu, lora=False)
    # 48 steps of 8,192 tokens at 6 x 124M + 12 x 12 x 768 x 1024 FLOP per token, 70 % of 20 GFLOP/s
    assert full > 48 * 8192 * (6 * n_params + 12 * 12 * 768 * 1024) / (0.7 * 20e9) > 3600
    assert lines[0].startswith(f"time estimate    ~{console.format_duration(full)} (")
    shorter = re.fullmatch(r" +long for a CPU; shorter: --max-steps (\d+) ~(\S+); --lora-r 16 ~(\S+); "
                           r"--block-size 256 ~(\S+)", lines[1])
    assert shorter, lines
    steps = int(shorter[1])
    assert 1 <= steps < plan.total_steps
    lora = plan_module.run_seconds(cfg, plan, config, n_params, speed, "fp32", 1, cpu, lora=True)
    assert shorter[3] == console.format_duration(lora) and lora < full
    on_gpu = plan_module.time_estimate_lines(cfg, plan, config, n_params, speed, "fp32", 1, gpu, lora=False)
    assert on_gpu == [lines[0].replace("this cpu did", "this cuda did")]


@pytest.mark.slow
def test_refuses_to_clobber_an_earlier_run(full_run, tiny_model_dir, tiny_data_dir):
    result = run_script("finetune_generative.py", *base_args(tiny_model_dir, tiny_data_dir, full_run))
    assert_clean_error(result, "earlier run", "--resume", "--overwrite")
    assert (full_run / "model.safetensors").is_file()


@pytest.mark.slow
def test_resume_refuses_other_settings_and_data(full_run, tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(full_run / "checkpoint-5", out / "checkpoint-5")
    result = run_script("finetune_generative.py", "--output-dir", out, "--resume", "--batch-size", "4")
    assert_clean_error(result, "--batch-size 4 differs")
    other_data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, other_data)
    meta = json.loads((other_data / "meta.json").read_text())
    meta["sources"][0]["sha256"] = "0" * 64
    (other_data / "meta.json").write_text(json.dumps(meta))
    result = run_script("finetune_generative.py", "--output-dir", out, "--resume", "--data-dir", other_data)
    assert_clean_error(result, "data", "differs")


@pytest.mark.slow
def test_dataloader_workers_give_the_same_run_and_exit_cleanly(tmp_path, tiny_model_dir, tiny_data_dir):
    """With worker processes (the default is 2) the data order and losses are those of --num-workers 0, and
    the process exits by itself: the workers ignore SIGTERM, so they are shut down before the interpreter
    exits (which would terminate and join them)."""
    in_process = tmp_path / "in_process"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, in_process, "--max-steps", "4")) == 0
    with_workers = tmp_path / "with_workers"
    args = [*base_args(tiny_model_dir, tiny_data_dir, with_workers, "--max-steps", "4"), "--num-workers", "2"]
    result = run_script("finetune_generative.py", *args, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["loss"] for r in train_records(with_workers)] == [r["loss"] for r in train_records(in_process)]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path, tiny_model_dir, tiny_data_dir):
    reference = tmp_path / "reference"
    args = ["--epochs", "6", "--lr", "1e-4"]
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, reference, *args)) == 0

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "finetune_generative.py"),
                             *base_args(tiny_model_dir, tiny_data_dir, out, *args)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, err
    assert "--resume" in err and "Traceback" not in err
    (checkpoint,) = out.glob("checkpoint-*")
    stopped_at = ckpt.checkpoint_step(checkpoint)
    total = len(train_records(reference))
    assert 0 < stopped_at < total, "SIGTERM arrived after the run finished; make the run longer"

    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    assert [r["loss"] for r in train_records(out)] == pytest.approx([r["loss"] for r in train_records(reference)],
                                                                    abs=1e-6)
    assert_same_weights(reference, out)


BAD_ARGUMENTS = [
    (["--lr", "0"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--grad-accum", "-1"], "--grad-accum must be > 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
    (["--scheduler", "nope"], "--scheduler 'nope' is not one of"),
    (["--block-size", "4096"], "longer than the model's context"),
    (["--precision", "fp16"], "fp16 is not supported on cpu"),
    (["--precision", "fp8"], "invalid choice"),
    (["--lr", "abc"], "invalid float value"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--resume", "no/such/checkpoint"], "not a checkpoint folder"),
    (["--lr", "0", "--batch-size", "0"], "2 problems"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments(tmp_path, tiny_model_dir, tiny_data_dir, extra, message):
    result = run_script("finetune_generative.py", *base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out"), *extra)
    assert_clean_error(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_paths(tmp_path, tiny_model_dir, tiny_data_dir):
    result = run_script("finetune_generative.py", *base_args(tiny_model_dir, tmp_path / "nodata", tmp_path / "o"))
    assert_clean_error(result, "does not exist", f"HINT: run `python prepare_data.py --input YOUR_TEXT --tokenizer "
                       f"{tiny_model_dir} --output-dir {tmp_path / 'nodata'}` to (re)create it")
    result = run_script("finetune_generative.py", *base_args(tmp_path / "nomodel", tiny_data_dir, tmp_path / "o"))
    assert_clean_error(result, "cannot load model", "local folder")
    (tmp_path / "file").write_text("x")
    result = run_script("finetune_generative.py", *base_args(tiny_model_dir, tiny_data_dir, tmp_path / "file"))
    assert_clean_error(result, "is a file")


def test_samples_during_training_do_not_change_training(tmp_path, tiny_model_dir, tiny_data_dir):
    """Dropout is on (the tiny model's 0.1), so any RNG draw by the sampler would change the losses."""
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    common = ["--max-steps", "6", "--eval-every", "2"]
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, plain, *common)) == 0
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, sampled, *common, "--sample-prompt", "The ship",
                             "--sample-prompt", "Quiet morning", "--sample-max-new-tokens", "8")) == 0
    assert [r["loss"] for r in train_records(plain)] == [r["loss"] for r in train_records(sampled)]
    assert_same_weights(plain, sampled)
    samples = [json.loads(line) for line in (sampled / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [
        (step, prompt) for step in (0, 2, 4, 6) for prompt in ("The ship", "Quiet morning")]
    evals = {r["step"]: r["val_loss"] for r in train_records(sampled, "eval")}
    assert all(s["val_loss"] == evals[s["step"]] and s["text"].startswith(s["prompt"]) for s in samples)


def test_early_stopping_after_patience_evaluations(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    # A learning rate this high makes the validation loss worse after the first evaluations.
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--lr", "0.5", "--warmup-steps", "0", "--max-steps", "60",
                     "--eval-every", "2", "--early-stopping-patience", "2", "--scheduler", "constant")
    assert ft.main(args) == 0
    evals = train_records(out, "eval")  # the base model's at step 0 is the first to beat
    best = min(range(len(evals)), key=lambda i: evals[i]["val_loss"])
    assert len(evals) == best + 1 + 2, evals  # stopped right after 2 evaluations without improvement
    last_step = evals[-1]["step"]
    assert last_step < 60 and train_records(out)[-1]["step"] == last_step
    assert (out / f"checkpoint-{last_step}").is_dir() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("during", ["step", "evaluation"])
def test_a_stop_records_every_finished_step_loss(during, tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    """--log-every 100 and a SIGTERM at step 3 (in the step, or in the evaluation after it): the mean loss of
    steps 1-3 is in metrics.jsonl before the checkpoint (it was lost: issue 27, 17)."""
    losses, real_step = [], ft.train_step

    def step_then_signal(*args, **kwargs):
        if len(losses) == 2 and during == "step":
            signal.raise_signal(signal.SIGTERM)  # the run's own handler: this step finishes, then it stops
        result = real_step(*args, **kwargs)
        losses.append(result[0])
        return result

    monkeypatch.setattr(ft, "train_step", step_then_signal)
    if during == "evaluation":
        from finetune.train import training
        real_evaluate = training.evaluate

        def evaluate_then_signal(*args, **kwargs):
            if losses:
                signal.raise_signal(signal.SIGTERM)
            return real_evaluate(*args, **kwargs)

        monkeypatch.setattr(training, "evaluate", evaluate_then_signal)
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "10", "--log-every", "100",
                     *(["--eval-every", "3"] if during == "evaluation" else []))
    assert ft.main(args) == 143
    (record,) = train_records(out)
    assert record["step"] == len(losses) == 3 and (out / "checkpoint-3").is_dir()
    assert record["loss"] == pytest.approx(sum(losses) / 3, rel=1e-12)


def test_torch_dropout_flag_only_changes_the_mask_generator(tmp_path, tiny_model_dir, tiny_data_dir):
    """Without dropout the fast CPU path and --torch-dropout train identically; with dropout they draw
    different masks (cpu_dropout.py's distribution tests show the masks mean the same)."""
    losses = {}
    for name, extra in {"fast0": ["--dropout", "0"], "torch0": ["--dropout", "0", "--torch-dropout"],
                        "fast": ["--dropout", "0.1"], "torch": ["--dropout", "0.1", "--torch-dropout"]}.items():
        out = tmp_path / name
        assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "3", *extra)) == 0
        losses[name] = [r["loss"] for r in train_records(out)]
        assert len(losses[name]) == 3
    assert losses["fast0"] == losses["torch0"]
    assert_same_weights(tmp_path / "fast0", tmp_path / "torch0")
    assert losses["fast"][0] != losses["torch"][0]


def test_evaluations_happen_at_the_planned_steps_on_a_bounded_subset(tmp_path, tiny_model_dir, tiny_data_dir):
    args = base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out", "--eval-every", "4")  # epoch end 22: two steps from 20
    assert ft.main(args) == 0
    cfg, _ = parse_config(args)
    meta = load_meta(tiny_data_dir)
    plan = plan_module.make_plan(cfg, meta, BLOCK, world_size=1)
    steps = plan_module.evaluation_steps(cfg, plan)
    assert [r["step"] for r in train_records(tmp_path / "out", "eval")] == steps
    assert steps[0] == 0 and steps[-1] == plan.total_steps and plan.steps_per_epoch in steps


def test_default_evaluation_size_follows_the_budget():
    from dataclasses import replace

    from dataset import validation_blocks

    plan = plan_module.Plan(block_size=256, train_blocks=800, val_blocks=88, steps_per_epoch=200, total_steps=600,
                   warmup_steps=30, tokens_per_step=1024, epochs=3.0, eval_every=250)  # as make_plan sets it
    cfg = TrainConfig(batch_size=4)
    assert plan_module.evaluation_steps(cfg, plan) == [0, 200, 250, 400, 500, 600]
    assert plan_module.eval_batches_per_process(cfg, plan) == 8  # 600 / (20 x 6) = 5, raised to the minimum of 8
    long_plan = replace(plan, steps_per_epoch=5000, total_steps=10_000)
    assert len(plan_module.evaluation_steps(cfg, long_plan)) == 41
    assert plan_module.eval_batches_per_process(cfg, long_plan) == 10_000 // (20 * 41)
    assert plan_module.eval_batches_per_process(replace(cfg, grad_accum=4), long_plan) == 4 * 10_000 // (20 * 41)
    assert plan_module.eval_batches_per_process(replace(cfg, eval_batches=3), long_plan) == 3
    assert plan_module.eval_batches_per_process(replace(cfg, eval_batches=0), long_plan) is None  # the whole split
    # A partial pass is spread over the whole split, the same blocks every time, disjoint across ranks.
    assert validation_blocks(100, 10) == list(range(0, 100, 10))
    ranks = [validation_blocks(100, 20, rank=r, world_size=2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(0, 100, 5)) and not set(ranks[0]) & set(ranks[1])
    assert validation_blocks(7, 7) == validation_blocks(7, 10**9) == list(range(7))


def test_gradient_checkpointing_trains_the_same_with_dropout(tmp_path, tiny_model_dir, tiny_data_dir):
    """Recomputed activations must draw the same dropout masks (fast CPU dropout included), so the run
    with --gradient-checkpointing matches the one without, step for step."""
    losses = {}
    for name, extra in {"plain": [], "checkpointed": ["--gradient-checkpointing"]}.items():
        out = tmp_path / name
        assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "4", "--dropout", "0.2",
                                 *extra)) == 0
        losses[name] = [r["loss"] for r in train_records(out)]
    assert len(losses["plain"]) == 4
    assert losses["checkpointed"] == pytest.approx(losses["plain"], rel=1e-6, abs=1e-6)
    assert_trained_alike(weights(tmp_path / "plain"), weights(tmp_path / "checkpointed"),
                         [r["lr"] for r in train_records(tmp_path / "plain")])


def test_precision_auto_is_decided_once_and_kept_by_a_resume(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch,
                                                             capsys):
    """auto's choice is the run's setting: recorded in train_config.json and each checkpoint, so a resume on a
    machine whose speed probe would answer otherwise (another CPU, no cache) trains on in the same precision."""
    from finetune.runtime import device as runtime

    out = tmp_path / "out"
    args = [a if a != "fp32" else "auto" for a in base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", 2,
                                                           "--save-every", 1)]
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda *_: True)
    assert ft.main(args) == 0
    assert json.loads((out / "train_config.json").read_text())["precision"] == "bf16"
    shutil.rmtree(out / "checkpoint-2")
    monkeypatch.setattr(runtime, "cpu_bf16_is_faster", lambda *_: False)  # this machine's probe says fp32 now
    capsys.readouterr()
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    log = capsys.readouterr().err
    assert "device cpu, precision bf16" in log and "precision fp32" not in log
    assert [r["step"] for r in train_records(out)] == [1, 2]


# -----------------------------------------------------------------------------
# The end of a run: what it logs, best/ only when the base model is beaten


def test_one_step_changes_the_weights_and_logs_readable_settings(one_step, tiny_model_dir, tiny_data_dir):
    import dataclasses
    import shlex

    out, err = one_step
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
    # the settings not at their defaults, one per line; the whole config in train_config.json
    assert "settings (not at their defaults; all of them in" in err
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if "settings (not at their defaults" in line)
    shown = []
    for line in lines[start + 1:]:
        if not line.startswith("  --"):
            break
        shown.append(line)
    cfg = TrainConfig(**json.loads((out / "train_config.json").read_text()))
    assert cfg == parse_config(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1"))[0]
    assert "  --max-steps 1" in shown and "  --lr 0.003" in shown and "  --batch-size 8" not in shown
    assert f"  --output-dir {out}" in shown and "  --scheduler linear" not in shown  # linear is the default
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert len(shown) == sum(getattr(cfg, name) != getattr(TrainConfig(), name) for name in names)
    assert not any(line.lstrip().startswith("{") for line in lines)  # no JSON blob in the log
    # the end says the val loss before -> after and what to run next, pasteable anywhere
    before, after = (f"{e['val_loss']:.4f}" for e in evals)
    python, model = shlex.quote(sys.executable), shlex.quote(str(out))
    assert lines[-4].split(" ", 1)[1] == (
        f"done: val loss {before} at step 0 -> {after} at step 1; final model in {out}, best model "
        f"(val loss {after}, step 1) in {out / 'best'}")
    assert lines[-3:] == [
        "next:",
        f"  sample from it:        {python} {shlex.quote(str(REPO_ROOT / 'generate.py'))} --model {model} "
        "--prompt 'Once upon a time'",
        f"  export it (llama.cpp): {python} {shlex.quote(str(REPO_ROOT / 'export.py'))} --model {model} --to gguf"]


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


def test_loss_png_shows_a_training_loss_of_one_point(tmp_path, monkeypatch):
    """A line through one point draws nothing: the first evaluation after one logged step showed no training loss
    at all ; such a point is drawn as a marker."""
    import matplotlib.pyplot as plt

    from finetune.train.metrics import plot_losses

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: drawn.append(fig) or close(fig))
    metrics = [{"kind": "eval", "step": 0, "tokens": 0, "val_loss": 6.0},
               {"kind": "train", "step": 1, "tokens": 512, "loss": 5.9},
               {"kind": "eval", "step": 1, "tokens": 512, "val_loss": 5.8}]
    plot_losses(metrics, tmp_path / "loss.png")
    (train,) = [line for line in drawn[0].axes[0].lines if line.get_label() == "train"]
    assert list(train.get_xdata()) == [512] and train.get_marker() not in ("None", None, "", " ")
    assert (tmp_path / "loss.png").stat().st_size > 0
    plot_losses([*metrics, {"kind": "train", "step": 2, "tokens": 1024, "loss": 5.7}], tmp_path / "loss.png")
    (train,) = [line for line in drawn[1].axes[0].lines if line.get_label() == "train"]
    assert train.get_linestyle() == "-"  # two points and more: the line, as before
