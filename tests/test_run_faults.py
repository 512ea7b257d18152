"""Issue 23 (defects3): what a run holds on to while it runs, and what it says when a fault hits.

- the token files a run fingerprinted are the ones it trains on, even if prepare_data.py replaces them
  while the model loads; a file rewritten in place under the run stops it with one line (item 14);
- the output disk filling mid-run: metrics.jsonl gets one warning, the checkpoint exit 4 with the last one
  intact; MLflow on a filling disk one warning; an MLflow server that does not answer: exit 2 in seconds,
  before anything loads (item 15);
- generate.py --num-samples N generates in batches, streamed to the output (item 16b);
- a stop request during an evaluation takes effect within one batch: exit before step 1, save after (item 2);
- the validation blocks are the same whatever the number of processes (item 4; end to end in
  tests/test_distributed.py);
- the final model, best/ and the checkpoint of the same step store identical weights once (item 7);
- --precision auto on a CPU with bf16 instructions picks bf16 only where a matmul probe shows it faster,
  remembered in the cache (item 11).
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import finetune_generative as ft
from finetune import metrics
from finetune.config import TrainConfig
from finetune.data import DataError, TextDataset, data_fingerprint, load_meta
from helpers import SAVE_RUN, assert_clean_error, base_args, checkpoint_names, error_lines, run_main

BLOCK = 32


def copy_data(tiny_data_dir: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(tiny_data_dir, dst)
    return dst, load_meta(dst)


def replace_like_prepare_data(path: Path, content: bytes) -> None:
    """prepare_data.py --overwrite writes a new file aside and renames it into place (a new inode)."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def test_the_run_trains_on_the_files_it_fingerprinted_when_they_are_replaced(tmp_path, tiny_data_dir, caplog):
    data, meta = copy_data(tiny_data_dir, tmp_path / "data")
    original = np.fromfile(data / "train.bin", dtype=meta["dtype"])
    data_fingerprint(meta, data)  # what the run does before the weights load
    # ... then prepare_data.py --overwrite, while the model loads: same size, other tokens.
    replace_like_prepare_data(data / "train.bin", (original[::-1]).tobytes())
    dataset = TextDataset.from_data_dir(data, "train", BLOCK, meta)
    blocks = len(original) // BLOCK
    assert len(dataset) == blocks
    assert np.array_equal(dataset[3]["input_ids"].numpy(), original[3 * BLOCK: 4 * BLOCK])
    # A DataLoader worker process (forked) reads the same held file, not the path.
    loader = DataLoader(dataset, batch_size=blocks, num_workers=1)
    (batch,) = list(loader)
    assert np.array_equal(batch["input_ids"].numpy().ravel(), original[: blocks * BLOCK])
    assert any("train.bin was replaced since this run fingerprinted it" in r.message for r in caplog.records)


def test_a_token_file_rewritten_in_place_under_the_run_stops_it(tmp_path, tiny_data_dir):
    data, meta = copy_data(tiny_data_dir, tmp_path / "data")
    data_fingerprint(meta, data)
    with open(data / "val.bin", "r+b") as f:  # same inode, other bytes
        f.write(bytes(64))
    os.utime(data / "val.bin", ns=(1, 1))  # a modification time that differs even on coarse clocks
    with pytest.raises(DataError, match=r"val.bin was rewritten since this run fingerprinted it.*HINT: let "
                                        r"prepare_data.py finish"):
        TextDataset.from_data_dir(data, "val", BLOCK, meta)
    assert json.loads((data / "meta.json").read_text()) == meta  # nothing on disk touched


# -----------------------------------------------------------------------------
# Item 15: the output disk filling mid-run, trackers that fail


class FillingDisk:
    """The output disk is full from the `full_from`-th metrics.jsonl append on: that append and every
    checkpoint written after it fail as a full disk fails (ENOSPC)."""

    def __init__(self, monkeypatch, full_from: int):
        self.appends, self.full_from = 0, full_from
        real_save = torch.save

        def open_metrics(path, *args, **kwargs):
            if Path(path).name == "metrics.jsonl":
                self.appends += 1
                if self.full:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return open(path, *args, **kwargs)

        def save(*args, **kwargs):
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(*args, **kwargs)

        monkeypatch.setattr(metrics, "open", open_metrics, raising=False)
        monkeypatch.setattr(torch, "save", save)

    @property
    def full(self) -> bool:
        return self.appends >= self.full_from


