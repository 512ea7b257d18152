"""finetune/formats/checkpoints.py: crash safety of the training script's checkpoints, by injecting faults, and what a
resume checks.

- kill -9 at 12 random moments of one long resumed chain: every checkpoint-* present loads, the
  .tmp-* leftovers are cleaned by the next start, and the chain ends with the weights and losses
  of an uninterrupted run;
- a save that fails partway (disk full, injected in-process) removes the partial checkpoint,
  keeps the previous one loadable and stops with one error line and EXIT_SAVE_FAILED;
- a damaged checkpoint (missing file, truncated safetensors, garbled or tampered training state) is refused
  on --resume, naming it and what is wrong, without relaying torch; --skip-damaged-checkpoints falls back,
  saying so;
- a resume after changing the data, the tokenizer or the model is refused with the reason.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune_generative as ft
from finetune.core.fsio import remove_leftovers
from finetune.formats import checkpoints as ckpt
from helpers import (
    SAVE_RUN,
    RunsCodeWhenUnpickled,
    assert_clean_error,
    assert_refused_unsafely_loadable,
    assert_same_weights,
    base_args,
    checkpoint_names,
    copy_data,
    error_lines,
    newest_step,
    run_main,
    start,
    train_records,
    wait_for_step,
)

CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "training_state.pt"]


def assert_checkpoint_loads(checkpoint: Path, full: bool = True) -> None:
    """What a user (or --resume) reads back: safetensors weights, from_pretrained, the training state."""
    assert sorted(p.name for p in checkpoint.iterdir()) == CHECKPOINT_FILES, checkpoint
    assert "transformer.wte.weight" in load_file(checkpoint / "model.safetensors")
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert state["step"] == ckpt.checkpoint_step(checkpoint)
    assert ckpt.read_checkpoint(checkpoint)["step"] == state["step"]  # our own validation agrees
    if full:
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(checkpoint)


# -----------------------------------------------------------------------------
# kill -9 at random moments


N_KILLS = 12  # each kill costs a process start (~10 s): 12 random moments still spread over the chain


KILL_SEED = 20240607



@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_data_dir):
    # 2 epochs, a checkpoint every step (pruned to 3, so deletes get killed too), dropout on (RNG restore).
    run = ["--batch-size", "8", "--grad-accum", "1", "--epochs", "2", "--lr", "1e-3", "--save-every", "1",
           "--save-total-limit", "3"]
    started = time.time()
    reference = tmp_path / "reference"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, reference, *run, "--save-every", "0")) == 0
    total = len(train_records(reference))

    out = tmp_path / "out"
    rng = random.Random(KILL_SEED)
    kill_steps, leftovers, earlier_pids = [], set(), set()
    for kill in range(N_KILLS):
        before = newest_step(out)
        args = (["--output-dir", out, "--resume"] if before else
                base_args(tiny_model_dir, tiny_data_dir, out, *run, "--overwrite"))
        log = tmp_path / f"stderr-{kill}.txt"
        proc = start(args, log)
        try:
            if rng.random() < 0.2:  # during start-up: loading, cleaning leftovers, rewriting metrics.jsonl
                time.sleep(rng.uniform(0.05, 2.5))
            else:  # mid-run: a random moment in the step after the next 1-3 checkpoints
                target = before + rng.randint(1, 3)
                assert wait_for_step(proc, out, target), f"run ended before kill {kill}:\n{log.read_text()}"
                time.sleep(rng.uniform(0.0, 0.05))
            assert proc.poll() is None, f"run ended before kill {kill}; make it longer:\n{log.read_text()}"
        finally:  # on a failed assertion too: no run left behind
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        kill_steps.append(newest_step(out))
        leftovers |= {p.name.rsplit("-", 1)[0] for p in out.glob(".tmp-*")}
        if kill_steps[-1] > before:  # this process got past its start-up, so it cleaned what earlier ones left
            left_by = {int(p.name.rsplit("-", 1)[1]) for p in out.glob(".tmp-*-*") if p.name[-1].isdigit()}
            assert not left_by & earlier_pids, sorted(p.name for p in out.glob(".tmp-*"))
        earlier_pids.add(proc.pid)
        checkpoints = ckpt.list_checkpoints(out)
        assert len(checkpoints) <= 3 + 1  # the limit, plus at most one written before the prune
        for checkpoint in checkpoints:
            assert_checkpoint_loads(checkpoint, full=checkpoint == checkpoints[-1])

    assert kill_steps == sorted(kill_steps) and 0 < kill_steps[-1] < total, kill_steps
    assert len(set(kill_steps)) >= N_KILLS // 2, kill_steps  # spread over the chain, not all at one step
    killed = time.time()
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    assert_same_weights(reference, out)
    ours, theirs = train_records(out), train_records(reference)
    assert [r["step"] for r in ours] == list(range(1, total + 1))
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], abs=1e-6)
    assert [(r["step"], round(r["val_loss"], 5)) for r in train_records(out, "eval")] == \
        [(r["step"], round(r["val_loss"], 5)) for r in train_records(reference, "eval")]
    assert checkpoint_names(out) == [f"checkpoint-{s}" for s in range(total - 2, total + 1)]
    assert not list(out.glob(".tmp-*")), "leftovers of killed runs must be cleaned by the next start"
    print(f"kills at checkpoint steps {kill_steps} of {total}; leftovers seen: {sorted(leftovers)}; "
          f"{killed - started:.0f}s to the last kill, {time.time() - killed:.0f}s to finish")


# -----------------------------------------------------------------------------
# A save that fails partway: disk full


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """An uninterrupted 6-step run with checkpoints 2, 4, 6: the reference for the resumes below."""
    out = tmp_path_factory.mktemp("six") / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, *SAVE_RUN)) == 0
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out


def fail_on_second_call(real, make_error):
    """A stand-in for a save function: the first call saves; the second writes half, then fails."""
    calls = []

    def save(obj, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            path = Path(target.name if hasattr(target, "name") else target)
            assert path.parent.name.startswith(".tmp-checkpoint-4-"), path  # written aside, never in place
            with open(path, "wb") as f:
                f.write(b"\0" * 1000)
            raise make_error()
        return real(obj, target, *args, **kwargs)

    return save


def disk_full_in_torch_save(monkeypatch):
    # Our save goes through a Python file, so the OSError is what torch's writer meets.
    monkeypatch.setattr(torch, "save", fail_on_second_call(torch.save, lambda: OSError(
        errno.ENOSPC, os.strerror(errno.ENOSPC))))


def disk_full_in_safetensors(monkeypatch):
    # What safetensors really raises on a full disk (checked on a full tmpfs): not an OSError.
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError
    monkeypatch.setattr(modeling_utils, "safe_save_file", fail_on_second_call(
        modeling_utils.safe_save_file,
        lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")))


@pytest.mark.parametrize("inject", [disk_full_in_torch_save, disk_full_in_safetensors],
                         ids=["training_state", "safetensors"])
def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, tiny_model_dir, tiny_data_dir, six_steps,
                                                         monkeypatch, capsys, inject):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        inject(patch)
        result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, *SAVE_RUN), capsys)
    assert result.returncode == ft.EXIT_SAVE_FAILED == 4
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    for fragment in (f"could not save checkpoint {out}/checkpoint-4 (No space left on device)",
                     "partial files were removed", f"{out}/checkpoint-2, is intact", "HINT: free disk space",
                     f"--output-dir {out} --resume"):
        assert fragment in line, (fragment, line)
    assert checkpoint_names(out) == ["checkpoint-2"]
    assert not list(out.glob(".tmp-*"))
    assert_checkpoint_loads(out / "checkpoint-2")
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]
    # With the disk freed, --resume continues from checkpoint-2 to the uninterrupted result.
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0
    assert_same_weights(six_steps, out)
    assert [r["loss"] for r in train_records(out)] == pytest.approx(
        [r["loss"] for r in train_records(six_steps)], abs=1e-6)


def test_disk_full_before_any_checkpoint_says_to_start_again(tmp_path, tiny_model_dir, tiny_data_dir,
                                                             monkeypatch, capsys):
    def quota_exceeded(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    out = tmp_path / "out"
    monkeypatch.setattr(torch, "save", quota_exceeded)
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, *SAVE_RUN), capsys)
    assert result.returncode == ft.EXIT_SAVE_FAILED
    (line,) = error_lines(result.stderr)
    assert f"checkpoint {out}/checkpoint-2 (Disk quota exceeded)" in line
    assert "no complete checkpoint exists yet" in line and "--overwrite" in line
    assert checkpoint_names(out) == [] and not list(out.glob(".tmp-*"))


# -----------------------------------------------------------------------------
# Damaged checkpoints on --resume


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    """64 random bytes in the middle of the file, the size unchanged: what a bad disk or copy does."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


