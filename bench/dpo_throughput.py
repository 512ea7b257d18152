"""DPO training throughput: finetune_generative.py on preference pairs (packed blocks, precomputed reference)
against TRL's DPOTrainer (padded batches, precompute_ref_log_probs=True), side by side.

    python bench/dpo_throughput.py                           # "small" GPT-2 (6 x 384), bf16, 20 steps
    python bench/dpo_throughput.py --model gpt2 --precision fp32 --steps 30 --pairs 2000

The data. --pairs standard preference pairs (seed --seed) made from a fixed list of English words: a prompt of
10-120 words ending in ":", a chosen and a rejected completion of a log-normal number of words each (median
30, clipped to 2-300), so a pair runs from about 30 to about 700 tokens. The same JSON lines go to
prepare_data.py (ours) and, as a dataset, to DPOTrainer: both tokenize them to the same ids
(tests/test_prepare_preference.py::test_same_tokens_as_trl).

The contenders, each in its own process, alternating rounds (ours, trl, ours, trl, ...):
  ours  `python finetune_generative.py --max-steps N --log-every 1 --eval-every 0 --save-every 0`, unmodified:
        pairs packed whole into --block-size blocks (two sequences each), --batch-size blocks per step.
        Per-step seconds from metrics.jsonl; the reference pass before step 0 is not in them.
  trl   trl.DPOTrainer, sigmoid, beta 0.1, precompute_ref_log_probs=True (its pass is in __init__, not timed),
        max_length = --block-size, per_device_train_batch_size = --trl-batch-size pairs, the same optimizer
        settings and precision, gradient checkpointing off. A callback stamps each step; each batch's tokens
        (input_ids, padding included) and real tokens (attention_mask) are counted where the loss is computed.

Reported per contender: seconds per step (the first --skip steps left out), real tokens per second (the pairs'
own tokens, prompt counted once per sequence: the number to compare, since the two tools put different numbers
of pairs in a step), processed tokens per second (padding included) and the real share. Timings are only
meaningful on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir  # noqa: E402

sys.path.insert(0, str(REPO))

WORDS = ("the a of to in and river mountain ship captain whale sea wind storm quiet morning evening letter house "
         "garden door window old young small great said walked looked found heard thought remembered carried "
         "opened closed because while under over between after before again never always").split()
HYPER = dict(lr=5e-6, weight_decay=0.0, max_grad_norm=1.0)


def make_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def completion_words() -> int:
        return min(300, max(2, round(rng.lognormvariate(3.4, 0.8))))

    return [{"prompt": words(rng.randint(10, 120)) + ":", "chosen": " " + words(completion_words()),
             "rejected": " " + words(completion_words())} for _ in range(n)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="bench/_common.py MODELS name (random weights)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the steady state")
    p.add_argument("--batch-size", type=int, default=4, help="ours: blocks per step")
    p.add_argument("--trl-batch-size", type=int, default=8, help="TRL: pairs per step")
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--pairs", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--work-dir", default=str(REPO / "bench" / "runs" / "dpo"))
    p.add_argument("--trl-run", metavar="RESULT", help=argparse.SUPPRESS)  # internal: one TRL run in this process
    return p.parse_args(argv)


def run_checked(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")


def build_data(args, model_dir: Path, root: Path) -> Path:
    folder = root / f"data-{args.pairs}-{args.seed}"
    if not (folder / "meta.json").is_file():
        for name, rows in (("train.jsonl", make_pairs(args.pairs, args.seed)),
                           ("val.jsonl", make_pairs(max(8, args.pairs // 50), args.seed + 1))):
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        run_checked([sys.executable, str(REPO / "prepare_data.py"), "--input", str(root / "train.jsonl"),
                     "--val-input", str(root / "val.jsonl"), "--tokenizer", str(model_dir), "--output-dir",
                     str(folder), "--block-size", str(args.block_size)])
    return folder


def run_ours(args, model_dir: Path, data_dir: Path, out: Path) -> dict:
    from finetune.data.dataset import load_meta
    from finetune.data.pairs import split_packing

    cmd = [sys.executable, str(REPO / "finetune_generative.py"), "--model", str(model_dir), "--data-dir",
           str(data_dir), "--output-dir", str(out), "--overwrite", "--block-size", str(args.block_size),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--precision", args.precision,
           "--device", args.device, "--log-every", "1", "--eval-every", "0", "--save-every", "0",
           "--eval-batches", "1", "--lr", str(HYPER["lr"]), "--weight-decay", str(HYPER["weight_decay"]),
           "--scheduler", "constant", "--warmup-steps", "0", "--num-workers", "2"]
    run_checked(cmd)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    tokens_per_step = args.batch_size * args.block_size
    seconds = [tokens_per_step / r["tokens_per_s"] for r in train]
    share = split_packing(data_dir, "train", args.block_size, load_meta(data_dir)).real_token_share
    return {"seconds": seconds, "processed_per_step": [tokens_per_step] * len(seconds),
            "real_per_step": [share * tokens_per_step] * len(seconds)}


def trl_run(args, model_dir: Path, result: Path) -> None:
    """In this process: TRL's DPOTrainer on the same pairs."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stamps, processed, real = [], [], []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    class CountingTrainer(trl.DPOTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            processed.append(int(inputs["input_ids"].numel()))
            real.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *a, **k)

    config = trl.DPOConfig(
        output_dir=str(result.parent / "trl-out"), beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True,
        max_length=args.block_size, per_device_train_batch_size=args.trl_batch_size, max_steps=args.steps,
        learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"], max_grad_norm=HYPER["max_grad_norm"],
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused", bf16=args.precision == "bf16",
        logging_steps=10**9, save_strategy="no", report_to="none", use_cpu=args.device == "cpu",
        dataloader_num_workers=2, seed=args.seed, disable_tqdm=True, gradient_checkpointing=False)
    trainer = CountingTrainer(model=model, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(make_pairs(args.pairs, args.seed)), callbacks=[Stamp()])
    start = time.perf_counter()
    trainer.train()
    seconds = [b - a for a, b in zip([start, *stamps], stamps)]
    result.write_text(json.dumps({"seconds": seconds, "processed_per_step": processed[:len(seconds)],
                                  "real_per_step": real[:len(seconds)]}))


