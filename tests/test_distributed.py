"""torchrun on CPU (gloo): two processes train exactly like one process with the same global batch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import finetune_generative as ft
from finetune import checkpoints as ckpt
from helpers import (
    REPO_ROOT,
    assert_clean_error,
    assert_same_weights,
    common_args,
    run_script,
    torchrun,
    train_records,
)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("ddp") / "out"
    result = torchrun(2, *common_args(tiny_model_dir, tiny_data_dir, out, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


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


def test_resume_with_another_world_size_is_refused(two_process_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(two_process_run / "checkpoint-4", out / "checkpoint-4")
    result = run_script("finetune_generative.py", "--output-dir", out, "--resume")
    assert_clean_error(result, "written by 2 process(es)", "--nproc_per_node=2")


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