DAMAGE = {
    "missing_weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors missing"),
    "missing_state": (lambda c: (c / "training_state.pt").unlink(), "training_state.pt missing"),
    "truncated_safetensors": (lambda c: truncate(c / "model.safetensors"),
                              "model.safetensors cannot be read (Error while deserializing header"),
    "empty_safetensors": (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors cannot be read"),
    "garbled_safetensors": (lambda c: garble(c / "model.safetensors"),
                            "model.safetensors does not match the checksum saved with it"),
    "truncated_state": (lambda c: truncate(c / "training_state.pt"), "training_state.pt cannot be read"),
    "garbled_state": (lambda c: garble(c / "training_state.pt"),
                      "training_state.pt does not match the checksums saved in it"),
    "garbled_config": (lambda c: (c / "config.json").write_text('{"model_type": "gp'),
                       "config.json is not readable JSON"),
}


def copy_run(src: Path, dst: Path, checkpoints=("checkpoint-4", "checkpoint-6")) -> Path:
    dst.mkdir(parents=True)
    for name in checkpoints:
        shutil.copytree(src / name, dst / name)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")
    return dst


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_refused_on_resume(tmp_path, six_steps, capsys, damage):
    out = copy_run(six_steps, tmp_path / "out")
    apply, what = DAMAGE[damage]
    apply(out / "checkpoint-6")
    result = run_main(ft.main, ["--output-dir", out, "--resume"], capsys)
    assert_clean_error(result, f"checkpoint {out}/checkpoint-6 is damaged: {what}",
                       "HINT: add --skip-damaged-checkpoints to continue from the newest good one, checkpoint-4")
    assert len(error_lines(result.stderr)) == 1
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-6"]  # nothing deleted, nothing trained
    # An explicit --resume of the damaged folder is refused too (where it has a training state).
    if damage != "missing_state":
        result = run_main(ft.main, ["--output-dir", out, "--resume", out / "checkpoint-6"], capsys)
        assert_clean_error(result, f"checkpoint {out}/checkpoint-6 is damaged: {what}")


