"""finetune/metrics.py on a filling disk: metrics.jsonl gets one warning and keeps the lines it could not write
until there is room; the run goes on until its checkpoint fails (exit 4, the last one intact)."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

import finetune_generative as ft
from finetune import metrics
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
