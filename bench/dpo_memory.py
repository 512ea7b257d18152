"""Peak memory of full DPO against supervised fine-tuning (SFT) on the same model, batch and block: the 124M
GPT-2 architecture (random weights, bench/_common.build_model_dir), fp32, full fine-tuning.

    python bench/dpo_memory.py                     # gpt2, 2 x 512, 3 steps, 32 pairs
    python bench/dpo_memory.py --batch-size 4 --block-size 1024 --steps 4

The data: bench/dpo_throughput.py's pairs (seed --seed). DPO trains on them as pairs; SFT on the same prompts
with their chosen completions (prompt/completion records: chat data, the prompt untrained), so both see the
same kind of text at the same --batch-size x --block-size.

Each contender is one unmodified `python finetune_generative.py --max-steps N --eval-every 0 --save-every 0
--dropout 0` run (loading, DPO's reference pass over both splits, the steps, the final model's save), alternated
--rounds times. Reported: the peak RSS (the kernel's high-water mark of the run, bench/_common.run_polled),
the run's wall seconds and the machine's load meanwhile. Both hold the same weights, gradients and AdamW state
(16 bytes a parameter); what differs is what a step keeps for its backward pass: SFT's logits of every position
of the batch, DPO's of the completions' tokens only (finetune/train/objectives/preference.py), plus the reference
log-probabilities (two float64 per pair).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir, run_polled, tail  # noqa: E402
from _side_by_side import run_checked  # noqa: E402
from dpo_throughput import make_pairs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="bench/_common.py MODELS name (random weights)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=str(REPO / "bench" / "runs" / "dpo-memory"))
    return p.parse_args(argv)


def build_data(args, model_dir: Path, root: Path) -> dict[str, Path]:
    """{"dpo": a folder of pairs, "sft": a folder of the same prompts with their chosen completions}."""
    pairs = {"train": make_pairs(args.pairs, args.seed), "val": make_pairs(8, args.seed + 1)}
    records = {"dpo": lambda pair: pair, "sft": lambda pair: {"prompt": pair["prompt"], "completion": pair["chosen"]}}
    folders = {}
    for name, record in records.items():
        folder = folders[name] = root / f"data-{name}-{args.pairs}-{args.seed}"
        if (folder / "meta.json").is_file():
            continue
        for split, rows in pairs.items():
            (root / f"{name}-{split}.jsonl").write_text("".join(json.dumps(record(r)) + "\n" for r in rows))
        run_checked([sys.executable, str(REPO / "prepare_data.py"), "--input", str(root / f"{name}-train.jsonl"),
                     "--val-input", str(root / f"{name}-val.jsonl"), "--tokenizer", str(model_dir), "--output-dir",
                     str(folder), "--block-size", str(args.block_size)])
    return folders


def run(args, model_dir: Path, data_dir: Path, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "finetune_generative.py"), "--model", str(model_dir), "--data-dir",
           str(data_dir), "--output-dir", str(out), "--overwrite", "--block-size", str(args.block_size),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--precision", "fp32",
           "--device", "cpu", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--eval-batches", "1",
           "--dropout", "0", "--num-workers", "0"]
    log = out.with_suffix(".log")
    result = run_polled(cmd, log_path=log)
    if result["rc"] != 0:
        raise SystemExit(f"failed ({result['rc']}): {' '.join(cmd)}\n{tail(log)}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, root)
    folders = build_data(args, model_dir, root)
    results: dict[str, list[dict]] = {"sft": [], "dpo": []}
    for r in range(args.rounds):
        for name in results:
            results[name].append(run(args, model_dir, folders[name], root / f"{name}-{r}"))
    print(f"model {args.model}, fp32, full fine-tuning, batch {args.batch_size} x block {args.block_size}, "
          f"{args.steps} steps, {args.rounds} round(s)")
    print(f"{'':4} {'peak RSS MiB':>13} {'wall s':>8} {'load before/after':>18}")
    rows = {}
    for name, runs in results.items():
        best = min(runs, key=lambda x: x["peak_rss_mib"])
        rows[name] = best
        print(f"{name:4} {best['peak_rss_mib']:13,.0f} {best['wall_s']:8.0f} "
              f"{best['load_before']:8.1f} / {best['load_after']:<7.1f}")
    print(f"dpo - sft: {rows['dpo']['peak_rss_mib'] - rows['sft']['peak_rss_mib']:+,.0f} MiB")
    (root / "summary.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