def run_trl(argv, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "result.json"
    run_checked([sys.executable, __file__, *argv, "--trl-run", str(result)])
    return json.loads(result.read_text())


def summarize(name: str, runs: list[dict], skip: int) -> dict:
    per_round = []
    for run in runs:
        seconds = run["seconds"][skip:]
        processed, real = sum(run["processed_per_step"][skip:]), sum(run["real_per_step"][skip:])
        per_round.append({"s_per_step": statistics.mean(seconds), "processed_per_s": processed / sum(seconds),
                          "real_per_s": real / sum(seconds), "real_share": real / processed})
    best = max(per_round, key=lambda r: r["real_per_s"])
    return {"name": name, **best, "rounds": per_round}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, root)
    if args.trl_run:
        trl_run(args, model_dir, Path(args.trl_run))
        return 0
    data_dir = build_data(args, model_dir, root)
    runs = {"ours": [], "trl": []}
    for r in range(args.rounds):
        runs["ours"].append(run_ours(args, model_dir, data_dir, root / f"ours-{r}"))
        runs["trl"].append(run_trl(argv, root / f"trl-{r}"))
    rows = [summarize(name, results, args.skip) for name, results in runs.items()]
    print(f"model {args.model}, {args.precision}, ours: batch {args.batch_size} x block {args.block_size}; trl: "
          f"{args.trl_batch_size} pairs per step; {args.steps} steps (first {args.skip} left out), {args.pairs} pairs, "
          f"best of {args.rounds} rounds")
    print(f"{'':6} {'s/step':>8} {'real tok/s':>11} {'processed tok/s':>16} {'real share':>11}")
    for row in rows:
        print(f"{row['name']:6} {row['s_per_step']:8.3f} {row['real_per_s']:11,.0f} {row['processed_per_s']:16,.0f} "
              f"{row['real_share']:11.1%}")
    ours, trl = rows
    print(f"ours / trl, real tokens per second: {ours['real_per_s'] / trl['real_per_s']:.2f}x")
    (root / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