def test_skip_damaged_checkpoints_falls_back_and_says_so(tmp_path, six_steps, capsys):
    out = copy_run(six_steps, tmp_path / "out", checkpoints=("checkpoint-2", "checkpoint-4", "checkpoint-6"))
    truncate(out / "checkpoint-6" / "model.safetensors")
    (out / "checkpoint-4" / "training_state.pt").unlink()
    result = run_main(ft.main, ["--output-dir", out, "--resume", "--skip-damaged-checkpoints"], capsys)
    assert result.returncode == 0, result.stderr
    assert f"checkpoint {out}/checkpoint-6 is damaged: model.safetensors cannot be read" in result.stderr
    assert f"checkpoint {out}/checkpoint-4 is damaged: training_state.pt missing; skipping it" in result.stderr
    assert f"resuming from {out}/checkpoint-2" in result.stderr
    assert_same_weights(six_steps, out)  # steps 3-6 redone from checkpoint-2: the same result
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):  # 4 and 6 rewritten whole
        assert_checkpoint_loads(out / name, full=False)
    # The flag is run control: it does not stick to the checkpoints for later resumes.
    assert torch.load(out / "checkpoint-6" / "training_state.pt", weights_only=True)["config"][
        "skip_damaged_checkpoints"] is True
    truncate(out / "checkpoint-6" / "model.safetensors")
    assert_clean_error(run_main(ft.main, ["--output-dir", out, "--resume"], capsys), "checkpoint-6 is damaged")


def test_skip_damaged_checkpoints_with_none_good(tmp_path, six_steps, capsys):
    out = copy_run(six_steps, tmp_path / "out")
    for name in ("checkpoint-4", "checkpoint-6"):
        garble(out / name / "training_state.pt")
    result = run_main(ft.main, ["--output-dir", out, "--resume"], capsys)
    assert_clean_error(result, "checkpoint-6 is damaged", "no older checkpoint loads either", "--overwrite")
    result = run_main(ft.main, ["--output-dir", out, "--resume", "--skip-damaged-checkpoints"], capsys)
    assert_clean_error(result, "checkpoint-6 is damaged", "and no older checkpoint in", "--overwrite")


