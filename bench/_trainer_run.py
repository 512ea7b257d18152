"""The transformers.Trainer baseline, one run per process (so its memory is measured on its own).

    python bench/_trainer_run.py --model DIR --data-dir DIR --steps N --batch-size 4 --block-size 256
        --precision bf16|fp32 --result out.json

Same model folder, the same token blocks (dataset.TextDataset), batch, steps, optimizer settings as
finetune_generative.py's defaults (the Trainer's default AdamW, lr 5e-5, betas 0.9/0.999, eps 1e-8, weight decay 0.01,
linear schedule with ceil(5% of steps) warmup, clip 1.0). No evaluation, no saving, logging_steps huge.
A callback stamps the end of every optimizer step; the result JSON holds the per-step seconds.
`--exit-after-first-step` stops the process right after the first optimizer step (start-up benchmark).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--output-dir", required=True, help="Trainer's output_dir (nothing is saved there)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16", "default"], default="default",
                   help="default = the Trainer's own default (fp32)")
    p.add_argument("--optim", default=None,
                   help="TrainingArguments.optim (default: the Trainer's own, adamw_torch_fused in transformers 5)")
    p.add_argument("--workers", type=int, default=0, help="dataloader_num_workers (Trainer default 0)")
    p.add_argument("--dropout", type=float, default=None, help="override the model's dropout (default: keep)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--lora-r", type=int, default=0, help="wrap the model with peft LoRA of this rank (0 = off)")
    p.add_argument("--lora-alpha", type=float, default=None, help="default 2 x r")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--result", required=True, help="JSON file to write")
    p.add_argument("--exit-after-first-step", action="store_true")
    args = p.parse_args()

    t_import = time.time()
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from dataset import TextDataset, load_meta

    if args.threads:
        torch.set_num_threads(args.threads)
    stamps: dict = {"import_s": time.time() - t_import, "step_end": []}

    def write_result(extra=None):
        import psutil
        proc = psutil.Process()
        out = {"kind": "trainer", "process_start": proc.create_time(), **stamps, **(extra or {})}
        Path(args.result).write_text(json.dumps(out))

    if args.exit_after_first_step:
        def first_step_hook(optimizer, a, kw):
            stamps["first_step_done"] = time.time()
            write_result()
            os._exit(0)
        from torch.optim.optimizer import register_optimizer_step_post_hook
        register_optimizer_step_post_hook(first_step_hook)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps["train_begin"] = time.time()

        def on_step_end(self, a, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps["step_end"].append(time.perf_counter())

    meta = load_meta(args.data_dir)
    train_set = TextDataset.from_data_dir(args.data_dir, "train", args.block_size, meta)
    kwargs = {}
    if args.dropout is not None:
        kwargs = {k: args.dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    # Every Trainer fine-tuning script loads the tokenizer (run_clm.py to tokenize and to save it with the
    # model); finetune_generative.py does too, so the start-up benchmark counts it on both sides.
    AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kwargs)
    if args.lora_r:  # the usual peft recipe: every linear layer of GPT-2's blocks, as finetune_generative.py
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                                                 lora_dropout=args.lora_dropout, bias="none", task_type="CAUSAL_LM",
                                                 target_modules=["c_attn", "c_proj", "c_fc"]))
    targs = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=5e-5, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        lr_scheduler_type="linear", warmup_steps=math.ceil(0.05 * args.steps), max_grad_norm=1.0,
        **({"optim": args.optim} if args.optim else {}),
        bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu",
        logging_steps=10**9, eval_strategy="no", save_strategy="no", report_to="none",
        dataloader_num_workers=args.workers, seed=args.seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=default_data_collator,
                      callbacks=[StepTimer()])
    t0 = time.perf_counter()
    trainer.train()
    stamps["train_s"] = time.perf_counter() - t0
    ends = stamps.pop("step_end")
    # step i's seconds = end(i) - end(i-1); the first step is timed from the start of train().
    steps = [ends[0] - t0] + [b - a for a, b in zip(ends, ends[1:])] if ends else []
    write_result({"step_seconds": steps, "tokens_per_step": args.batch_size * args.block_size,
                  "precision": args.precision, "torch_threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
