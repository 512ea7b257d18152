"""Defects of the training script and generate.py found by a new user and an adversary (issue 15), each
reproduced as the issue describes it: a run that trains nothing, a plan for a batch that cannot run, the
logged config, unsafe or damaged files, unhelpful hints, a lock on --output-dir, the resume command and
signals during step 0."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune_generative as ft
import generate
from finetune import checkpoints as ckpt
from finetune import plan as plan_module
from finetune.config import TrainConfig, parse_config
from finetune.errors import first_line
from finetune.rundir import lock_holder
from helpers import BLOCK, REPO_ROOT, assert_clean_error, base_args, run_main, train_records, weights


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> tuple[Path, str]:
    """A run of --max-steps 1 (base_args: lr 3e-3, 3 warmup steps), and what it printed on stderr."""
    out = tmp_path_factory.mktemp("one_step") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "1")) == 0
    return out, err.getvalue()

# -----------------------------------------------------------------------------
# #10: no optimizer step at lr 0; best/ only when the base model is beaten


def test_one_step_changes_the_weights_and_logs_readable_settings(one_step, tiny_model_dir, tiny_data_dir):
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
    # #13: the settings not at their defaults, one per line; the whole config in train_config.json
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
    # issue 23 #9: the end says the val loss before -> after and what to run next, pasteable anywhere
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


# -----------------------------------------------------------------------------
# #11: the plan and the memory estimate are for the batch that runs


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
# #6: a malicious pickle is refused in our words; a damaged training state is described, not relayed


class RunsCodeWhenUnpickled:
    """What an attacker puts in a pickle: unpickling calls open(marker, "w"), creating the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def assert_refused_unsafely_loadable(result, marker: Path, *fragments: str) -> None:
    assert_clean_error(result, *fragments)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "weights_only" not in result.stderr and "Re-running" not in result.stderr  # torch's advice, not relayed
    assert not marker.exists()  # the payload never ran


def test_malicious_pickle_weights_are_refused_by_training_and_generate(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                        capsys):
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model_dir, evil)
    state = weights(evil)
    (evil / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**state, "payload": RunsCodeWhenUnpickled(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):  # what torch itself says (and advises)
        torch.load(evil / "pytorch_model.bin", weights_only=True)

    result = run_main(ft.main, base_args(evil, tiny_data_dir, tmp_path / "out"), capsys)
    assert_refused_unsafely_loadable(result, marker, "not a safe weights file", "HINT: use a model saved as "
                                     "model.safetensors")
    result = run_main(generate.main, ["--device", "cpu", "--precision", "fp32", "--model", evil, "--prompt", "x",
                                      "--max-new-tokens", 2], capsys)
    assert_refused_unsafely_loadable(result, marker, "not a safe weights file", "safetensors")


def test_tampered_training_state_is_refused_without_relaying_torch(one_step, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(one_step[0], out)
    state_file = out / "checkpoint-1" / "training_state.pt"
    marker = tmp_path / "payload-ran"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "rng": RunsCodeWhenUnpickled(marker)}, state_file)  # a valid zip: its CRCs match
    result = run_main(ft.main, ["--output-dir", out, "--resume"], capsys)
    assert_refused_unsafely_loadable(result, marker, f"checkpoint {out}/checkpoint-1 is damaged: training_state.pt "
                                     "names Python functions to call while loading")


def test_first_line_cuts_long_messages_at_a_word():
    message = ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
               "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` "
               "will likely succeed.\nmore")
    line = first_line(pickle.UnpicklingError(message))
    assert line.endswith(" ...") and len(line) <= 164
    kept = line[: -len(" ...")]
    assert message.startswith(kept) and message[len(kept)] == " "  # whole words only
    assert first_line(ValueError("short. ")) == "short" and first_line(ValueError("")) == "ValueError"


# -----------------------------------------------------------------------------
# #9: each HINT fits its case


def test_data_dir_that_is_a_file(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir / "meta.json", tmp_path / "out"), capsys)
    assert_clean_error(result, f"{tiny_data_dir}/meta.json is a file, not a folder",
                       f"HINT: pass the folder prepare_data.py wrote (train.bin, val.bin and meta.json): {tiny_data_dir}")
    assert "--output-dir" not in result.stderr.split("HINT:")[1]  # never: prepare_data --output-dir <that file>
    assert not (tmp_path / "out").exists()


