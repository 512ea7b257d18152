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
  ours  `python finetune_generative.py --max-steps N --log-every 1 --eval-every 0 --save-every 0 --dropout 0`,
        unmodified: pairs packed whole into --block-size blocks (two sequences each), --batch-size blocks per
        step; dropout off as DPOTrainer turns it off by default (disable_dropout=True).
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir  # noqa: E402
from _side_by_side import WORDS, compare, run_checked, run_ours, step_stamps, trl_result  # noqa: E402

sys.path.insert(0, str(REPO))

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


def ours(args, model_dir: Path, data_dir: Path, out: Path) -> dict:
    from finetune.data.dataset import load_meta
    from finetune.data.pairs import split_packing

    share = split_packing(data_dir, "train", args.block_size, load_meta(data_dir)).real_token_share
    # --dropout 0: DPOTrainer's default (disable_dropout=True); ours keeps the model's unless told
    return run_ours(args, REPO, model_dir, data_dir, out, ["--lr", str(HYPER["lr"]), "--weight-decay",
                    str(HYPER["weight_decay"]), "--scheduler", "constant", "--warmup-steps", "0", "--dropout", "0"],
                    share)


def trl_run(args, model_dir: Path, result: Path) -> None:
    """In this process: TRL's DPOTrainer on the same pairs."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stamp, stamps = step_stamps()
    processed, real = [], []

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
                              train_dataset=Dataset.from_list(make_pairs(args.pairs, args.seed)), callbacks=[stamp])
    trl_result(trainer, stamps, processed, real, result)


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
    heading = (f"model {args.model}, {args.precision}, ours: batch {args.batch_size} x block {args.block_size}; trl: "
               f"{args.trl_batch_size} pairs per step; {args.steps} steps (first {args.skip} left out), {args.pairs} "
               f"pairs, best of {args.rounds} rounds")
    compare(args, argv, __file__, lambda out: ours(args, model_dir, data_dir, out), root, heading)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
