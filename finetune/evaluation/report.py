"""What an evaluation writes: eval.json (every figure, fingerprints, versions), eval.md (for a person),
eval.png (the models side by side per input), and the console table (the same numbers as eval.json)."""
from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path

from finetune.core.fsio import atomic_file

from .metrics import FIGURES, headline

REPORT_FORMAT, REPORT_VERSION = "finetune-eval", 1
JSON_FILE = "eval.json"
CHANGED_SHOWN = 5  # documents most worse / most better between the first and the last model
SHOWN_FIGURES = ("loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "acc", "acc_norm",
                 "exact_match", "dpo_loss", "preference_accuracy", "reward_accuracy", "reward_margin", "margin",
                 "logps_chosen", "logps_rejected", "tokens", "bytes", "questions", "pairs")


def finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def fmt(value) -> str:
    """How a figure is shown, on the console and in eval.md alike."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def document_score(doc: dict) -> float | None:
    """A document's bits per byte (its loss per token when its bytes are not known)."""
    if doc.get("bytes"):
        return doc["nll"] / doc["bytes"] / math.log(2)
    if doc.get("tokens"):
        return doc["nll"] / doc["tokens"]
    return None


def changed_documents(first: list[dict], last: list[dict]) -> dict:
    """The documents whose bits per byte went up (worse) and down (better) most from the first model to the
    last, the same documents scored by both."""
    pairs = []
    for a, b in zip(first, last):
        sa, sb = document_score(a), document_score(b)
        if sa is not None and sb is not None:
            pairs.append({"name": a["name"], "input": a["input"], "before": sa, "after": sb, "change": sb - sa})
    pairs.sort(key=lambda p: p["change"])
    return {"measure": "bits_per_byte" if first and first[0].get("bytes") else "loss",
            "worse": [p for p in reversed(pairs[-CHANGED_SHOWN:]) if p["change"] > 0],
            "better": [p for p in pairs[:CHANGED_SHOWN] if p["change"] < 0]}


def build_report(models: list[dict], evaluations: list[tuple], settings: dict, versions: dict,
                 data: list[dict], samples: list[dict] | None = None) -> dict:
    """`evaluations`: (evaluation, {model label: Result}) in order."""
    entries = []
    labels = [m["label"] for m in models]
    for evaluation, results in evaluations:
        entry = {"name": evaluation.name, "kind": evaluation.kind,
                 "notes": sorted({n for r in results.values() for n in r.notes}),
                 "results": {label: {"figures": r.figures, "by_input": r.by_input, "documents": r.documents}
                             for label, r in results.items()}}
        if len(labels) > 1 and evaluation.kind == "text":
            entry["changed_documents"] = changed_documents(results[labels[0]].documents,
                                                           results[labels[-1]].documents)
        entries.append(entry)
    return finite({"format": REPORT_FORMAT, "version": REPORT_VERSION,
                   "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "models": models, "evaluations": entries, "samples": samples or [], "data": data,
                   "settings": settings, "versions": versions})


# -----------------------------------------------------------------------------
# Tables


def figure_rows(entry: dict, labels: list[str]) -> list[tuple[str, list]]:
    """(row title, one value per model) of an evaluation: its figures, then the headline figure per input."""
    results = entry["results"]
    rows = []
    for name in SHOWN_FIGURES:
        values = [results[label]["figures"].get(name) for label in labels]
        if any(v is not None for v in values):
            rows.append((FIGURES.get(name, (name,))[0], values))
    others = [n for n in results[labels[0]]["figures"] if n not in FIGURES and n not in SHOWN_FIGURES
              and isinstance(results[labels[0]]["figures"][n], float)]  # lm-eval's task/metric figures
    rows += [(name, [results[label]["figures"].get(name) for label in labels]) for name in others]
    inputs = list(results[labels[0]]["by_input"])
    if len(inputs) > 1:
        for name in inputs:
            figures = [results[label]["by_input"].get(name, {}) for label in labels]
            measure = headline(figures[0])
            if measure:
                rows.append((f"{Path(name).name}: {FIGURES[measure[0]][0]}", [f.get(measure[0]) for f in figures]))
    return rows