def test_kill_between_the_renames_of_a_replace_restores_the_old_folder(tmp_path, six_steps, capsys):
    """publish_folder renames NAME aside, then the new one in: a kill in between leaves only the old one aside."""
    out = copy_run(six_steps, tmp_path / "out")
    os.replace(out / "checkpoint-6", out / ".tmp-old-checkpoint-6-4242")
    shutil.copytree(out / "checkpoint-4", out / ".tmp-checkpoint-6-4242")  # the unpublished new folder
    (out / ".tmp-pruned-checkpoint-2-4242").mkdir()  # a prune cut short
    assert checkpoint_names(out) == ["checkpoint-4"]  # a reader sees no half checkpoint
    remove_leftovers(out)  # what a new run (or a resume) does first
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "checkpoint-6", "metrics.jsonl"]
    assert_same_weights(six_steps / "checkpoint-6", out / "checkpoint-6")



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


# -----------------------------------------------------------------------------
# Resume after changing the data, the tokenizer or the model


@pytest.fixture
def resumable(tmp_path, six_steps) -> Path:
    return copy_run(six_steps, tmp_path / "out", checkpoints=("checkpoint-4",))


def test_resume_refused_after_train_bin_was_reprepared(resumable, tmp_path, tiny_data_dir, capsys):
    """Data prepared again from a shorter text: train.bin and meta.json both change."""
    data, meta = copy_data(tiny_data_dir, tmp_path / "data")
    tokens = meta["splits"]["train"]["tokens"] - 1000
    dtype = meta["dtype"]
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[: tokens * (2 if dtype == "uint16" else 4)])
    meta["splits"]["train"]["tokens"] = tokens
    (data / "meta.json").write_text(json.dumps(meta))
    result = run_main(ft.main, ["--output-dir", resumable, "--resume", "--data-dir", data], capsys)
    assert_clean_error(result, f"the data in {data} differs from the data the checkpoint was trained on",
                       "HINT: use the original data")


def test_resume_refused_after_train_bin_was_replaced(resumable, tmp_path, tiny_data_dir, capsys):
    """train.bin swapped for another file, meta.json left as it was."""
    data, _ = copy_data(tiny_data_dir, tmp_path / "data")
    with open(data / "train.bin", "ab") as f:
        f.write(b"\1\0" * 10)
    result = run_main(ft.main, ["--output-dir", resumable, "--resume", "--data-dir", data], capsys)
    assert_clean_error(result, f"{data}/train.bin holds", "truncated or from another run")


def test_resume_refused_after_train_bin_was_rewritten_in_place(resumable, tmp_path, tiny_data_dir, capsys):
    data, _ = copy_data(tiny_data_dir, tmp_path / "data")
    tokens = bytearray((data / "train.bin").read_bytes())
    tokens[:64] = bytes(64)
    (data / "train.bin").write_bytes(bytes(tokens))
    result = run_main(ft.main, ["--output-dir", resumable, "--resume", "--data-dir", data], capsys)
    assert_clean_error(result, "differs")


def test_resume_refused_after_data_was_tokenized_by_another_tokenizer(resumable, tmp_path, tiny_data_dir, capsys):
    data, meta = copy_data(tiny_data_dir, tmp_path / "data")
    meta["tokenizer"] = {"name_or_path": "other-tokenizer", "fingerprint": "0123456789abcdef"}
    (data / "meta.json").write_text(json.dumps(meta))
    result = run_main(ft.main, ["--output-dir", resumable, "--resume", "--data-dir", data], capsys)
    assert_clean_error(result, "2 problems", "the data was tokenized with 'other-tokenizer'",
                       f"the data in {data} differs")


def test_resume_refused_after_the_checkpoint_tokenizer_changed(resumable, capsys):
    from transformers import AutoTokenizer

    checkpoint = resumable / "checkpoint-4"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.add_tokens(["<|new-token|>"])
    tokenizer.save_pretrained(checkpoint)
    result = run_main(ft.main, ["--output-dir", resumable, "--resume"], capsys)
    assert_clean_error(result, "the tokenizer differs from the checkpoint's", "HINT: resume with the original --model")


def test_resume_refused_with_another_model(resumable, tmp_path, tiny_model_dir, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    result = run_main(ft.main, ["--output-dir", resumable, "--resume", "--model", other], capsys)
    assert_clean_error(result, f"--model {other} differs from the checkpoint's {tiny_model_dir}",
                       "HINT: drop the flag")
