"""At the end of a training run: the report card (the base model at step 0, best/ and the final model on the
val split, in evaluate.py's format) and a model card README.md in the Hugging Face format.

Nothing is evaluated again: the run already scored the same val blocks at every evaluation (metrics.jsonl);
bits per byte come from the bytes those blocks' predicted tokens stand for. A README.md the user wrote (one
without our marker line) is never replaced.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

from finetune.core.errors import SaveFailed
from finetune.core.fsio import rewrite_text

from .metrics import Totals
from .report import build_report, write_report
from .scoring import Result, token_byte_lengths

log = logging.getLogger("finetune")

REPORT_CARD = "report_card"  # report_card.json and report_card.md in the output folder
MODEL_CARD = "README.md"
PREFERENCE_METRICS = {"dpo_loss": "DPO loss", "reward_accuracy": "reward accuracy (vs the starting model)",
                      "reward_margin": "reward margin (beta x log-ratio to the starting model)"}
MARKER = "<!-- model card written by finetune_generative.py; it is rewritten at the end of each run. Delete this " \
         "line to keep your edits: a README.md without it is never replaced. -->"


def written_by_us(card: Path) -> bool:
    try:
        return MARKER in card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def val_tokens_and_bytes(val_loader, tokenizer) -> tuple[int, int]:
    """Predicted tokens of the val blocks one evaluation scores, and the UTF-8 bytes they stand for."""
    from finetune.train.loss import IGNORE_INDEX

    lengths = token_byte_lengths(tokenizer)
    tokens = n_bytes = 0
    for batch in val_loader:
        targets = batch["labels"][:, 1:]
        kept = targets[targets != IGNORE_INDEX].numpy()
        tokens += int(kept.size)
        n_bytes += int(lengths[kept.clip(max=len(lengths) - 1)].sum())
    return tokens, n_bytes


def evaluated_models(metrics: list[dict], best_exists: bool) -> list[tuple[str, dict]]:
    """(label, eval record) of the base (step 0), best/ (when it was saved) and the final model."""
    evals = [m for m in metrics if m["kind"] == "eval"]
    if not evals:
        return []
    chosen = [("base (step 0)", evals[0])] if evals[0]["step"] == 0 else []
    if best_exists:
        best = min(evals, key=lambda m: m["val_loss"])
        chosen.append((f"best/ (step {best['step']})", best))
    chosen.append((f"final (step {evals[-1]['step']})", evals[-1]))
    return chosen


def figures_of(val_loss: float, tokens: int, n_bytes: int) -> dict:
    """The run's val loss and perplexity; bits per byte too when this process counted the split's tokens and
    bytes (one process: under torchrun each holds only its share of the split, so `tokens` is 0)."""
    totals = Totals(nll=val_loss * tokens, tokens=tokens, bytes=n_bytes)
    figures = totals.figures() if tokens else {}
    figures["loss"] = val_loss  # the run's own number
    figures["perplexity"] = math.exp(min(val_loss, 50.0))
    return figures


def preference_figures_of(record: dict) -> dict:
    """A DPO run's eval record as figures: its loss is DPO's (no cross-entropy, so no perplexity or bits per
    byte); the rewards are against the run's reference, the starting model (the report card's first model)."""
    return {"dpo_loss": record["val_loss"], "reward_accuracy": record.get("val_rewards_accuracy"),
            "reward_margin": record.get("val_rewards_margin"), "logps_chosen": record.get("val_logps_chosen"),
            "logps_rejected": record.get("val_logps_rejected")}


def report_card(run, precision: str, wall_seconds: float | None) -> dict:
    """The report in evaluate.py's format (report.build_report) for the run's evaluated models."""
    from finetune.runtime.device import library_versions

    cfg = run.cfg
    pairs = run.objective.kind == "preference"
    single = run.dist_info.world_size == 1  # the val loader holds this process's share only
    tokens, n_bytes = val_tokens_and_bytes(run.val_loader, run.tokenizer) if single and not pairs else (0, 0)
    chosen = evaluated_models(run.metrics, (run.output_dir / "best").is_dir())
    models, results = [], {}
    for label, record in chosen:
        models.append({"label": label, "source": cfg.model if record["step"] == 0 else
                       str(run.output_dir / ("best" if label.startswith("best") else "")),
                       "fingerprint": run.fingerprints.get("base_fingerprint", "") if record["step"] == 0 else "",
                       "precision": precision, "device": str(run.device), "context": run.plan.block_size,
                       "step": record["step"], "tokens_seen": record.get("tokens")})
        figures = preference_figures_of(record) if pairs else figures_of(record["val_loss"], tokens, n_bytes)
        results[label] = Result(figures, notes=[f"the {run.plan.block_size}-token val blocks the run scored at each "
                                                "evaluation (from metrics.jsonl)"])
    evaluation = SimpleNamespace(name=f"{cfg.data_dir} (val)", kind="preference pairs" if pairs else "val split")
    settings = {"wall_seconds": wall_seconds, "data_fingerprint": run.fingerprints.get("data_fingerprint")}
    return build_report(models, [(evaluation, results)], settings, library_versions(),
                        [{"name": cfg.data_dir, "kind": "data-dir", **run.fingerprints}])


# -----------------------------------------------------------------------------
# The model card


def front_matter(run, final: dict | None) -> dict:
    cfg, adapters = run.cfg, run.strategy.trains_adapters
    data_fp = run.fingerprints.get("data_fingerprint", "unknown")
    tags = ["finetune-generative", "text-generation", *(["lora"] if adapters else []),
            *([run.objective.kind] if run.objective.kind != "text" else [])]
    matter = {"base_model": cfg.model, "library_name": "peft" if adapters else "transformers",
              "pipeline_tag": "text-generation", "tags": tags, "datasets": [f"local-data-{data_fp}"]}
    if final is not None and "dpo_loss" in final:
        metrics = [{"type": name, "value": round(final[name], 6), "name": f"validation {title}"}
                   for name, title in PREFERENCE_METRICS.items() if final.get(name) is not None]
    elif final is not None:
        metrics = [{"type": "loss", "value": round(final["loss"], 6), "name": "validation loss (nats/token)"},
                   {"type": "perplexity", "value": round(final["perplexity"], 6), "name": "validation perplexity"}]
        if final.get("bits_per_byte") is not None:
            metrics.append({"type": "bits_per_byte", "value": round(final["bits_per_byte"], 6),
                            "name": "validation bits per byte"})
    if final is not None:
        matter["model-index"] = [{"name": run.output_dir.name, "results": [{
            "task": {"type": "text-generation", "name": "Causal language modeling"},
            "dataset": {"name": f"{Path(cfg.data_dir).name} (val split)", "type": f"local-data-{data_fp}",
                        "split": "validation", "revision": data_fp},
            "metrics": metrics}]}]
    return matter


def hardware(device) -> str:
    from finetune.runtime.device import cpu_model

    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"{device.type}: {cpu_model()}"


def samples_section(output_dir: Path) -> list[str]:
    """Each --sample-prompt's sample at the first and at the last step it was sampled."""
    path = output_dir / "samples.jsonl"
    if not path.is_file():
        return []
    by_prompt: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        by_prompt.setdefault(record.get("prompt", ""), []).append(record)
    out = ["", "## Samples", ""]
    for prompt, records in by_prompt.items():
        for record in (records[0], records[-1]) if len(records) > 1 else records:
            text = str(record.get("text", "")).replace("\n", " ")
            out.append(f"- step {record.get('step')}, prompt {json.dumps(prompt, ensure_ascii=False)}: {text}")
    return out


