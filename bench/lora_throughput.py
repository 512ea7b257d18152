"""LoRA benchmarks (issue 12): speed against full fine-tuning and peft + Trainer; bigger models' memory.

    python bench/lora_throughput.py speed --steps 8 --skip 2     # GPT-2 124M, bf16, 4 x 256
    python bench/lora_throughput.py sizes --steps 3              # gpt2-medium/large/xl, LoRA, 1 x 512

speed: three contenders, alternated in one invocation (full, lora, peft_trainer, full, ...), each its own
subprocess (peak RSS = the kernel's high-water mark of that process):
  full          finetune_generative.py, full fine-tuning (as bench/train_throughput.py runs it), with
                --num-workers 0 like the Trainer's default (a LoRA run with DataLoader workers was seen to
                hang at exit on 124M: see the README)
  lora          the same command plus --lora-r R (alpha 2R, dropout 0.05, every block linear)
  peft_trainer  bench/_trainer_run.py --lora-r R: transformers.Trainer on a peft model with the same LoRA
                config, bf16=True, no eval, no save
tokens/s over the steps after the first --skip (ours: metrics.jsonl's per-step times; Trainer: a callback).

sizes: for each architecture (random weights built locally from ../shared/gpt2-tokenizer's config with
n_layer/n_embd/n_head changed), first `--dry-run` with LoRA and with full fine-tuning (what the plan
predicts, and whether it says the run will not fit this machine), then one LoRA run of --steps steps at
batch 1 x 512: its peak RSS (including writing the merged final model) and tokens/s. Full fine-tuning of
these sizes is only planned, never run (gpt2-xl's would end in the OOM killer).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402
from _common import (  # noqa: E402
    DEFAULT_TOKENIZER_DIR,
    REPO,
    build_model_dir,
    loadavg,
    run_polled,
    steady_tokens_per_s,
    tail,
    write_data_dir,
)

SIZES = ("gpt2-medium", "gpt2-large", "gpt2-xl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["speed", "sizes"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--work-dir", default="/tmp/finetune-bench")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def speed(args) -> dict:
    base = tt.parse_args(["--model", "gpt2", "--precision", "bf16", "--steps", str(args.steps), "--batch-size", "4",
                          "--block-size", "256", "--work-dir", args.work_dir, "--num-workers", "0"])
    work = Path(args.work_dir)
    model_dir = build_model_dir("gpt2", work, DEFAULT_TOKENIZER_DIR)
    data_dir = write_data_dir(work / "data-gpt2", model_dir)
    runs = work / "lora-runs"
    rows = []
    for round_no in range(1, args.rounds + 1):
        for name in ("full", "lora", "peft_trainer"):
            out = runs / f"{name}-{round_no}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            if name == "peft_trainer":
                cmd = [*tt.trainer_command(base, model_dir, data_dir, out / "trainer-out", out / "result.json"),
                       "--lora-r", str(args.lora_r)]
            else:
                base.ours_args = f"--lora-r {args.lora_r}" if name == "lora" else ""
                cmd, _ = tt.ours_command(base, model_dir, data_dir, out / "run", patched=False)
            polled = run_polled(cmd, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                                log_path=runs / f"{name}-{round_no}.log", timeout=1800)
            if polled["rc"] != 0:
                print(f"{name} FAILED:\n{tail(runs / f'{name}-{round_no}.log')}", flush=True)
                continue
            seconds = (json.loads((out / "result.json").read_text())["step_seconds"] if name == "peft_trainer"
                       else tt.ours_step_seconds(out / "run"))
            tps, _ = steady_tokens_per_s(seconds, 4 * 256, args.skip)
            rows.append({"contender": name, "round": round_no, "tokens_per_s": tps, "step_seconds": seconds,
                         "command": " ".join(cmd), **polled})
            print(f"- {name} round {round_no}: {tps:.0f} tok/s, peak RSS {polled['peak_rss_mib']:.0f} MiB, "
                  f"load {polled['load_before']:.1f} -> {polled['load_after']:.1f}, other processes "
                  f"{100 * polled['foreign_cpu_share']:.0f}% of the CPUs", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for name in ("full", "lora", "peft_trainer"):
        good = [r for r in rows if r["contender"] == name]
        if good:
            summary[name] = {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in good),
                             "peak_rss_mib": max(r["peak_rss_mib"] for r in good)}
    print("\ncontender     tok/s  peak RSS MiB")
    for name, s in summary.items():
        print(f"{name:12s} {s['tokens_per_s']:6.0f}  {s['peak_rss_mib']:12.0f}")
    if {"full", "lora", "peft_trainer"} <= summary.keys():
        print(f"lora / full = {summary['lora']['tokens_per_s'] / summary['full']['tokens_per_s']:.2f}x, "
              f"lora / peft_trainer = {summary['lora']['tokens_per_s'] / summary['peft_trainer']['tokens_per_s']:.2f}x")
    return {"rows": rows, "summary": summary}


def dry_run(model_dir, data_dir, extra: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "finetune_generative.py"), "--model", str(model_dir), "--data-dir",
           str(data_dir), "--output-dir", "/tmp/finetune-bench/dry", "--batch-size", "1", "--block-size", "512",
           "--precision", "bf16", "--device", "cpu", "--dry-run", *extra]
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    estimate = re.search(r"memory estimate  ~([\d.]+) GiB", result.stdout)
    return {"command": " ".join(cmd), "rc": result.returncode, "seconds": time.perf_counter() - started,
            "estimate_gib": float(estimate.group(1)) if estimate else None,
            "will_not_fit": "it will not fit" in result.stdout,
            "lines": [line for line in result.stdout.splitlines() if line.startswith(("LoRA", "memory", "      "))]}


def sizes(args) -> dict:
    work = Path(args.work_dir)
    results = {}
    for name in args.sizes.split(","):
        t0 = time.perf_counter()
        model_dir = build_model_dir(name, work, DEFAULT_TOKENIZER_DIR)
        data_dir = write_data_dir(work / f"data-{name}", model_dir)
        print(f"{name}: model folder ready in {time.perf_counter() - t0:.0f} s", flush=True)
        plans = {"lora": dry_run(model_dir, data_dir, ["--lora-r", str(args.lora_r)]), "full": dry_run(model_dir, data_dir, [])}
        for kind, plan in plans.items():
            print(f"  dry-run {kind}: estimate {plan['estimate_gib']} GiB, will not fit: {plan['will_not_fit']} "
                  f"({plan['seconds']:.0f} s, nothing loaded)\n    " + "\n    ".join(plan["lines"]), flush=True)
        out = work / f"lora-{name}"
        cmd = [sys.executable, str(REPO / "finetune_generative.py"), "--model", str(model_dir), "--data-dir",
               str(data_dir), "--output-dir", str(out), "--overwrite", "--lora-r", str(args.lora_r),
               "--batch-size", "1", "--block-size", "512", "--max-steps", str(args.steps), "--log-every", "1",
               "--eval-every", "0", "--eval-batches", "1", "--save-every", "0", "--precision", "bf16",
               "--device", "cpu", "--num-workers", "0"]
        polled = run_polled(cmd, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"), log_path=work / f"lora-{name}.log",
                            timeout=3600)
        row = {"command": " ".join(cmd), **polled, "plans": plans}
        if polled["rc"] == 0:
            seconds = tt.ours_step_seconds(out)
            row["step_seconds"] = seconds
            row["tokens_per_s"], _ = steady_tokens_per_s(seconds, 512, min(args.skip, len(seconds) - 1))
            print(f"  LoRA run: {row['tokens_per_s']:.0f} tok/s (steps {', '.join(f'{s:.1f}' for s in seconds)} s), "
                  f"peak RSS {polled['peak_rss_mib'] / 1024:.2f} GiB vs estimate {plans['lora']['estimate_gib']} GiB, "
                  f"wall {polled['wall_s']:.0f} s, load {polled['load_before']:.1f} -> {polled['load_after']:.1f}",
                  flush=True)
        else:
            print(f"  LoRA run FAILED (rc {polled['rc']}):\n{tail(work / f'lora-{name}.log')}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        results[name] = row
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"load average {loadavg():.2f}, {os.cpu_count()} CPUs", flush=True)
    result = speed(args) if args.what == "speed" else sizes(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **({"sizes": result} if args.what == "sizes"
                                                                      else result)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
