"""The output folder of a run (finetune/core/outdir.py, finetune/train/rundir.py): --output-dir never deletes what the run
reads or what it did not write; one run at a time holds it (a lock that dies with its run); the printed resume
command works as printed, from anywhere."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.formats import checkpoints as ckpt
from finetune.train.rundir import lock_holder, resume_command
from helpers import (
    REPO_ROOT,
    assert_clean_error,
    base_args,
    catches,
    run_script,
    start,
    train_records,
    wait_for,
)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def my_model(tmp_path, tiny_model_dir) -> Path:
    model = tmp_path / "mymodel"
    shutil.copytree(tiny_model_dir, model)
    return model


def test_fine_tuning_in_place_with_overwrite_is_refused_and_keeps_the_base_model(my_model, tiny_data_dir):
    before = snapshot(my_model)
    result = run_script("finetune_generative.py", *base_args(my_model, tiny_data_dir, my_model), "--overwrite")
    assert_clean_error(result, "--output-dir", "is the --model folder", "HINT: choose an --output-dir outside")
    assert "--overwrite" not in result.stderr.split("HINT:")[1]  # the hint never leads to deleting it
    assert snapshot(my_model) == before


@pytest.mark.parametrize("where", ["inside", "around"])
def test_output_dir_inside_or_around_the_model_is_refused(my_model, tiny_data_dir, where):
    output = my_model / "finetuned" if where == "inside" else my_model.parent
    before = snapshot(my_model)
    result = run_script("finetune_generative.py", *base_args(my_model, tiny_data_dir, output), "--overwrite")
    assert_clean_error(result, "lies inside" if where == "inside" else "contains", "--model folder")
    assert snapshot(my_model) == before
    assert not (my_model / "finetuned").exists()


def test_output_dir_that_is_the_data_dir_is_refused(tmp_path, tiny_model_dir, tiny_data_dir):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    before = snapshot(data)
    result = run_script("finetune_generative.py", *base_args(tiny_model_dir, data, data), "--overwrite")
    assert_clean_error(result, "is the --data-dir folder")
    assert snapshot(data) == before


def test_overwrite_refuses_a_folder_no_run_of_ours_wrote(tmp_path, tiny_model_dir, tiny_data_dir):
    other = tmp_path / "someone-elses-model"
    shutil.copytree(tiny_model_dir, other)
    before = snapshot(other)
    result = run_script("finetune_generative.py", *base_args(tiny_model_dir, tiny_data_dir, other), "--overwrite")
    assert_clean_error(result, "--overwrite", "no sign of a run of this script")
    assert snapshot(other) == before


def test_overwrite_removes_only_what_our_run_wrote(tmp_path, tiny_model_dir, tiny_data_dir):
    import finetune_generative as ft

    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "2")
    assert ft.main(args) == 0  # in-process: no start-up cost
    assert (out / "train_config.json").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "keep.txt").write_text("mine too")
    assert ft.main([*args, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "extra" / "keep.txt").read_text() == "mine too"
    assert (out / "model.safetensors").is_file()


def test_a_lock_that_is_a_symlink_is_refused_on_resume_and_its_target_untouched(tmp_path, tiny_model_dir,
                                                                                tiny_data_dir, capsys):
    """A run folder received from elsewhere with `.lock -> ../notes.txt`: --resume used to open the lock with
    "a+", following the link, and replace the notes by its PID. Now the lock is refused in one line, and so is
    a new run into a folder holding only such a link."""
    import finetune_generative as ft
    from helpers import run_main

    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "2", "--save-every", "2")
    assert ft.main(args) == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    (out / ".lock").unlink()
    (out / ".lock").symlink_to("../notes.txt")
    before = snapshot(out)
    result = run_main(ft.main, [*args[:-2], "--resume"], capsys)  # the same run, continued
    assert_clean_error(result, f"{out / '.lock'} is a symbolic link", "HINT: remove")
    assert notes.read_text(encoding="utf-8") == "my notes\n" and snapshot(out) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".lock").symlink_to("../notes.txt")
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, fresh, "--max-steps", "2"), capsys)
    assert_clean_error(result, "is a symbolic link")
    assert notes.read_text(encoding="utf-8") == "my notes\n"
    assert [p.name for p in fresh.iterdir()] == [".lock"]


# -----------------------------------------------------------------------------
# Replacing best/, pruning checkpoints, --overwrite: never a file the run did not write


def write_files(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_replacing_best_moves_files_the_run_did_not_write_aside(tmp_path, caplog):
    """An export in best/ (the docs' own `export.py --model out/best` used to put it there) is moved to
    moved-aside/best/ with a warning when the next better evaluation replaces best/, not deleted with it."""
    from finetune.core.fsio import atomic_folder

    out = tmp_path / "out"
    best = write_files(out / "best", {"config.json": "old", "model.safetensors": "old", "model-f16.gguf": "export",
                                      "adapter/adapter_config.json": "old", "adapter/notes.txt": "mine"})
    with atomic_folder(best, "the best model") as tmp:
        write_files(tmp, {"config.json": "new", "model.safetensors": "new", "adapter/adapter_config.json": "new"})
    assert snapshot(best) == snapshot(write_files(tmp_path / "expected", {
        "config.json": "new", "model.safetensors": "new", "adapter/adapter_config.json": "new"}))
    aside = out / "moved-aside" / "best"
    assert (aside / "model-f16.gguf").read_text() == "export" and (aside / "adapter" / "notes.txt").read_text() == "mine"
    assert "held adapter/notes.txt, model-f16.gguf, which this run did not write" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["best", "moved-aside"]  # no .tmp- left


def test_pruning_moves_foreign_files_aside_and_only_unlinks_a_linked_checkpoint(tmp_path, caplog):
    from finetune.core.fsio import atomic_folder
    from finetune.formats.checkpoints import prune_checkpoints

    out = tmp_path / "out"
    elsewhere = write_files(tmp_path / "elsewhere", {"config.json": "theirs", "training_state.pt": "theirs"})
    out.mkdir()
    (out / "checkpoint-1").symlink_to(elsewhere, target_is_directory=True)
    ours = {"config.json": "c", "training_state.pt": "s"}
    write_files(out / "checkpoint-2", {**ours, "model-f16.gguf": "export"})
    write_files(out / "checkpoint-3", ours)
    prune_checkpoints(out, keep=1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "moved-aside"]  # no .tmp-pruned- left
    assert (out / "moved-aside" / "checkpoint-2" / "model-f16.gguf").read_text() == "export"
    assert snapshot(elsewhere) == snapshot(write_files(tmp_path / "expected", {"config.json": "theirs",
                                                                                "training_state.pt": "theirs"}))
    assert "removed the link, its target left as it is" in caplog.text
    # A LoRA release into the run folder replaces out/adapter/ the same way.
    write_files(out / "adapter", {"adapter_config.json": "old", "adapter-f16.gguf": "export"})
    with atomic_folder(out, "the final model", into=True) as tmp:
        write_files(tmp, {"config.json": "final", "adapter/adapter_config.json": "new"})
    assert (out / "adapter" / "adapter_config.json").read_text() == "new"
    assert (out / "moved-aside" / "adapter" / "adapter-f16.gguf").read_text() == "export"
    assert not list(out.glob(".tmp-*"))


def test_overwrite_with_checkpoint_and_best_linked_outside_the_run(tmp_path, tiny_model_dir, tiny_data_dir, capsys):
    """checkpoint-1 and best/ symlinked to folders outside the run: --overwrite used to end in `Cannot call rmtree
    on a symbolic link` and leave a .tmp-pruned- folder. Now the links go, their targets are untouched, and a
    file the run did not write in a real checkpoint is moved aside."""
    import finetune_generative as ft
    from helpers import run_main

    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "2", "--save-every", "1",
                     "--eval-every", "1")
    assert ft.main(args) == 0
    for name in ("checkpoint-1", "best"):
        shutil.move(out / name, tmp_path / f"elsewhere-{name}")
        (out / name).symlink_to(tmp_path / f"elsewhere-{name}", target_is_directory=True)
    (out / "checkpoint-2" / "notes.txt").write_text("mine")
    outside = {name: snapshot(tmp_path / f"elsewhere-{name}") for name in ("checkpoint-1", "best")}
    result = run_main(ft.main, [*args, "--overwrite"], capsys)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert {name: snapshot(tmp_path / f"elsewhere-{name}") for name in outside} == outside
    assert (out / "moved-aside" / "checkpoint-2" / "notes.txt").read_text() == "mine"
    assert not list(out.glob(".tmp-*")) and not (out / "best").is_symlink() and not (out / "checkpoint-1").is_symlink()


# -----------------------------------------------------------------------------
# One run at a time in an --output-dir; the printed resume command works as printed, from anywhere


def test_the_resume_command_of_several_processes_uses_this_interpreters_torchrun(tmp_path):
    script, out = tmp_path / "train.py", tmp_path / "my run"
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = shlex.quote(str(torchrun)) if torchrun.is_file() else f"{shlex.quote(sys.executable)} -m torch.distributed.run"
    assert resume_command(script, out, world_size=2) == (
        f"{launcher} --nproc_per_node=2 {shlex.quote(str(script))} --output-dir {shlex.quote(str(out))} --resume")
    assert resume_command(script, out, world_size=1).startswith(f"{shlex.quote(sys.executable)} ")



@pytest.mark.slow
def test_two_runs_started_together_into_one_output_dir(tmp_path, tiny_model_dir, tiny_data_dir):
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "3")
    runs = {p.pid: p for p in (start(args, tmp_path / "a.txt"), start(args, tmp_path / "b.txt"))}
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


@pytest.mark.slow
def test_resume_after_kill9_and_the_printed_command_from_another_directory(tmp_path, tiny_model_dir, tiny_data_dir):
    """--output-dir with a space and a quote, --data-dir and --model relative to the working directory."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tiny_data_dir, work / "data")
    out_name = "it's my run"
    args = base_args(os.path.relpath(tiny_model_dir, work), "data", out_name, "--max-steps", "20",
                     "--save-every", "2")
    out = work / out_name

    killed = start(args, tmp_path / "killed.txt", cwd=work)
    wait_for(lambda: (out / "checkpoint-2").is_dir() or killed.poll() is not None, "checkpoint-2")
    killed.kill()  # kill -9
    killed.wait(timeout=60)
    assert (out / ".lock").read_text().strip() == str(killed.pid)  # the file stays; its lock died with the run
    assert lock_holder(out) is None

    resumed = start(["--output-dir", out_name, "--resume"], tmp_path / "resumed.txt", cwd=work)
    wait_for(lambda: catches(resumed.pid, signal.SIGTERM) or resumed.poll() is not None, "the SIGTERM handler")
    resumed.send_signal(signal.SIGTERM)
    assert resumed.wait(timeout=180) == 143, (tmp_path / "resumed.txt").read_text()
    err = (tmp_path / "resumed.txt").read_text()
    assert "in use" not in err  # the killed run's lock file did not block it
    after = err.split("continue with:\n")[1].splitlines()
    command = after[0].strip()
    assert after[1:] == [], after  # the resume command is the last line, no progress line after it
    # the interpreter that ran, so it works where its venv is not active (PATH has no venv below)
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