def test_model_folder_without_config_json(tmp_path, tiny_tokenizer_dir, tiny_data_dir, capsys):
    result = run_main(ft.main, base_args(tiny_tokenizer_dir, tiny_data_dir, tmp_path / "out"), capsys)
    assert_clean_error(result, "has no config.json, so it is not a saved model",
                       "HINT: pass the folder that holds config.json and the weights")
    assert "offline" not in result.stderr.lower() and "HF_HUB_OFFLINE" not in result.stderr
    assert "model_type" not in result.stderr  # transformers' reading of a config.json that is not there


def test_hub_name_with_hf_hub_offline_already_set(tmp_path, tiny_data_dir, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest
    result = run_main(ft.main, base_args("no-such-org/no-such-model", tiny_data_dir, tmp_path / "out"), capsys)
    assert_clean_error(result, "HF_HUB_OFFLINE is set, so the hub was not asked",
                       "HINT: pass a local model folder with --model", "or unset HF_HUB_OFFLINE once to download it",
                       "`hf download no-such-org/no-such-model --local-dir ./no-such-model`, "
                       "then pass --model ./no-such-model")
    assert "set HF_HUB_OFFLINE=1" not in result.stderr


def test_hub_name_with_no_network_names_the_download_command(tmp_path, tiny_data_dir, capsys, monkeypatch):
    """Offline, the HINT names the command that fetches the model on a machine with network (issue 27, 18)."""
    import finetune.models as models
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)  # no network, without waiting for it
    result = run_main(ft.main, base_args("gpt2-no-such-size", tiny_data_dir, tmp_path / "out"), capsys)
    assert_clean_error(result, "the hub is not reachable (no network?)",
                       "or download it once on a machine with network: "
                       "`hf download gpt2-no-such-size --local-dir ./gpt2-no-such-size`, "
                       "then pass --model ./gpt2-no-such-size")


# -----------------------------------------------------------------------------
# #2: one run at a time in an --output-dir; #7: the printed resume command works as printed, from anywhere;
# #8: a signal during step 0 says what happened


