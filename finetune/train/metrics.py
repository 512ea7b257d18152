"""metrics.jsonl (one JSON record per line, cut back to a checkpoint on resume) and loss.png."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from finetune.core.fsio import TMP_PREFIX, rewrite_text

log = logging.getLogger("finetune")

# Lines that could not be appended yet (a full disk), per file: written before the next line once there is
# room again, so the file has no gap. A failed write is one warning, never the end of a run: the run's
# checkpoints are what needs the disk, and a failed checkpoint stops it (exit 4, the last one intact).
_unwritten: dict[Path, list[str]] = {}


def append_jsonl(path: Path, record: dict) -> None:
    pending = _unwritten.setdefault(Path(path), [])
    pending.append(json.dumps(record) + "\n")
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(pending))
    except OSError as exc:
        with contextlib.suppress(OSError):  # no half line left for the next append to run into
            os.truncate(path, size)
        if len(pending) == 1:  # the first line held back: say so once
            log.warning("could not append to %s (%s); training goes on, the lines are kept and written when "
                        "there is room again", path, exc.strerror or exc)
        return
    if len(pending) > 1:
        log.info("%s: wrote the %d lines held back", path, len(pending) - 1)
    pending.clear()


def read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Metrics of an earlier run up to a checkpoint's step; later lines came after it and are dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    _unwritten.pop(Path(path), None)  # the file is written whole: nothing held back is owed to it
    rewrite_text(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_losses(metrics: list[dict], path: Path) -> None:
    """loss.png: train and val loss against tokens seen, a dotted line where a run was resumed or extended."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["tokens"], m["loss"]) for m in metrics if m["kind"] == "train"]
    val = [(m["tokens"], m["val_loss"]) for m in metrics if m["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:  # a line of one point draws nothing: that point gets a marker
        ax.plot(*zip(*train), "." if len(train) == 1 else "-", label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    labelled = set()
    for mark in (m for m in metrics if m["kind"] == "resume"):  # where a run was resumed or extended
        label = "extended" if mark.get("extended") else "resumed"
        ax.axvline(mark["tokens"], linestyle=":", color="gray", label=None if label in labelled else label)
        labelled.add(label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except OSError as exc:  # a full disk: the plot waits for the next evaluation; the run goes on
        tmp.unlink(missing_ok=True)
        log.warning("could not write %s (%s); it is drawn again at the next evaluation", path, exc.strerror or exc)
    finally:
        plt.close(fig)