def test_disk_full_mid_run_warns_once_for_metrics_and_stops_at_the_checkpoint(tmp_path, tiny_model_dir,
                                                                            tiny_data_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        FillingDisk(patch, full_from=4)  # eval 0, train 1, train 2 written; full from train 3 on
        result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, *SAVE_RUN), capsys)
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "could not append to" in line]
    assert len(warnings) == 1 and f"{out}/metrics.jsonl (No space left on device)" in warnings[0], result.stderr
    (line,) = error_lines(result.stderr)
    assert f"could not save checkpoint {out}/checkpoint-4 (No space left on device)" in line
    assert f"{out}/checkpoint-2, is intact" in line
    assert checkpoint_names(out) == ["checkpoint-2"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [(r["kind"], r["step"]) for r in map(json.loads, lines)] == [("eval", 0), ("train", 1), ("train", 2)]


def test_lines_held_back_by_a_full_disk_are_written_when_there_is_room(tmp_path, monkeypatch, caplog):
    path = tmp_path / "metrics.jsonl"
    disk = FillingDisk(monkeypatch, full_from=2)
    metrics.append_jsonl(path, {"step": 1})
    metrics.append_jsonl(path, {"step": 2})  # full: held back
    metrics.append_jsonl(path, {"step": 3})  # still full: no second warning
    disk.full_from = 10**9  # room again
    metrics.append_jsonl(path, {"step": 4})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert sum("could not append to" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(not os.environ.get("FINETUNE_SLOW_TESTS"), reason="creating an MLflow database takes ~30 s "
                    "on 2 busy cores; FINETUNE_SLOW_TESTS=1 runs it")
def test_mlflow_on_a_full_disk_is_one_warning(tmp_path, capfd):
    """A real full disk for the MLflow database (RLIMIT_FSIZE: writes beyond the size fail), in-process."""
    pytest.importorskip("mlflow")
    from finetune.trackers import MLflow, Trackers

    trackers = Trackers([MLflow(tmp_path, {"lr": 1.0}, 0, None)])
    capfd.readouterr()
    size = (tmp_path / "mlflow.db").stat().st_size
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        for step in range(1, 200):
            trackers.log({"kind": "train", "step": step, "loss": 1.0 / step, "some_metric_with_a_long_name": step})
            if not trackers.active:
                break
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    trackers.close()
    err = capfd.readouterr().err
    assert not trackers.active
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert "--report-to mlflow: logging step" in line and "reporting to it stops here" in line, err


def test_an_mlflow_server_that_does_not_answer_is_refused_in_seconds(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                     monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:  # not importorskip: importing mlflow costs seconds
        pytest.skip("mlflow is not installed")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--report-to", "mlflow"), capsys)
    assert time.monotonic() - started < 10
    assert_clean_error(result, "--report-to mlflow: the tracking server MLFLOW_TRACKING_URI=http://127.0.0.1:9 "
                               "does not answer", "HINT: start it")
    assert not out.exists()  # refused before anything was loaded or written


# -----------------------------------------------------------------------------
# Item 16b: many samples, in batches


def test_many_samples_are_generated_in_batches_and_streamed(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import generate

    calls = []
    real_generate_samples = generate.generate_samples

    def counting(*args, num_samples, **kwargs):
        calls.append(num_samples)
        return real_generate_samples(*args, num_samples=num_samples, **kwargs)

    monkeypatch.setattr(generate, "generate_samples", counting)
    monkeypatch.setattr(generate, "SAMPLES_PER_BATCH", 2, raising=False)
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32", "--prompt", "The sea",
              "--max-new-tokens", "6", "--seed", "3"]
    assert generate.main([*common, "--num-samples", "5", "--output", str(tmp_path / "five.jsonl")]) == 0
    assert calls == [2, 2, 1]  # never more rows at once than a batch
    five = [json.loads(line) for line in (tmp_path / "five.jsonl").read_text().splitlines()]
    assert [r["sample_index"] for r in five] == [0, 1, 2, 3, 4]
    assert capsys.readouterr().out.count("--- sample ") == 5
    # The first batch is what one generate call seeded with --seed gives: the samples of --num-samples 2.
    assert generate.main([*common, "--num-samples", "2", "--output", str(tmp_path / "two.jsonl")]) == 0
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["text"] for r in two] == [r["text"] for r in five[:2]]
    assert len({r["text"] for r in five}) > 2  # later batches are not copies of the first


# -----------------------------------------------------------------------------
# Item 2: a stop request during an evaluation


class SignalDuringEvaluation:
    """Sends a real SIGTERM to this process after the `after`-th validation batch of the `nth` evaluation,
    and counts the validation batches computed after it (the evaluation's loss is finetune.loss's)."""

    def __init__(self, monkeypatch, nth: int, after: int = 2):
        from finetune import loss

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
        from finetune import training
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


# -----------------------------------------------------------------------------
# Item 4: the validation set and the number of processes


@pytest.mark.parametrize("eval_batches, blocks", [(None, 32), (3, 12), (0, 100)], ids=["default", "3", "all"])
def test_the_validation_blocks_do_not_depend_on_the_number_of_processes(eval_batches, blocks):
    from dataclasses import replace

    from finetune.data import validation_blocks
    from finetune.plan import eval_blocks, make_plan

    cfg = replace(TrainConfig(batch_size=4, grad_accum=2, epochs=1, eval_every=4), eval_batches=eval_batches)
    meta = {"splits": {"train": {"tokens": 352 * BLOCK}, "val": {"tokens": 100 * BLOCK}}}
    chosen = {}
    for world_size in (1, 2, 3):
        plan = make_plan(cfg, meta, BLOCK, world_size)
        shares = [validation_blocks(plan.val_blocks, eval_blocks(cfg, plan), rank, world_size)
                  for rank in range(world_size)]
        union = sorted(block for share in shares for block in share)
        assert len(union) == len(set(union)) == blocks  # disjoint shares, the size asked
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        chosen[world_size] = union
    assert chosen[1] == chosen[2] == chosen[3]


# -----------------------------------------------------------------------------
# Item 7: identical weights stored once


def test_the_final_model_best_and_the_last_checkpoint_share_their_weights(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                          capsys):
    from finetune.fsio import stored_bytes

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


# -----------------------------------------------------------------------------
# Item 11: --precision auto on a CPU measures before it picks bf16


def test_precision_auto_on_a_bf16_cpu_measures_and_remembers(tmp_path, monkeypatch, caplog):
    import logging

    from finetune import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # the CPU flag says bf16 (avx512_bf16)
    monkeypatch.setattr(runtime, "PROBE_SECONDS", 0.02, raising=False)
    log = logging.getLogger("finetune.test-precision")
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=log.name):
        choice = runtime.resolve_precision("auto", cpu, hidden_size=64, log=log)
    cache = tmp_path / "xdg-cache" / "finetune" / "cpu-precision.json"
    ((key, measured),) = json.loads(cache.read_text()).items()
    assert "hidden 64" in key and f"torch {torch.__version__}" in key
    assert choice == ("bf16" if measured["bf16"] > 1.1 * measured["fp32"] else "fp32")
    assert f"runs at {measured['bf16']:.0f} GFLOP/s in bf16, {measured['fp32']:.0f} in fp32: {choice}" in caplog.text

    def measuring_again(*args):
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(runtime, "matmul_gflops", measuring_again)
    for figures, expected in (({"fp32": 293.0, "bf16": 164.0}, "fp32"), ({"fp32": 100.0, "bf16": 400.0}, "bf16")):
        cache.write_text(json.dumps({key: figures}))
        assert runtime.resolve_precision("auto", cpu, hidden_size=64, log=log) == expected
    assert runtime.resolve_precision("bf16", cpu) == "bf16"  # asked for: no probe


def test_a_failed_save_of_best_is_never_logged_as_saved(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    """The log used to say "(best so far, saved to best/)" one line before the save of best/ failed on a full disk;
    the line now comes after the save, and says it failed when it did."""
    from finetune.models import ModelFiles

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