def model_card(run, report: dict, precision: str, wall_seconds: float | None) -> str:
    import yaml

    cfg, plan = run.cfg, run.plan
    labels = [m["label"] for m in report["models"]]
    results = report["evaluations"][0]["results"] if report["evaluations"] else {}
    final = results[labels[-1]]["figures"] if labels else None
    kind = f", {run.objective.kind} data" if run.objective.kind != "text" else ""
    lines = ["---", yaml.safe_dump(front_matter(run, final), sort_keys=False, allow_unicode=True).rstrip(), "---",
             MARKER, "", f"# {run.output_dir.name}", "",
             f"A fine-tune of `{cfg.model}` made with finetune_generative.py"
             f"{' (LoRA, merged into the base)' if run.strategy.trains_adapters else ''} on the token files in `{cfg.data_dir}` "
             f"(data fingerprint `{run.fingerprints.get('data_fingerprint')}`{kind}).",
             "", "## Training", "", "| setting | value |", "|---|---|"]
    rows = [("training blocks", f"{plan.train_blocks:,} of {plan.block_size} tokens"),
            ("validation blocks", f"{plan.val_blocks:,}"),
            ("steps", f"{run.progress.step:,} ({run.progress.tokens_seen:,} tokens seen)"),
            ("batch", f"{plan.batch_size} x {plan.grad_accum} accumulation x {run.dist_info.world_size} process(es)"),
            ("learning rate", f"{cfg.lr:g}, {cfg.scheduler}, {plan.warmup_steps} warm-up steps"),
            ("weight decay, max grad norm", f"{cfg.weight_decay:g}, {cfg.max_grad_norm:g}"),
            ("precision", precision), ("hardware", hardware(run.device)),
            ("seed", str(cfg.seed)), *run.strategy.card_rows()]
    if wall_seconds is not None:
        rows.append(("wall time (this session)", f"{wall_seconds / 60:.1f} min"))
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Results", "", "On the validation split, the same blocks at every evaluation:", ""]
    lines += results_table(labels, results, run.objective.kind == "preference")
    lines += ["", f"Every figure: [{REPORT_CARD}.md]({REPORT_CARD}.md) and {REPORT_CARD}.json."]
    if (run.output_dir / "loss.png").is_file():
        lines += ["", "![training and validation loss](loss.png)"]
    lines += samples_section(run.output_dir)
    data = f"--data-dir {cfg.data_dir}" if run.objective.kind == "preference" else "--input YOUR_TEXT.txt"
    lines += ["", "## Use", "", "```bash", f"python generate.py --model {run.output_dir} --prompt \"...\"",
              f"python evaluate.py --model {cfg.model} --model {run.output_dir} {data}", "```", ""]
    return "\n".join(lines)


