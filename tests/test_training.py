"""finetune/train/training.py, the run object the loop works with: a stop request (SIGTERM, Ctrl-C) during an
evaluation takes effect within one batch and says what happened (before step 1: nothing to resume, the same
command starts again; after it: saved at once); the final model, best/ and the checkpoint of the same step store
identical weights once; a failed save of best/ is never logged as saved."""
from __future__ import annotations

import errno
import json
import os
import signal

import pytest

import finetune_generative as ft
from finetune.data.dataset import load_meta
from helpers import (
    BLOCK,
    REPO_ROOT,
    base_args,
    checkpoint_names,
    error_lines,
    run_main,
    start,
    train_records,
    wait_for,
)

# -----------------------------------------------------------------------------
# A stop request during an evaluation


class SignalDuringEvaluation:
    """Sends a real SIGTERM to this process after the `after`-th validation batch of the `nth` evaluation,
    and counts the validation batches computed after it (the evaluation's loss is finetune.train.loss's)."""

    def __init__(self, monkeypatch, nth: int, after: int = 2):
        from finetune.train import loss

        self.evaluations, self.batches, self.after_signal, self.sent = 0, 0, 0, False
        real_loss, real_evaluate = loss.next_token_loss, loss.evaluate

        def evaluate(*args, **kwargs):
            self.evaluations += 1
            self.batches = 0
            return real_evaluate(*args, **kwargs)

        def next_token_loss(logits, input_ids, *args, **kwargs):
            self.batches += 1
            self.after_signal += self.sent
            if self.evaluations == nth and self.batches == after and not self.sent:
                self.sent = True
                signal.raise_signal(signal.SIGTERM)  # StopRequest's handler: the run's own
            return real_loss(logits, input_ids, *args, **kwargs)

        monkeypatch.setattr(loss, "next_token_loss", next_token_loss)
        from finetune.train import training
        monkeypatch.setattr(training, "evaluate", evaluate)


@pytest.mark.parametrize("nth", [1, 2], ids=["step-0 evaluation", "step-2 evaluation"])
def test_a_stop_during_an_evaluation_takes_effect_within_one_batch(nth, tmp_path, tiny_model_dir, tiny_data_dir,
                                                                   monkeypatch, capsys):
    out = tmp_path / "out"
    val_blocks = load_meta(tiny_data_dir)["splits"]["val"]["tokens"] // BLOCK
    assert val_blocks >= 10  # many batches of 1 block: an evaluation that ran to its end would show
    with monkeypatch.context() as patch:
        stop = SignalDuringEvaluation(patch, nth=nth)
        result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "4", "--eval-every", "2",
                                    "--eval-batches", "0", "--batch-size", "1", "--grad-accum", "1"), capsys)
    assert stop.sent and stop.after_signal == 0, stop.after_signal  # not one validation batch after the signal
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    evals = [r for r in map(json.loads, lines) if r["kind"] == "eval"]
    if nth == 1:  # before the first step: nothing to save, the run says so
        assert "stopped before the first training step" in result.stderr
        assert checkpoint_names(out) == [] and evals == []
    else:  # after it: saved at once, the cut-short evaluation not recorded
        assert "stopped at step 2; continue with" in result.stderr
        assert checkpoint_names(out) == ["checkpoint-2"] and [r["step"] for r in evals] == [0]



SLOW_STEP0 = f"""
import sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
import finetune.train.training as training
evaluate = training.evaluate
def slow_evaluate(*args, **kwargs):  # held until the signal has arrived during the step-0 evaluation
    print("evaluating", file=sys.stderr, flush=True)
    stopped, deadline = kwargs.get("should_stop"), time.monotonic() + 120
    while stopped is not None and not stopped() and time.monotonic() < deadline:
        time.sleep(0.05)
    return evaluate(*args, **kwargs)
training.evaluate = slow_evaluate
import finetune_generative
sys.exit(finetune_generative.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_signal_during_the_step0_evaluation_says_what_happened(tmp_path, tiny_model_dir, tiny_data_dir):
    runs = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        args = base_args(tiny_model_dir, tiny_data_dir, tmp_path / signum.name, "--max-steps", "2")
        runs[signum] = (start(args, tmp_path / f"{signum.name}.txt", script=SLOW_STEP0), args)
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
    # the start-up files left (train_config.json, metrics.jsonl) are no earlier run: the same
    # command starts again in their place, without --overwrite
    out = tmp_path / "SIGTERM"
    assert {".lock", "train_config.json"} <= {p.name for p in out.iterdir()} <= {".lock", "metrics.jsonl",
                                                                               "train_config.json"}
    assert ft.main(runs[signal.SIGTERM][1]) == 0
    assert [r["step"] for r in train_records(out)] == [1, 2]
    assert [r["step"] for r in train_records(out, "eval")] == [0, 2]  # step 0 once: the stopped run's is gone


# -----------------------------------------------------------------------------
# Identical weights stored once; best/ logged as saved only once it is


def test_the_final_model_best_and_the_last_checkpoint_share_their_weights(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                          capsys):
    from finetune.core.fsio import stored_bytes

    out = tmp_path / "out"
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "4"), capsys)  # evals at 0, 4
    assert result.returncode == 0, result.stderr
    final, checkpoint, best = out / "model.safetensors", out / "checkpoint-4" / "model.safetensors", \
        out / "best" / "model.safetensors"
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4] and evals[1]["val_loss"] < evals[0]["val_loss"]  # best/ is step 4
    assert final.samefile(checkpoint) and final.samefile(best) and final.stat().st_nlink == 3
    size = final.stat().st_size
    assert stored_bytes(out) < sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) - 2 * size + 1
    assert f"{out} holds {stored_bytes(out) / 1e6:.1f} MB (identical files stored once)" in result.stderr


def test_a_failed_save_of_best_is_never_logged_as_saved(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    """The log used to say "(best so far, saved to best/)" one line before the save of best/ failed on a full disk;
    the line now comes after the save, and says it failed when it did."""
    from finetune.models.loading import ModelFiles

    def full_disk(self, model, folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ModelFiles, "write_release", full_disk)
    out = tmp_path / "out"
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "2", "--eval-every", "2"),
                      capsys)
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
    assert "saved to best/" not in result.stderr
    lines = result.stderr.splitlines()
    failed = next(i for i, line in enumerate(lines) if "step 2: val loss" in line)
    assert lines[failed].endswith("(best so far; saving it to best/ failed)"), lines[failed]
    (error,) = error_lines(result.stderr)
    assert f"could not save the best model {out}/best (No space left on device)" in error
    assert not (out / "best").exists() and not list(out.glob(".tmp-*"))
