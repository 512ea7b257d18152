"""Training throughput on chat data: finetune_generative.py (packed blocks) against TRL's SFTTrainer with
packing, side by side, and the share of the processed tokens that are real (not padding).

    python bench/chat_throughput.py                          # "small" GPT-2 (6 x 384), bf16, 30 steps
    python bench/chat_throughput.py --model gpt2 --precision fp32 --steps 50
    python bench/chat_throughput.py --conversations 2000 --block-size 1024 --batch-size 4

The data. --conversations conversations (seed --seed) of mixed lengths, made from a fixed list of English
words: a system turn in 30 % of them, 1 to 4 user/assistant exchanges, each user message 3-40 words and
each reply a log-normal number of words (median 40, clipped to 2-400), so conversations run from about
20 to about 1,500 tokens, some longer than the block (truncated by both tools). They are rendered with
the template below (GPT-2 has none; eos ends each turn, no token is added) and written as a chat data
folder (token files + masks, docs/chat.md) by the tests' writer (tests/helpers.py, write_chat_data); the same conversations go to
TRL as a "messages" dataset with assistant_only_loss=True, so both train the same replies.

The contenders, each in its own process, alternating rounds (ours, trl, ours, trl, ...):
  ours  `python finetune_generative.py --max-steps N --log-every 1 --eval-every 0 --save-every 0`, unmodified:
        best-fit-decreasing packing of whole examples into --block-size blocks, --batch-size blocks per step.
        Per-step seconds from metrics.jsonl (tokens_per_s counts the blocks' tokens, padding included).
  trl   trl.SFTTrainer, packing=True (its default "bfd" strategy, padding-free: a batch is flattened into
        one row of real tokens, position_ids restart per example), max_length = --block-size,
        per_device_train_batch_size = --batch-size, the same optimizer settings (fused AdamW, lr 5e-5,
        weight decay 0.01, linear schedule, 5 % warmup, clip 1.0) and precision. A callback stamps each step.

Reported per contender: seconds per step (steady state, the first --skip steps left out), real tokens per
second (the example tokens trained on per second, the number to compare: the two tools put different
numbers of tokens in a step), processed tokens per second (padding included), and the real share of the
processed tokens. Timings are only meaningful on a quiet machine.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir  # noqa: E402
from _side_by_side import WORDS, compare, run_ours, step_stamps, trl_result  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from helpers import TEST_TEMPLATE, write_chat_data  # noqa: E402  (the tests' chat-data writer and template)

HYPER = dict(lr=5e-5, weight_decay=0.01, max_grad_norm=1.0)  # and warmup: ceil(5 % of the steps)


def make_conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": words(rng.randint(3, 15))}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": words(rng.randint(3, 40))})
            reply = min(400, max(2, round(rng.lognormvariate(math.log(40), 0.8))))
            messages.append({"role": "assistant", "content": words(reply)})
        conversations.append(messages)
    return conversations


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="bench/_common.py MODELS name (random weights)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the steady state")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--work-dir", default=str(REPO / "bench" / "runs" / "chat"))
    p.add_argument("--trl-run", metavar="RESULT", help=argparse.SUPPRESS)  # internal: one TRL run in this process
    return p.parse_args(argv)


def warmup_steps(args) -> int:
    return math.ceil(0.05 * args.steps)


def build_data(args, model_dir: Path, root: Path) -> Path:
    from transformers import AutoTokenizer


    folder = root / f"data-{args.conversations}-{args.seed}"
    if not (folder / "meta.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        val = make_conversations(max(8, args.conversations // 50), args.seed + 1)
        write_chat_data(folder, tokenizer, make_conversations(args.conversations, args.seed), val, TEST_TEMPLATE)
    return folder


def ours(args, model_dir: Path, data_dir: Path, out: Path) -> dict:
    from finetune.data.dataset import load_meta
    from finetune.data.packing import split_packing

    share = split_packing(data_dir, "train", args.block_size, load_meta(data_dir)).real_token_share
    return run_ours(args, REPO, model_dir, data_dir, out, ["--lr", str(HYPER["lr"]), "--warmup-steps",
                    str(warmup_steps(args))], share)


def trl_run(args, model_dir: Path, data_dir: Path, result: Path) -> None:
    """In this process: TRL's SFTTrainer with packing on the same conversations."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEST_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stamp, stamps = step_stamps()
    processed = []

    config = trl.SFTConfig(
        output_dir=str(result.parent / "trl-out"), packing=True, assistant_only_loss=True, max_length=args.block_size,
        per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=HYPER["lr"],
        weight_decay=HYPER["weight_decay"], warmup_steps=warmup_steps(args), max_grad_norm=HYPER["max_grad_norm"],
        lr_scheduler_type="linear", optim="adamw_torch_fused", bf16=args.precision == "bf16", logging_steps=10**9,
        save_strategy="no", report_to="none", use_cpu=args.device == "cpu", dataloader_num_workers=2,
        seed=args.seed, disable_tqdm=True, gradient_checkpointing=False)  # SFTConfig's default is True; ours is off
    dataset = Dataset.from_list([{"messages": m} for m in make_conversations(args.conversations, args.seed)])
    class CountingTrainer(trl.SFTTrainer):
        """Counts the tokens of each batch where it is used (the collator runs in the DataLoader workers)."""

        def compute_loss(self, model, inputs, *args, **kwargs):
            processed.append(int(inputs["input_ids"].numel()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = CountingTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset,
                              callbacks=[stamp])
    # padding-free: every processed token is an example's (the flattened batch has no padding rows)
    trl_result(trainer, stamps, processed, processed, result)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    root = Path(args.work_dir)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, root)
    data_dir = build_data(args, model_dir, root)
    if args.trl_run:
        trl_run(args, model_dir, data_dir, Path(args.trl_run))
        return 0
    heading = (f"model {args.model}, {args.precision}, batch {args.batch_size} x block {args.block_size}, {args.steps} "
               f"steps (first {args.skip} left out), {args.conversations} conversations, best of {args.rounds} rounds")
    compare(args, argv, __file__, lambda out: ours(args, model_dir, data_dir, out), root, heading)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