def results_table(labels: list[str], results: dict, pairs: bool) -> list[str]:
    """The model card's results: val loss, perplexity and bits per byte; for DPO, its loss and the rewards
    (against the reference, the starting model)."""
    def show(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    if pairs:
        lines = ["| model | val DPO loss | reward accuracy | reward margin | log p(chosen) | log p(rejected) |",
                 "|---|---|---|---|---|---|"]
        for label in labels:
            f = results[label]["figures"]
            lines.append(f"| {label} | {show(f['dpo_loss'], 4)} | {show(f['reward_accuracy'], 3)} | "
                         f"{show(f['reward_margin'], 4)} | {show(f['logps_chosen'], 2)} | {show(f['logps_rejected'], 2)} |")
        return lines
    lines = ["| model | val loss | perplexity | bits per byte |", "|---|---|---|---|"]
    for label in labels:
        f = results[label]["figures"]
        lines.append(f"| {label} | {show(f['loss'], 4)} | {show(f['perplexity'], 2)} | {show(f.get('bits_per_byte'), 4)} |")
    return lines


def session_seconds(output_dir: Path) -> float | None:
    """Since this session of the run started: it wrote its config then (rundir.prepare_output_dir)."""
    from finetune.train.rundir import CONFIG_FILE

    try:
        return time.time() - (output_dir / CONFIG_FILE).stat().st_mtime
    except OSError:
        return None


def write_report_card(run, precision: str) -> None:
    """report_card.json/.md and README.md in the output folder (main process; a failed write is a warning:
    the model is saved already)."""
    if not run.dist_info.is_main:
        return
    wall = session_seconds(run.output_dir)
    try:
        report = report_card(run, precision, wall)
        write_report(report, run.output_dir, stem=REPORT_CARD, plot=False)
        card = run.output_dir / MODEL_CARD
        if card.exists() and not written_by_us(card):
            log.info("%s is not ours (no marker line): left as it is; the model card is in %s.md", card, REPORT_CARD)
            return
        rewrite_text(card, model_card(run, report, precision, wall))
    except (OSError, SaveFailed) as exc:
        log.warning("could not write the report card (%s); the model is saved", getattr(exc, "strerror", None) or exc)
        return
    except Exception as exc:  # noqa: BLE001 - a defect in the card must not turn a finished run into a failed one
        log.warning("could not write the report card (%s: %s); the model is saved", type(exc).__name__, exc)
        return
    figures = [r["figures"] for r in report["evaluations"][0]["results"].values()]
    accuracy = [f.get("reward_accuracy") for f in figures]
    if figures and "dpo_loss" in figures[0] and all(a is not None for a in accuracy):
        log.info("report card: val reward accuracy %s (%s.md, %s)", " -> ".join(f"{a:.3f}" for a in accuracy),
                 REPORT_CARD, MODEL_CARD)
    bpb = [f.get("bits_per_byte") for f in figures]
    if bpb and all(b is not None and math.isfinite(b) for b in bpb):
        log.info("report card: val bits per byte %s (%s.md, %s)", " -> ".join(f"{b:.4f}" for b in bpb),
                 REPORT_CARD, MODEL_CARD)
