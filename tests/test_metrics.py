"""finetune/train/metrics.py on a filling disk: metrics.jsonl gets one warning and keeps the lines it could not write
until there is room; the run goes on until its checkpoint fails (exit 4, the last one intact)."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

import finetune_generative as ft
from finetune.train import metrics
from helpers import SAVE_RUN, base_args, checkpoint_names, error_lines, run_main


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


def test_loss_png_marks_where_a_run_was_resumed_or_extended(tmp_path, monkeypatch):
    """A resume appends a "resume" record to metrics.jsonl; loss.png draws a dotted line at its tokens, and
    the trackers, whose runs are continued themselves, never get it (nor, replayed, a tracker a resume adds)."""
    import matplotlib.pyplot as plt

    from finetune.train import trackers

    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: drawn.append(fig) or close(fig))
    history = [{"kind": "eval", "step": 0, "tokens": 0, "val_loss": 6.0},
               {"kind": "train", "step": 2, "tokens": 512, "loss": 5.9},
               {"kind": "resume", "step": 2, "tokens": 512, "total_steps": 4, "extended": False},
               {"kind": "train", "step": 4, "tokens": 1024, "loss": 5.7},
               {"kind": "resume", "step": 4, "tokens": 1024, "total_steps": 8, "extended": True},
               {"kind": "train", "step": 6, "tokens": 1536, "loss": 5.6}]
    metrics.plot_losses(history, tmp_path / "loss.png")
    marks = [line for line in drawn[0].axes[0].lines if line.get_linestyle() == ":"]
    assert [(list(m.get_xdata()), m.get_label()) for m in marks] == [([512, 512], "resumed"),
                                                                     ([1024, 1024], "extended")]
    assert (tmp_path / "loss.png").stat().st_size > 0

    class Recorder:
        name = "recorder"

        def __init__(self, *_):
            self.logged = []

        def log(self, record):
            self.logged.append(record["kind"])

    monkeypatch.setitem(trackers.OPENERS, "recorder", Recorder)
    opened = trackers.open_trackers(["recorder"], tmp_path, {}, step=6, saved={}, history=history, is_main=True)
    opened.log({"kind": "resume", "step": 6, "tokens": 1536, "total_steps": 8, "extended": False})
    opened.log({"kind": "train", "step": 7, "tokens": 1792, "loss": 5.5})
    assert opened.active[0].logged == ["eval", "train", "train", "train", "train"]
