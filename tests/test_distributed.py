"""torchrun on CPU (gloo): two processes train exactly like one process with the same global batch."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import finetune_generative as ft
from finetune.formats import checkpoints as ckpt
from finetune.runtime import launcher
from helpers import (
    REPO_ROOT,
    assert_clean_error,
    assert_one_line_error,
    assert_same_weights,
    base_args,
    common_args,
    newest_step,
    run_main,
    run_script,
    start,
    torchrun,
    train_records,
    wait_for_step,
)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("ddp") / "out"
    result = torchrun(2, *common_args(tiny_model_dir, tiny_data_dir, out, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run, tmp_path,
                                                                    tiny_model_dir, tiny_data_dir):
    single = tmp_path / "single"
    # 2 processes x batch 4 == 1 process x batch 8; grad-accum 2 in both. The validation blocks do not depend
    # on the number of processes: 2 x batch 4 read the default 8 batches of 4 = 32 blocks of the 37 (split
    # across the ranks, 16 each); one process reads the same 32 as 4 batches of 8.
    assert ft.main(common_args(tiny_model_dir, tiny_data_dir, single, 8, "--eval-batches", "4")) == 0
    ddp_train, single_train = train_records(two_process_run), train_records(single)
    assert [r["step"] for r in ddp_train] == [r["step"] for r in single_train]
    assert [r["tokens"] for r in ddp_train] == [r["tokens"] for r in single_train]
    for a, b in zip(ddp_train, single_train):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    # Validation is sharded across ranks and summed: it must equal the one-process pass.
    for a, b in zip(train_records(two_process_run, "eval"), train_records(single, "eval")):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    state = torch.load(next(two_process_run.glob("checkpoint-*")) / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_resume_across_processes_is_exact(two_process_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(two_process_run / "checkpoint-4", out / "checkpoint-4")
    result = torchrun(2, "--output-dir", out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    after_resume = [r for r in train_records(two_process_run) if r["step"] > 4]
    assert [r["step"] for r in train_records(out)] == [r["step"] for r in after_resume]
    assert [r["loss"] for r in train_records(out)] == pytest.approx([r["loss"] for r in after_resume], abs=1e-6)
    assert_same_weights(two_process_run, out)


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(two_process_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(two_process_run / "checkpoint-4", out / "checkpoint-4")
    result = run_script("finetune_generative.py", "--output-dir", out, "--resume")
    assert_clean_error(result, "written by 2 process(es)", "--nproc_per_node=2")


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_all_ranks_with_one_checkpoint(tmp_path, tiny_model_dir, tiny_data_dir):
    import time

    import psutil

    out = tmp_path / "out"
    args = [*common_args(tiny_model_dir, tiny_data_dir, out, 4), "--epochs", "30", "--save-every", "0",
            "--eval-every", "0", "--lr", "1e-4"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO_ROOT / "finetune_generative.py"), *map(str, args)],
        # Output to a file, not a pipe: a full pipe nobody reads would block the workers.
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"),
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 10):
        time.sleep(0.05)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].send_signal(15)  # SIGTERM to rank 1 only
    launcher.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, err[-2000:]
    step = ckpt.checkpoint_step(checkpoints[0])
    assert step == train_records(out)[-1]["step"] < 30 * 11
    assert "--resume" in err
    state = ckpt.load_training_state(checkpoints[0])
    assert state["step"] == step and len(state["rng"]) == 2


@pytest.mark.slow
def test_nproc_starts_the_processes_and_a_sigterm_ends_with_our_exit_code_not_a_traceback(
        tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    """`--nproc 2` without torchrun: this command starts the 2 processes (launcher.py). A SIGTERM to it mid-run
    stops both after one checkpoint, and it exits 143 with a line of ours, not torchrun's SignalException
    traceback; it sets OMP_NUM_THREADS itself (one line, not torchrun's banner); the resume command it prints
    continues with --nproc 2 to the end."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--batch-size", "4", "--grad-accum", "1", "--max-steps", "60",
                     "--save-every", "2", "--nproc", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the launcher chooses it
    proc = start(args, log)
    assert wait_for_step(proc, out, 2), log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    err = log.read_text()
    assert "Traceback" not in err and "SignalException" not in err and "*****" not in err, err[-3000:]
    threads, _ = launcher.thread_count(2, {})
    assert f"starting 2 processes on this machine (torch.distributed, as torchrun would); OMP_NUM_THREADS={threads} " \
           "each (" in err.splitlines()[0]
    assert err.splitlines()[-1].endswith(" SIGTERM: passed on to the 2 processes; all have stopped (exit code 143)")
    step = newest_step(out)
    assert 2 < step < 60 and step == train_records(out)[-1]["step"]
    resume = err.splitlines()[err.splitlines().index(next(t for t in err.splitlines() if "continue with:" in t)) + 1]
    assert shlex.split(resume) == [sys.executable, str(REPO_ROOT / "finetune_generative.py"), "--nproc", "2",
                                   "--output-dir", str(out), "--resume"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script("finetune_generative.py", *shlex.split(resume)[2:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OMP_NUM_THREADS=1 each (from the environment)" in result.stderr and "Traceback" not in result.stderr
    assert [r["step"] for r in train_records(out)] == list(range(1, 61))


def test_nproc_under_torchrun_must_be_its_number_and_each_gpu_takes_one_process(tmp_path, tiny_model_dir,
                                                                              tiny_data_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, tmp_path / "out", "--nproc", "4"), capsys)
    assert_one_line_error(result, "--nproc 4 under torchrun, which started 2 process(es)", "drop --nproc")
    assert not (tmp_path / "out").exists()
    assert launcher.device_problems(4, "auto", cuda_devices=2) == [
        "--nproc 4 processes need 4 GPUs, one each, and this machine has 2. HINT: --nproc 2, or --device cpu"]
    assert launcher.device_problems(4, "cpu", 2) == launcher.device_problems(2, "cuda", 2) == []
    assert launcher.device_problems(4, "auto", cuda_devices=0) == []  # no GPU: gloo on the CPU


@pytest.mark.slow
def test_kill9_of_one_nproc_process_is_one_line_from_each_side_not_a_traceback(tmp_path, tiny_model_dir, tiny_data_dir):
    """kill -9 of one of `--nproc 2`'s processes: the survivor, blocked in a collective, says in one line that it
    lost the others, and the launcher says which process was killed; no gloo traceback (issue 27, 12)."""
    import psutil

    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--batch-size", "2", "--grad-accum", "1", "--max-steps", "3000",
                     "--save-every", "2", "--nproc", "2")
    proc = start(args, log)
    assert wait_for_step(proc, out, 2), log.read_text()[-3000:]
    (rank1,) = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    rank1.kill()
    assert proc.wait(timeout=120) == 137, log.read_text()[-3000:]
    err = log.read_text()
    assert "Traceback" not in err and "[rank0]:" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors[-1].startswith("error: process 1 of 2 was killed by SIGKILL, and the others were stopped. HINT:")
    assert len(errors) <= 2 and all("HINT:" in line for line in errors), errors
    if len(errors) == 2:  # rank 0 was in a collective when its peer died (else the launcher stopped it first)
        assert errors[0].startswith("error: process 0 lost the other processes of the run (")
    assert ckpt.list_checkpoints(out)  # what was saved is there to resume from