def console_table(report: dict) -> str:
    labels = [m["label"] for m in report["models"]]
    lines = []
    for entry in report["evaluations"]:
        rows = figure_rows(entry, labels)
        title_width = max([len(r[0]) for r in rows] + [10])
        widths = [max(12, len(label)) for label in labels]
        lines.append(f"{entry['name']} ({entry['kind']})")
        lines.append("  " + " " * title_width + "  " + "  ".join(label.rjust(w) for label, w in zip(labels, widths)))
        for title, values in rows:
            lines.append("  " + title.ljust(title_width) + "  " +
                         "  ".join(fmt(v).rjust(w) for v, w in zip(values, widths)))
        for note in entry["notes"]:
            lines.append(f"  ({note})")
        lines.append("")
    for sample in report.get("samples", []):
        lines.append(f"sample, prompt {json.dumps(sample['prompt'], ensure_ascii=False)}:")
        lines += [f"  {label}: {json.dumps(text, ensure_ascii=False)}" for label, text in sample["completions"].items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def cell(text: str) -> str:
    """Text in a Markdown table cell: one line, no column break."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict, plot: str | None) -> str:
    labels = [m["label"] for m in report["models"]]
    out = ["# Evaluation", "", f"Created {report['created']} with evaluate.py.", "", "## Models", "",
           "| model | source | fingerprint | precision | context |", "|---|---|---|---|---|"]
    out += [f"| {m['label']} | {m['source']} | {m['fingerprint']} | {m['precision']} | {m['context']} |"
            for m in report["models"]]
    for entry in report["evaluations"]:
        out += ["", f"## {entry['name']} ({entry['kind']})", ""]
        out += [f"_{note}_" for note in entry["notes"]] + ([""] if entry["notes"] else [])
        out += ["| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        out += [f"| {title} | " + " | ".join(fmt(v) for v in values) + " |" for title, values in figure_rows(entry, labels)]
        changed = entry.get("changed_documents")
        if changed and (changed["worse"] or changed["better"]):
            out += ["", f"Documents that changed most from {labels[0]} to {labels[-1]} ({changed['measure']}):", "",
                    "| document | before | after | change |", "|---|---|---|---|"]
            out += [f"| {p['name']} | {fmt(p['before'])} | {fmt(p['after'])} | {p['change']:+.4g} |"
                    for p in changed["worse"] + changed["better"]]
    if report.get("samples"):
        out += ["", "## Samples", "", "| prompt | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        out += ["| " + " | ".join(cell(t) for t in [s["prompt"], *(s["completions"].get(label, "") for label in labels)])
                + " |" for s in report["samples"]]
    if plot:
        out += ["", f"![per input]({plot})"]
    out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(out)


# -----------------------------------------------------------------------------
# Files


def plot_by_input(report: dict, path: Path) -> bool:
    """eval.png: the headline figure of each input (and task file), one bar per model. False: nothing to plot."""
    labels = [m["label"] for m in report["models"]]
    groups = []
    for entry in report["evaluations"]:
        parts = entry["results"][labels[0]]["by_input"] or {entry["name"]: entry["results"][labels[0]]["figures"]}
        for name, figures in parts.items():
            measure = headline(figures)
            if measure is None:
                continue
            values = []
            for label in labels:
                result = entry["results"][label]
                source = result["by_input"].get(name) if result["by_input"] else result["figures"]
                values.append((source or {}).get(measure[0]))
            groups.append((f"{Path(name).name}\n{FIGURES[measure[0]][0]}", values))
    if not groups:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(max(4, 3 * len(groups)), 3.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], groups):
        ax.bar(range(len(labels)), [v if v is not None else 0 for v in values], color=plt.cm.tab10.colors[:len(labels)])
        ax.set_xticks(range(len(labels)), [Path(label).name or label for label in labels], rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return True


def write_report(report: dict, folder: Path, stem: str = "eval", plot: bool = True) -> list[Path]:
    """{stem}.json, {stem}.md and (with `plot`) {stem}.png in `folder`, each replaced whole."""
    folder.mkdir(parents=True, exist_ok=True)
    json_file, markdown_file, plot_file = (folder / f"{stem}{ext}" for ext in (".json", ".md", ".png"))
    plotted = plot and plot_by_input(report, plot_file)
    with atomic_file(json_file, str(json_file)) as f:
        f.write(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    with atomic_file(markdown_file, str(markdown_file)) as f:
        f.write(markdown(report, plot_file.name if plotted else None))
    return [json_file, markdown_file, *([plot_file] if plotted else [])]
