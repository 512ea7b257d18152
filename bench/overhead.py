"""Share of a run spent evaluating, logging and saving at the default intervals.

    python bench/overhead.py                        # small model, 4 x 256, 3 epochs of 200 steps
    python bench/overhead.py --model gpt2 --steps-per-epoch 100

Runs finetune_generative.main() in this process with the script's default --log-every, --eval-every,
--save-every and --eval-batches, on random-token data whose validation split is 1/9 of the training
split (what prepare_data.py's default --val-fraction 0.1 gives), and times the script's own methods by
wrapping them:
  evaluation   TrainingRun.evaluate_and_track: forward passes, best/ and loss.png (step 0 included)
  checkpoints  TrainingRun.checkpoint and TrainingRun.save_final_model
  logging      TrainingRun.record (metrics.jsonl lines; the progress bar is updated in the loop)
The run's wall time is main()'s. "Training" is the summed step time the script itself logs
(metrics.jsonl tokens_per_s), start-up is the time before the first step.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_TOKENIZER_DIR, REPO, build_model_dir, write_data_dir  # noqa: E402

sys.path.insert(0, str(REPO))


def timed(owner, name: str, totals: dict, key: str) -> None:
    if not hasattr(owner, name):  # timing nothing would report 0 % overhead
        raise SystemExit(f"{owner.__name__}.{name} does not exist: the code moved; update bench/overhead.py")
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
            totals[key + "_calls"] = totals.get(key + "_calls", 0) + 1

    setattr(owner, name, wrapper)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=["gpt2", "small"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--extra", default="", help="more finetune_generative.py flags, e.g. '--eval-every 100'")
    p.add_argument("--work-dir", default="/tmp/finetune-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    work = Path(args.work_dir)
    model_dir = build_model_dir(args.model, work, DEFAULT_TOKENIZER_DIR)
    train_tokens = args.steps_per_epoch * args.batch_size * args.block_size
    data_dir = write_data_dir(work / f"data-overhead-{args.model}-{train_tokens}", model_dir,
                              train_tokens=train_tokens, val_tokens=train_tokens // 9)
    out = work / "runs" / "overhead"
    shutil.rmtree(out, ignore_errors=True)

    import finetune_generative as fg

    totals: dict = {}
    timed(fg.TrainingRun, "evaluate_and_track", totals, "evaluation")
    timed(fg.TrainingRun, "checkpoint", totals, "checkpoints")
    timed(fg.TrainingRun, "save_final_model", totals, "final_model")
    timed(fg.TrainingRun, "record", totals, "logging")
    flags = ["--model", str(model_dir), "--data-dir", str(data_dir), "--output-dir", str(out),
             "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
             "--epochs", str(args.epochs), *args.extra.split()]
    start = time.perf_counter()
    rc = fg.main(flags)
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"run failed with exit code {rc}")
        return rc

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    step_seconds, previous = 0.0, 0
    for r in train:
        step_seconds += (r["tokens"] - previous) / r["tokens_per_s"]
        previous = r["tokens"]
    evals = [r for r in records if r["kind"] == "eval"]
    saving = totals.get("checkpoints", 0.0) + totals.get("final_model", 0.0)
    overhead = totals.get("evaluation", 0.0) + saving + totals.get("logging", 0.0)
    startup = wall - step_seconds - overhead
    print(f"model {args.model}, batch {args.batch_size} x {args.block_size}, {train[-1]['step']} steps "
          f"({args.epochs} epochs of {args.steps_per_epoch}), val split {train_tokens // 9:,} tokens, "
          f"{len(evals)} evaluations at steps {[r['step'] for r in evals]}, "
          f"{totals.get('checkpoints_calls', 0)} checkpoint(s)")
    rows = [("training steps", step_seconds), ("evaluation (incl. step 0)", totals.get("evaluation", 0.0)),
            ("checkpoints + final model", saving), ("metrics lines", totals.get("logging", 0.0)),
            ("start-up and the rest", startup)]
    for name, seconds in rows:
        print(f"  {name:28s} {seconds:8.1f} s  {100 * seconds / wall:5.1f} %")
    print(f"  {'whole run':28s} {wall:8.1f} s")
    print(f"evaluation + logging + saving: {100 * overhead / wall:.1f} % of the run "
          f"({100 * overhead / (step_seconds + overhead):.1f} % of the training loop)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "wall_s": wall, "step_s": step_seconds,
                                               **totals}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
