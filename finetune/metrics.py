"""metrics.jsonl (one JSON record per line, cut back to a checkpoint on resume) and loss.png."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .fsio import TMP_PREFIX, rewrite_text


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
    rewrite_text(path, "".join(json.dumps(r) + "\n" for r in records))


def plot_losses(metrics: list[dict], path: Path) -> None:
    """loss.png: train and val loss against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["tokens"], m["loss"]) for m in metrics if m["kind"] == "train"]
    val = [(m["tokens"], m["val_loss"]) for m in metrics if m["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
