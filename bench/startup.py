"""Start-up time: seconds from process start to the end of the first optimizer step, ours vs Trainer.

    python bench/startup.py                    # 124M, bf16, 3 alternating rounds
    python bench/startup.py --model small --precision fp32 --rounds 5

Both sides are timed the same way: a global torch optimizer-step hook (registered before anything else
is imported) writes the wall-clock time of the first completed optimizer step and ends the process;
the start is the process's creation time from the kernel (psutil), so interpreter start and every import
count. Runs alternate (ours, trainer, ours, ...).

What each side does before its first step:
  ours     `finetune_generative.main()` (via bench/_ours_patched.py, which adds the hook; --ours-patches
           no_eval0 leaves out the step-0 evaluation): parse + validate flags, read meta.json, tokenizer
           and config, load the weights, build AdamW + schedule, open the training DataLoader (2 worker
           processes by default), write the plan, evaluate the base model on the validation blocks (step
           0: here all 8; on real data the evaluation subset the plan prints), then one training step.
  trainer  bench/_trainer_run.py: import transformers.Trainer, load the tokenizer (as every Trainer script
           does) and the same weights, build TrainingArguments + Trainer (accelerate state), then
           trainer.train() up to its first step. No evaluation before training.

With --full, also the wall time of a complete `--max-steps 1` run of each, which adds for ours the
final evaluation and the writing of checkpoint-1/, best/ and the final model (~1.5 GB for 124M), and for
the Trainer only its end-of-training bookkeeping (it saves nothing with save_strategy="no").
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_TOKENIZER_DIR, REPO, build_model_dir, loadavg, run_polled, tail, write_data_dir  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=["gpt2", "small"])
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "defaults"],
                   help="defaults = ours with no flag (auto) vs the Trainer's default (fp32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ours-args", default="", help="extra flags for finetune_generative.py; write --ours-args=--compile")
    p.add_argument("--ours-patches", default="",
                   help="BENCH_PATCHES for ours, e.g. no_eval0 to time it without the step-0 evaluation")
    p.add_argument("--full", action="store_true", help="also time complete --max-steps 1 runs")
    p.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR))
    p.add_argument("--work-dir", default="/tmp/finetune-bench")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def commands(args, name, model_dir, data_dir, out_dir, probe: Path | None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if name == "ours":
        script = "bench/_ours_patched.py" if probe else "finetune_generative.py"
        cmd = [sys.executable, str(REPO / script), "--model", str(model_dir), "--data-dir", str(data_dir),
               "--output-dir", str(out_dir), "--overwrite", "--max-steps", "1", "--batch-size",
               str(args.batch_size), "--block-size", str(args.block_size), "--eval-every", "0",
               "--save-every", "0", "--device", args.device, *shlex.split(args.ours_args)]
        if args.precision != "defaults":
            cmd += ["--precision", args.precision]
        if probe:
            env["BENCH_FIRST_STEP_RESULT"] = str(probe)
            env["BENCH_PATCHES"] = args.ours_patches
    else:
        cmd = [sys.executable, str(REPO / "bench" / "_trainer_run.py"), "--model", str(model_dir),
               "--data-dir", str(data_dir), "--output-dir", str(out_dir), "--steps", "1",
               "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
               "--precision", "default" if args.precision == "defaults" else args.precision,
               "--device", args.device, "--result", str(probe or out_dir / "result.json")]
        if probe:
            cmd.append("--exit-after-first-step")
    return cmd, env


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.model, work, Path(args.tokenizer_dir) if args.tokenizer_dir else None)
    data_dir = write_data_dir(work / f"data-{args.model}", model_dir)
    runs = work / "startup-runs"
    runs.mkdir(exist_ok=True)
    # Touch the files once so that neither side pays for a cold page cache.
    for path in model_dir.iterdir():
        path.read_bytes()

    results = {"ours": [], "trainer": []}
    full = {"ours": [], "trainer": []}
    print(f"model {args.model}, precision setting {args.precision}, batch {args.batch_size} x {args.block_size}, "
          f"{args.rounds} round(s)", flush=True)
    for round_no in range(1, args.rounds + 1):
        for name in ("ours", "trainer"):
            out_dir = runs / f"{name}-{round_no}"
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            probe = out_dir / "first-step.json"
            cmd, env = commands(args, name, model_dir, data_dir, out_dir / "run", probe)
            load = loadavg()
            polled = run_polled(cmd, env=env, log_path=out_dir / "log.txt")
            if not probe.is_file():
                print(f"  {name} round {round_no}: no first step (rc {polled['rc']}):\n{tail(out_dir / 'log.txt')}")
                continue
            data = json.loads(probe.read_text())
            seconds = data["first_step_done"] - data["process_start"]
            results[name].append(seconds)
            print(f"- round {round_no} {name:7s}: first optimizer step done {seconds:5.1f} s after process start "
                  f"(peak RSS {polled['peak_rss_mib']:.0f} MiB, load {load:.2f})", flush=True)
            if args.full:
                cmd, env = commands(args, name, model_dir, data_dir, out_dir / "full", None)
                polled = run_polled(cmd, env=env, log_path=out_dir / "full-log.txt")
                full[name].append(polled["wall_s"])
                print(f"  {name:7s} complete --max-steps 1 run: {polled['wall_s']:.1f} s (rc {polled['rc']})",
                      flush=True)
            shutil.rmtree(out_dir / "run", ignore_errors=True)
            shutil.rmtree(out_dir / "full", ignore_errors=True)

    print("\nsummary (seconds, median of rounds)")
    summary = {}
    for name in ("ours", "trainer"):
        if results[name]:
            summary[name] = {"first_step_s": statistics.median(results[name]), "runs": results[name]}
            if full[name]:
                summary[name]["full_run_s"] = statistics.median(full[name])
            print(f"{name:7s} to first step {summary[name]['first_step_s']:6.1f}  (runs "
                  f"{', '.join(f'{s:.1f}' for s in results[name])})"
                  + (f"; complete 1-step run {summary[name]['full_run_s']:.1f}" if full[name] else ""))
    if len(summary) == 2:
        ratio = summary["ours"]["first_step_s"] / summary["trainer"]["first_step_s"]
        print(f"ours / trainer = {ratio:.2f} (below 1: ours starts faster)")
        summary["ratio"] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "full": full}, indent=1))
    return 0 if len(summary) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