def start_script(args: list, log: Path, cwd: Path | None = None, script: str | None = None) -> subprocess.Popen:
    """finetune_generative.py (or the Python source `script`, given the same argv) in a process of its own."""
    command = [sys.executable, str(REPO_ROOT / "finetune_generative.py")] if script is None else \
        [sys.executable, "-c", script]
    with open(log, "w") as stderr:
        return subprocess.Popen([*command, *map(str, args)], cwd=cwd or REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def catches(pid: int, signum: int) -> bool:
    """Has process `pid` installed a handler for `signum` (Linux: the SigCgt mask in /proc/PID/status)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def test_two_runs_started_together_into_one_output_dir(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "3")
    runs = {p.pid: p for p in (start_script(args, tmp_path / "a.txt"), start_script(args, tmp_path / "b.txt"))}
    logs = dict(zip(runs, (tmp_path / "a.txt", tmp_path / "b.txt")))

    def holder() -> int | None:
        text = (out / ".lock").read_text().strip() if (out / ".lock").is_file() else ""
        return int(text) if text.isdigit() and lock_holder(out) == text else None

    wait_for(lambda: holder() in runs, "one run to take the lock")
    first = holder()
    (second,) = set(runs) - {first}
    os.kill(first, signal.SIGSTOP)  # however slow the second run starts, the first still holds the folder then
    try:
        assert runs[second].wait(timeout=180) == 2
    finally:
        os.kill(first, signal.SIGCONT)
    assert runs[first].wait(timeout=180) == 0, logs[first].read_text()
    refused = logs[second].read_text()
    assert refused.splitlines()[-1] == (
        f"error: --output-dir {out} is in use by another run of finetune_generative.py (PID {first}). "
        f"HINT: wait for it to finish, stop it, or choose another --output-dir")
    assert [line for line in refused.splitlines() if line.startswith("error:")] == [refused.splitlines()[-1]]
    assert [(r["kind"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [
        ("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]  # each line once: one run wrote it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


def test_resume_after_kill9_and_the_printed_command_from_another_directory(tmp_path, tiny_model_dir, tiny_data_dir):
    """--output-dir with a space and a quote, --data-dir and --model relative to the working directory."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tiny_data_dir, work / "data")
    out_name = "it's my run"
    args = base_args(os.path.relpath(tiny_model_dir, work), "data", out_name, "--max-steps", "20",
                     "--save-every", "2")
    out = work / out_name

    killed = start_script(args, tmp_path / "killed.txt", cwd=work)
    wait_for(lambda: (out / "checkpoint-2").is_dir() or killed.poll() is not None, "checkpoint-2")
    killed.kill()  # kill -9
    killed.wait(timeout=60)
    assert (out / ".lock").read_text().strip() == str(killed.pid)  # the file stays; its lock died with the run
    assert lock_holder(out) is None

    resumed = start_script(["--output-dir", out_name, "--resume"], tmp_path / "resumed.txt", cwd=work)
    wait_for(lambda: catches(resumed.pid, signal.SIGTERM) or resumed.poll() is not None, "the SIGTERM handler")
    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(timeout=180) == 143, (tmp_path / "resumed.txt").read_text()
    err = (tmp_path / "resumed.txt").read_text()
    assert "in use" not in err  # the killed run's lock file did not block it
    after = err.split("continue with:\n")[1].splitlines()
    command = after[0].strip()
    assert after[1:] == [], after  # issue 23 #8: the resume command is the last line, no progress line after it
    # issue 23 #18: the interpreter that ran, so it works where its venv is not active (PATH has no venv below)
    assert command == (f"{shlex.quote(sys.executable)} {shlex.quote(str(REPO_ROOT / 'finetune_generative.py'))} "
                       f"--output-dir {shlex.quote(str(out))} --resume")
    stopped_at = ckpt.checkpoint_step(ckpt.list_checkpoints(out)[-1])
    assert 2 < stopped_at < 20, "the run ended before SIGTERM; make it longer"

    env = dict(os.environ, PATH="/usr/bin:/bin")
    done = subprocess.run(["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in train_records(out)] == list(range(1, 21))
    assert (out / "checkpoint-20").is_dir() and (out / "model.safetensors").is_file()
    assert not list(elsewhere.iterdir())  # nothing written where the command ran


SLOW_STEP0 = f"""
import sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
import finetune.training as training
evaluate = training.evaluate
def slow_evaluate(*args, **kwargs):  # room for a signal to arrive during the step-0 evaluation
    print("evaluating", file=sys.stderr, flush=True)
    time.sleep(3)
    return evaluate(*args, **kwargs)
training.evaluate = slow_evaluate
import finetune_generative
sys.exit(finetune_generative.main(sys.argv[1:]))
"""


def test_a_signal_during_the_step0_evaluation_says_what_happened(tmp_path, tiny_model_dir, tiny_data_dir):
    runs = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        args = base_args(tiny_model_dir, tiny_data_dir, tmp_path / signum.name, "--max-steps", "2")
        runs[signum] = (start_script(args, tmp_path / f"{signum.name}.txt", script=SLOW_STEP0), args)
    for signum, (proc, _) in runs.items():
        log = tmp_path / f"{signum.name}.txt"
        wait_for(lambda: "evaluating" in log.read_text() or proc.poll() is not None, "the step-0 evaluation")  # noqa: B023 (called at once)
        proc.send_signal(signum)
    for signum, (proc, _) in runs.items():
        code = proc.wait(timeout=180)
        err = (tmp_path / f"{signum.name}.txt").read_text()
        assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum], err
        assert "Traceback" not in err and "aborted by a second interrupt" not in err
        assert (f"{signum.name}: stopped before the first training step, so nothing was trained and there is "
                f"nothing to resume; the same command starts the run again") in err
        out = tmp_path / signum.name
        assert not list(out.glob("checkpoint-*"))  # and nothing recorded: the stop cut the evaluation short
        assert not (out / "metrics.jsonl").exists() or train_records(out) == train_records(out, "eval") == []
    # issue 23 #3: the start-up files left (train_config.json, metrics.jsonl) are no earlier run: the same
    # command starts again in their place, without --overwrite
    out = tmp_path / "SIGTERM"
    assert {".lock", "train_config.json"} <= {p.name for p in out.iterdir()} <= {".lock", "metrics.jsonl",
                                                                               "train_config.json"}
    assert ft.main(runs[signal.SIGTERM][1]) == 0
    assert [r["step"] for r in train_records(out)] == [1, 2]
    assert [r["step"] for r in train_records(out, "eval")] == [0, 2]  # step 0 once: the stopped run's is gone
