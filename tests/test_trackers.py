"""--report-to (finetune/train/trackers.py) and the progress display when stderr is a file (finetune/core/console.py).

- a --report-to tensorboard,mlflow run stopped by a real SIGTERM and resumed (then resumed again from an
  earlier checkpoint): the scalars read back with TensorBoard's EventAccumulator and MLflow's client equal
  metrics.jsonl step for step, each step once (MLflow cannot delete points: after the resume from the earlier
  checkpoint it is told to warn instead);
- its stderr, a file, holds plain progress lines and no carriage return;
- trackio: every record at its step, read back from its SQLite store; a resume continues the same run;
- W&B offline: a resume continues the same run id;
- a tracker that fails mid-run is switched off with one warning; training and metrics.jsonl go on;
- asking for a tracker whose package is missing (or that does not exist) is one error line, nothing written.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune_generative as ft
from finetune.core import console
from finetune.train import trackers
from helpers import REPO_ROOT, base_args, error_lines, run_main

TRACKED = ["--max-steps", "20", "--save-every", "5", "--lr", "1e-4", "--sample-prompt", "The ship",
           "--sample-max-new-tokens", "8"]


def metrics_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the trackers get it: tag -> [(step, value)] in file order."""
    found = {}
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if record["kind"] not in trackers.TRACKED_KINDS:  # a resume's record marks loss.png only
            continue
        for tag, value in trackers.scalars(record).items():
            found.setdefault(tag, []).append((record["step"], value))
    return found


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tensorboard_samples(log_dir: Path) -> list[tuple[int, str]]:
    """The text as TensorBoard's server reads it (the plugin accumulator purges text too; the other does not)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("samples/text_summary")]


def mlflow_scalars(out: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def assert_same_scalars(tracked: dict, expected: dict, rel: float) -> None:
    assert sorted(tracked) == sorted(expected)
    for tag, points in expected.items():
        steps = [step for step, _ in tracked[tag]]
        assert steps == [step for step, _ in points], tag  # step for step, each once
        assert [v for _, v in tracked[tag]] == pytest.approx([v for _, v in points], rel=rel), tag


def tracker_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "training_state.pt", weights_only=True)["trackers"]


@pytest.mark.slow
def test_tensorboard_and_mlflow_continue_across_sigterm_and_resume(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                   capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # our default: a SQLite file in --output-dir
    out = tmp_path / "out"
    stderr_file = tmp_path / "stderr.txt"
    with open(stderr_file, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "finetune_generative.py"),
                                 *base_args(tiny_model_dir, tiny_data_dir, out, *TRACKED),
                                 "--report-to", "tensorboard,mlflow"], stdout=subprocess.DEVNULL, stderr=stderr)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 8):  # step 0 eval + 7 steps
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, stderr_file.read_text()
    stopped_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert 5 < stopped_at < 20, "SIGTERM arrived too late; make the run longer"

    # stderr went to a file: plain progress lines, no redraws.
    err = stderr_file.read_text()
    assert err.count("\r") == 0
    assert "step 1/20 (5%), loss " in err and ", ETA " in err

    state = tracker_state(out / f"checkpoint-{stopped_at}")
    assert sorted(state) == ["mlflow", "tensorboard"]
    run_id = state["mlflow"]["run_id"]
    assert ft.main(["--output-dir", str(out), "--resume"]) == 0  # keeps --report-to from the checkpoint
    assert tracker_state(out / "checkpoint-20") == state  # the same TensorBoard dir and MLflow run
    expected = metrics_scalars(out)
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 21))
    assert [s for s, _ in expected["eval/val_loss"]] == [0, 20]
    assert_same_scalars(tensorboard_scalars(out / "tensorboard"), expected, rel=1e-6)  # float32 there
    assert_same_scalars(mlflow_scalars(out, run_id), expected, rel=1e-12)

    # Resumed from an earlier checkpoint: TensorBoard drops steps 16..20 of the run before (purge_step).
    capsys.readouterr()
    assert ft.main(["--output-dir", str(out), "--resume", str(out / "checkpoint-15")]) == 0
    assert_same_scalars(tensorboard_scalars(out / "tensorboard"), metrics_scalars(out), rel=1e-6)
    assert "MLflow run " + run_id + " already holds 5 train/loss point(s) after step 15" in capsys.readouterr().err
    # The samples as text: TensorBoard (once per step) and MLflow artifacts, as in samples.jsonl.
    samples = {r["step"]: r["text"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    assert tensorboard_samples(out / "tensorboard") == [(step, f"```\n{samples[step]}\n```") for step in (0, 20)]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    downloaded = client.download_artifacts(run_id, "samples/step-000020.txt", str(tmp_path))
    assert Path(downloaded).read_text() == samples[20]


def test_wandb_offline_resume_continues_the_same_run(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # our default: offline
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "6", "--save-every", "3",
                     "--report-to", "wandb")
    assert ft.main(args) == 0
    run_id = tracker_state(out / "checkpoint-3")["wandb"]["run_id"]
    assert ft.main(["--output-dir", str(out), "--resume", str(out / "checkpoint-3")]) == 0
    assert tracker_state(out / "checkpoint-6") == {"wandb": {"run_id": run_id}}
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + run_id) for r in runs)  # `wandb sync` joins them
    for run in runs:  # wandb 0.31 has no Python reader of its .wandb log; the metric names are in it
        assert b"train/loss" in next(run.glob("*.wandb")).read_bytes()


def test_trackio_gets_every_record_and_a_resume_continues_its_run(tmp_path, tiny_model_dir, tiny_data_dir,
                                                                  monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "6", "--save-every", "3",
                             "--report-to", "trackio")) == 0
    run_name = tracker_state(out / "checkpoint-3")["trackio"]["run_name"]
    assert ft.main(["--output-dir", str(out), "--resume", str(out / "checkpoint-3")]) == 0
    assert tracker_state(out / "checkpoint-6") == {"trackio": {"run_name": run_name}}
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("finetune").count(run_name) == 1  # continued, not a second run
    logged = [(row["step"], {k: v for k, v in row.items() if "/" in k}) for row in
              SQLiteStorage.get_logs("finetune", run_name)]
    records = [(r["step"], trackers.scalars(r)) for r in
               map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] in trackers.TRACKED_KINDS]
    # Every record at its step. trackio cannot delete points: steps 4..6 of the run resumed from stay (README).
    assert [step for step, _ in logged] == [0, 1, 2, 3, 4, 5, 6, 6] + [4, 5, 6, 6]
    assert logged[:4] + logged[8:] == records


def test_a_failing_tracker_does_not_stop_training(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    log_scalars = trackers.TensorBoard.log

    def failing_log(self, record):
        if record["step"] >= 3:
            raise OSError(28, "No space left on device")
        log_scalars(self, record)

    monkeypatch.setattr(trackers.TensorBoard, "log", failing_log)
    out = tmp_path / "out"
    assert ft.main(base_args(tiny_model_dir, tiny_data_dir, out, "--max-steps", "6", "--report-to",
                             "tensorboard")) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "--report-to tensorboard: logging step 3 failed" in line]
    assert len(warnings) == 1 and err.count("failed (OSError") == 1, err
    assert [s for s, _ in metrics_scalars(out)["train/loss"]] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl goes on
    assert [s for s, _ in tensorboard_scalars(out / "tensorboard")["train/loss"]] == [1, 2]
    assert (out / "model.safetensors").is_file()
    # The switched-off tracker's run is kept in the state, so a resume continues it.
    assert tracker_state(out / "checkpoint-6") == {"tensorboard": {"log_dir": "tensorboard"}}


def test_missing_or_unknown_tracker_is_one_error_line(tmp_path, tiny_model_dir, tiny_data_dir, monkeypatch,
                                                      capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else
                        find_spec(name, *a))
    out = tmp_path / "out"
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--report-to", "trackio"), capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == ["error: --report-to trackio needs the trackio package, which is not "
                                          "installed. HINT: pip install trackio"]
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--report-to", "tensorbord"), capsys)
    assert error_lines(result.stderr) == ["error: --report-to 'tensorbord' is not one of none, tensorboard, "
                                          "mlflow, trackio, wandb (HINT: separate several with commas, e.g. "
                                          "--report-to tensorboard,mlflow)"]
    result = run_main(ft.main, base_args(tiny_model_dir, tiny_data_dir, out, "--report-to", "none,tensorboard"), capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == ["error: --report-to 'none,tensorboard': none means no tracker, so it "
                                          "cannot be combined with tensorboard. HINT: use --report-to "
                                          "tensorboard to log to it, or --report-to none for no tracker"]
    twice = base_args(tiny_model_dir, tiny_data_dir, out, "--report-to", "tensorboard", "--report-to", "mlflow")
    result = run_main(ft.main, twice, capsys)  # it kept the last one, silently (issue 27, 20)
    assert result.returncode == 2 and error_lines(result.stderr) == [
        "error: --report-to was given twice ('tensorboard', then 'mlflow'), and the second would replace the first. "
        "HINT: give it once; several values go in one comma-separated list: --report-to tensorboard,mlflow"]
    assert not out.exists()  # refused before anything was loaded or written


def test_progress_lines_every_log_step_or_interval_whichever_is_rarer(monkeypatch):
    lines = []
    logger = logging.getLogger("test_progress_lines")
    monkeypatch.setattr(logger, "info", lambda fmt, *args: lines.append(fmt % args))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = console.progress_display(total=10, initial=2, enabled=True, logger=logger, interval=3600)
    for step in range(3, 11):
        bar.update(1)
        if step % 2 == 0:  # --log-every 2
            bar.set_postfix(loss=f"{step:.4f}")
    bar.close()
    # The first log step, then nothing for an hour, then the step reached at the end.
    assert [line.split(", ETA")[0] for line in lines] == ["step 4/10 (40%), loss 4.0000",
                                                         "step 10/10 (100%), loss 10.0000"]
    assert lines[-1].endswith("ETA 0s")  # a duration, not a clock time like 00:00 (issue 23 #8)
    assert [console.format_duration(s) for s in (0, 59.4, 399, 7500, 3 * 86400 + 4 * 3600 + 5)] == [
        "0s", "59s", "6m39s", "2h05m", "3d04h"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    from tqdm import tqdm
    bar = console.progress_display(total=10, initial=0, enabled=True, logger=logger)
    assert isinstance(bar, tqdm)  # on a terminal the bar stays
    bar.close()


def test_progress_lines_never_leave_a_log_file_silent_for_long(monkeypatch):
    """Steps slower than the silence limit (3-minute steps on a CPU): a line comes anyway, saying where the run is
    (issue 27, 17); none after close."""
    lines = []
    logger = logging.getLogger("test_progress_silence")
    monkeypatch.setattr(logger, "info", lambda fmt, *args: lines.append(fmt % args))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = console.progress_display(total=10, initial=0, enabled=True, logger=logger, interval=3600, max_silence=0.2)
    bar.update(1)
    bar.set_postfix(loss="1.0000")  # the first log step: a line
    deadline = time.monotonic() + 30
    while len(lines) < 3 and time.monotonic() < deadline:  # a step that takes "forever"
        time.sleep(0.05)
    bar.close()
    assert lines[0].startswith("step 1/10 (10%), loss 1.0000, ETA")
    assert len(lines) >= 3 and all(re.fullmatch(r"step 1/10 \(10%\), still running, \d+s since step 1 ended, ETA \S+",
                                                line) for line in lines[1:]), lines
    count = len(lines)
    time.sleep(0.5)
    assert len(lines) == count  # the watcher stopped with the bar


def test_tensorboard_on_a_full_disk_is_one_warning_not_a_thread_traceback(tmp_path, monkeypatch, capfd, caplog):
    """TensorBoard writes from a background thread; a full disk there used to print a 16-line `Exception in
    thread` traceback besides the one warning Trackers gives when the error reaches the next write."""
    pytest.importorskip("tensorboard")
    import threading

    from tensorboard.summary.writer import record_writer

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's own, not pytest's
    opened = trackers.open_trackers(["tensorboard"], tmp_path, {"lr": 1e-3}, 0, None, [], is_main=True)
    opened.flush()

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
    (tracker,) = opened.active
    worker = tracker.writer.file_writer.event_writer._async_writer._worker
    opened.log({"kind": "train", "step": 1, "loss": 2.0})
    worker.join(timeout=30)  # the write fails in the thread, which ends
    for step in (2, 3):
        opened.log({"kind": "train", "step": step, "loss": 2.0})
    opened.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    failures = [r.getMessage() for r in caplog.records if "--report-to tensorboard" in r.getMessage()]
    assert len(failures) == 1 and "No space left on device" in failures[0], failures


# -----------------------------------------------------------------------------
# MLflow on a full disk, and a tracking server that does not answer


@pytest.mark.skipif(not os.environ.get("FINETUNE_SLOW_TESTS"), reason="creating an MLflow database takes ~30 s "
                    "on 2 busy cores; FINETUNE_SLOW_TESTS=1 runs it")
def test_mlflow_on_a_full_disk_is_one_warning(tmp_path, capfd):
    """A real full disk for the MLflow database (RLIMIT_FSIZE: writes beyond the size fail), in-process."""
    import resource

    pytest.importorskip("mlflow")
    from finetune.train.trackers import MLflow, Trackers

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
    from helpers import assert_clean_error

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
