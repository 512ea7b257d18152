"""Training throughput: finetune_generative.py against a transformers.Trainer baseline.

    python bench/train_throughput.py                         # 124M, bf16 vs bf16, 30 steps, 2 rounds
    python bench/train_throughput.py --precision fp32        # fp32 vs fp32
    python bench/train_throughput.py --precision defaults    # ours with no flag (auto) vs Trainer defaults
    python bench/train_throughput.py --model small --steps 100
    python bench/train_throughput.py --contenders ours,patched --patches old_gelu   # what one lever buys
    python bench/train_throughput.py --precision defaults --contenders ours,ours_fp32   # auto vs --precision fp32

Each contender runs as its own subprocess (so its peak memory is its own), and the contenders ALTERNATE
(ours, trainer, ours, trainer, ...) so that drift in the machine's speed hits both alike. Everything is
the same for both: the model folder (random weights), the token blocks, batch, steps, precision, AdamW
settings (lr 5e-5, betas 0.9/0.999, eps 1e-8, weight decay 0.01, linear schedule, 5% warm-up, clip 1.0),
and the model's own dropout (unless --dropout).

  ours      `python finetune_generative.py --max-steps N --log-every 1 --eval-every 0 --save-every 0`:
            the script itself, unmodified. Its per-step seconds come from metrics.jsonl's tokens_per_s
            (time to fetch the batch, forward, backward, clip, step; evaluation and saving excluded).
            It still evaluates at step 0 and at the end and saves at the end: the val split is tiny
            (8 blocks) and the wall time column includes all of it.
  trainer   bench/_trainer_run.py: transformers.Trainer with its default optimizer (adamw_torch_fused),
            bf16=True or fp32, no eval,
            no save, logging_steps huge; a callback stamps the end of each optimizer step.
  patched   bench/_ours_patched.py: ours with the levers named by --patches switched (see that file).
  baseline  the finetune_generative.py of another checkout (--baseline-repo), same flags: before/after a
            change, side by side in one invocation.
  ours_fp32 ours with `--precision fp32` added last: with `--precision defaults`, what `auto` chose on this
            machine against fp32, side by side (auto must never be the slower one).

Steady-state tokens/s = batch x block x (measured steps) / (their summed seconds), the first --skip
steps (warm-up, torch.compile) left out. MFU = tokens/s x training FLOPs per token / the matmul peak this
script measures on this machine with torch (best of a few square sizes); FLOPs per token are
6 N + 12 n_layer n_embd seq (N = parameters without position embeddings). Peak memory is polled every
0.2 s: RSS of the main process, and main RSS + USS of its child processes (DataLoader workers).

Durations on the 2-core CPU this was written on (no other load): 124M bf16 ~1.5-2.5 s per step,
fp32 ~4-8 s per step, so the defaults (30 steps, 2 rounds of each contender) take about 8 minutes for
bf16 and about 15 for fp32. Use --steps for longer runs (a few hundred steps for the issue's goals).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_TOKENIZER_DIR,
    REPO,
    build_model_dir,
    count_params,
    matmul_peak,
    model_gemm_peak,
    run_polled,
    steady_tokens_per_s,
    tail,
    training_flops_per_token,
    wait_for_quiet,
    write_data_dir,
)

PRECISIONS = {
    # name: (flags for ours, --precision for the Trainer runner, precision whose matmul peak applies)
    "bf16": (["--precision", "bf16"], "bf16", "bf16"),
    "fp32": (["--precision", "fp32"], "fp32", "fp32"),
    "defaults": ([], "default", None),  # ours: auto (bf16 where the CPU/GPU has it); Trainer: fp32
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=["gpt2", "small"],
                   help="gpt2 = the 124M architecture; small = 6 layers x 384 wide (GPT-2 vocabulary)")
    p.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                   help="bf16 vs bf16, fp32 vs fp32, or each side's defaults")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of tokens/s (warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each contender, alternating")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dropout", type=float, default=None, help="override the model's dropout, both sides")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--contenders", default="ours,trainer",
                   help="comma list of ours, trainer, patched (patched = ours + --patches), baseline, ours_fp32 "
                        "(ours + --precision fp32)")
    p.add_argument("--patches", default="",
                   help="levers switched for the 'patched' contender (see bench/_ours_patched.py)")
    p.add_argument("--baseline-repo", default=None,
                   help="checkout whose finetune_generative.py the 'baseline' contender runs (before/after a change)")
    p.add_argument("--ours-args", default="",
                   help="extra flags for finetune_generative.py (ours and patched); write --ours-args=--compile")
    p.add_argument("--num-workers", type=int, default=None,
                   help="ours' --num-workers (default: the script's default)")
    p.add_argument("--trainer-optim", default=None,
                   help="TrainingArguments.optim (default: the Trainer's own default, adamw_torch_fused)")
    p.add_argument("--trainer-workers", type=int, default=0, help="Trainer dataloader_num_workers")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for every contender (default: torch's choice = cores)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="use this bf16 peak (TFLOP/s) instead of measuring one (e.g. 989 for an H100/H200)")
    p.add_argument("--datasheet-tflops", type=float, default=None,
                   help="also report MFU against this bf16 peak (TFLOP/s), e.g. 989 for an H200/H100 SXM")
    p.add_argument("--matmul-seconds", type=float, default=3.0, help="time spent measuring the matmul peak")
    p.add_argument("--tokenizer-dir", default=str(DEFAULT_TOKENIZER_DIR),
                   help="GPT-2 tokenizer + config folder (absent: GPT2Config() and a stand-in tokenizer)")
    p.add_argument("--work-dir", default="/tmp/finetune-bench", help="models, data and run folders (reused)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    p.add_argument("--wait-quiet", type=float, default=60,
                   help="before each run, wait up to this many seconds for other processes to go quiet")
    p.add_argument("--max-foreign", type=float, default=0.10,
                   help="a run during which other processes used more than this share of the CPUs is "
                        "repeated (up to --retries times); the share is reported either way")
    p.add_argument("--retries", type=int, default=1, help="repeats of a contended run")
    return p.parse_args(argv)


def ours_command(args, model_dir, data_dir, out_dir, patched: bool, repo: Path = REPO) -> tuple[list[str], dict]:
    script = [str(REPO / "bench" / "_ours_patched.py")] if patched else [str(repo / "finetune_generative.py")]
    cmd = [sys.executable, *script, "--model", str(model_dir), "--data-dir", str(data_dir),
           "--output-dir", str(out_dir), "--overwrite", "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
           "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--save-total-limit", "1",
           "--device", args.device, *PRECISIONS[args.precision][0]]
    if args.dropout is not None:
        cmd += ["--dropout", str(args.dropout)]
    if args.num_workers is not None:
        cmd += ["--num-workers", str(args.num_workers)]
    cmd += shlex.split(args.ours_args)
    env = dict(os.environ)
    if patched:
        env["BENCH_PATCHES"] = args.patches
    return cmd, env


def trainer_command(args, model_dir, data_dir, out_dir, result) -> list[str]:
    cmd = [sys.executable, str(REPO / "bench" / "_trainer_run.py"), "--model", str(model_dir),
           "--data-dir", str(data_dir), "--output-dir", str(out_dir), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
           "--precision", PRECISIONS[args.precision][1],
           *(["--optim", args.trainer_optim] if args.trainer_optim else []),
           "--workers", str(args.trainer_workers), "--device", args.device, "--result", str(result)]
    if args.dropout is not None:
        cmd += ["--dropout", str(args.dropout)]
    return cmd


def ours_step_seconds(out_dir: Path) -> list[float]:
    """Seconds of each optimizer step, from metrics.jsonl (run with --log-every 1)."""
    seconds, previous_tokens = [], 0
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train" and record.get("tokens_per_s"):
            seconds.append((record["tokens"] - previous_tokens) / record["tokens_per_s"])
            previous_tokens = record["tokens"]
    return seconds


def resolved_precision(log_path: Path) -> str | None:
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if " precision " in line and "device " in line:
            return line.split(" precision ")[1].split(",")[0].strip()
    return None


def run_one(args, name, round_no, model_dir, data_dir, runs_dir) -> dict:
    out_dir = runs_dir / f"{name}-{round_no}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    log_path = runs_dir / f"{name}-{round_no}.log"
    env = dict(os.environ)
    if name == "trainer":
        result = out_dir / "result.json"
        cmd = trainer_command(args, model_dir, data_dir, out_dir / "trainer-out", result)
    elif name == "baseline":  # the same script from another checkout (e.g. before a refactoring)
        cmd, env = ours_command(args, model_dir, data_dir, out_dir / "run", patched=False,
                                repo=Path(args.baseline_repo))
    else:
        cmd, env = ours_command(args, model_dir, data_dir, out_dir / "run", patched=name == "patched")
        if name == "ours_fp32":
            cmd += ["--precision", "fp32"]  # the last --precision wins
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    polled = run_polled(cmd, env=env, log_path=log_path, timeout=args.timeout)
    row = {"contender": name, "round": round_no, "command": " ".join(shlex.quote(c) for c in cmd), **polled}
    if polled["rc"] != 0:
        print(f"  {name} round {round_no} FAILED (rc {polled['rc']}); last lines of {log_path}:\n{tail(log_path)}",
              flush=True)
        row["step_seconds"] = []
        return row
    if name == "trainer":
        data = json.loads(result.read_text())
        row["step_seconds"] = data["step_seconds"]
        row["precision"] = "bf16" if PRECISIONS[args.precision][1] == "bf16" else "fp32"
    else:
        row["step_seconds"] = ours_step_seconds(out_dir / "run")
        row["precision"] = resolved_precision(log_path)
    tokens = args.batch_size * args.block_size
    row["tokens_per_s"], row["median_step_s"] = steady_tokens_per_s(row["step_seconds"], tokens, args.skip)
    row["tokens_per_s_median"] = tokens / row["median_step_s"]
    row["first_steps_s"] = row["step_seconds"][: args.skip]
    shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints of 124M are ~1.5 GB
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not contenders or set(contenders) - {"ours", "trainer", "patched", "baseline", "ours_fp32"}:
        raise SystemExit(f"--contenders must name ours, trainer, patched, baseline and/or ours_fp32, got "
                         f"{args.contenders!r}")
    if "baseline" in contenders and not (Path(args.baseline_repo or "") / "finetune_generative.py").is_file():
        raise SystemExit("the baseline contender needs --baseline-repo DIR, a checkout with finetune_generative.py "
                         "(e.g. `git worktree add /tmp/before <commit>`)")
    if args.skip >= args.steps:
        raise SystemExit("--skip must be smaller than --steps")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else None
    model_dir = build_model_dir(args.model, work, tok_dir)
    data_dir = write_data_dir(work / f"data-{args.model}", model_dir,
                              train_tokens=max(400_000, args.batch_size * args.block_size * (args.steps + 1)))
    n_params, n_no_pos = count_params(model_dir)
    flops_per_token, formula = training_flops_per_token(model_dir, args.block_size)

    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {args.threads or torch.get_num_threads()}, "
          f"device {args.device}", flush=True)
    if args.wait_quiet > 0:
        wait_for_quiet(args.wait_quiet)
    if args.peak_tflops:
        peak = {"bf16": args.peak_tflops * 1e3, "fp32": float("nan"), "source": "given"}
    else:
        peak = {**matmul_peak(args.device, args.matmul_seconds), "source": "measured"}
    tokens = args.batch_size * args.block_size
    from finetune.runtime.device import cpu_has_native_bf16  # defaults on a CPU without bf16: auto is fp32 (no probe)

    auto_is_fp32 = args.precision == "defaults" and args.device == "cpu" and not cpu_has_native_bf16()
    roof_precision = "fp32" if args.precision == "fp32" or auto_is_fp32 else "bf16"
    peak["gemm_roof_" + roof_precision] = model_gemm_peak(model_dir, tokens, args.device, roof_precision)
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters; {flops_per_token / 1e9:.3f} GFLOP per "
          f"trained token ({formula})", flush=True)
    print(f"matmul peak ({peak['source']}): bf16 {peak['bf16']:.0f} GFLOP/s, fp32 {peak['fp32']:.0f} GFLOP/s",
          flush=True)
    print(f"GEMM roof: this model's {roof_precision} matmuls at their real shapes ({tokens} rows) run at "
          f"{peak['gemm_roof_' + roof_precision]:.0f} GFLOP/s", flush=True)
    print(f"precision setting {args.precision}; batch {args.batch_size} x {args.block_size}; {args.steps} steps "
          f"per run, first {args.skip} excluded; {args.rounds} round(s) of {', '.join(contenders)}", flush=True)

    runs_dir = work / "runs"
    rows = []
    started = time.time()
    for round_no in range(1, args.rounds + 1):
        for name in contenders:
            for attempt in range(args.retries + 1):
                busy = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else float("nan")
                print(f"- round {round_no}: {name} ... (machine busy {100 * busy:.0f}% before start)", flush=True)
                row = run_one(args, name, round_no, model_dir, data_dir, runs_dir)
                if row["step_seconds"]:
                    print(f"  {row['tokens_per_s']:7.1f} tok/s steady (median-step {row['tokens_per_s_median']:.1f}), "
                          f"wall {row['wall_s']:.0f} s, precision {row['precision']}, peak RSS "
                          f"{row['peak_rss_mib']:.0f} MiB (polled with workers {row['peak_tree_mib']:.0f}), other "
                          f"processes used {100 * row['foreign_cpu_share']:.0f}% of the CPUs", flush=True)
                if row["rc"] != 0 or row["foreign_cpu_share"] <= args.max_foreign or attempt == args.retries:
                    break
                print(f"  contended (> {100 * args.max_foreign:.0f}%): repeating this run", flush=True)
            rows.append(row)

    summary = summarize(rows, contenders, flops_per_token, peak, args)
    print_summary(summary, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "peak_gflops": peak, "flops_per_token":
                                               flops_per_token, "formula": formula, "rows": rows,
                                               "summary": summary, "seconds": time.time() - started}, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


def summarize(rows, contenders, flops_per_token, peak, args) -> dict:
    out = {}
    for name in contenders:
        good = [r for r in rows if r["contender"] == name and r["step_seconds"]]
        if not good:
            continue
        tps = [r["tokens_per_s"] for r in good]
        precision = good[0]["precision"]
        matmul_precision = "bf16" if precision in ("bf16", "fp16") else "fp32"
        mean_tps = statistics.mean(tps)
        out[name] = {
            "precision": precision,
            "tokens_per_s": mean_tps, "tokens_per_s_runs": tps,
            "tokens_per_s_median_step": statistics.mean(r["tokens_per_s_median"] for r in good),
            "mfu_vs_bf16_peak": mean_tps * flops_per_token / (peak["bf16"] * 1e9),
            "mfu_vs_own_peak": mean_tps * flops_per_token / (peak[matmul_precision] * 1e9),
            "share_of_gemm_roof": (mean_tps * flops_per_token / (peak["gemm_roof_" + matmul_precision] * 1e9)
                                   if "gemm_roof_" + matmul_precision in peak else None),
            "max_foreign_cpu_share": max(r["foreign_cpu_share"] for r in good),
            "mfu_vs_datasheet": (mean_tps * flops_per_token / (args.datasheet_tflops * 1e12)
                                 if args.datasheet_tflops else None),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in good),
            "peak_tree_mib": max(r["peak_tree_mib"] for r in good),
            "wall_s": statistics.mean(r["wall_s"] for r in good),
            "first_step_s": statistics.mean(r["step_seconds"][0] for r in good),
        }
    if "ours" in out and "ours_fp32" in out:  # round by round: the runs of a round ran next to each other
        by_round = {(r["contender"], r["round"]): r["tokens_per_s"] for r in rows if r["step_seconds"]}
        out["ours"]["ratio_vs_fp32_rounds"] = [by_round[("ours", n)] / by_round[("ours_fp32", n)]
                                               for n in range(1, args.rounds + 1)
                                               if ("ours", n) in by_round and ("ours_fp32", n) in by_round]
        out["ours"]["ratio_vs_fp32"] = out["ours"]["tokens_per_s"] / out["ours_fp32"]["tokens_per_s"]
    if "trainer" in out:
        for name in out:
            if name != "trainer":
                out[name]["ratio_vs_trainer"] = out[name]["tokens_per_s"] / out["trainer"]["tokens_per_s"]
                out[name]["ratio_vs_trainer_median_step"] = (out[name]["tokens_per_s_median_step"]
                                                              / out["trainer"]["tokens_per_s_median_step"])
    return out


def print_summary(summary, args) -> None:
    print(f"\nsummary: model {args.model}, precision setting {args.precision}, batch {args.batch_size} x "
          f"{args.block_size}, {args.steps} steps (first {args.skip} excluded), {args.rounds} round(s)")
    header = (f"{'contender':9s} {'prec':5s} {'tok/s':>8s} {'(runs)':>16s} {'median-step tok/s':>17s} {'vs Trainer':>10s} "
              f"{'MFU(bf16 pk)':>12s} {'MFU(own pk)':>11s} {'peak RSS MiB':>12s} {'+workers':>8s} {'wall s':>7s}")
    print(header)
    for name, s in summary.items():
        ratio = f"{s['ratio_vs_trainer']:.2f}x" if "ratio_vs_trainer" in s else "-"
        runs = "/".join(f"{t:.0f}" for t in s["tokens_per_s_runs"])
        print(f"{name:9s} {s['precision'] or '?':5s} {s['tokens_per_s']:8.1f} {runs:>16s} "
              f"{s['tokens_per_s_median_step']:17.1f} {ratio:>10s} {100 * s['mfu_vs_bf16_peak']:11.1f}% "
              f"{100 * s['mfu_vs_own_peak']:10.1f}% {s['peak_rss_mib']:12.0f} {s['peak_tree_mib']:8.0f} "
              f"{s['wall_s']:7.0f}")
    if "ratio_vs_fp32" in summary.get("ours", {}):
        rounds = ", ".join(f"{r:.2f}x" for r in summary["ours"]["ratio_vs_fp32_rounds"])
        print(f"ours ({summary['ours']['precision']}) vs ours --precision fp32: {summary['ours']['ratio_vs_fp32']:.2f}x "
              f"(round by round: {rounds})")
    for name, s in summary.items():
        roof = f"{100 * s['share_of_gemm_roof']:.0f}% of the GEMM roof" if s["share_of_gemm_roof"] else ""
        print(f"{name}: {roof}; other processes used up to {100 * s['max_foreign_cpu_share']:.0f}% of the CPUs "
              f"during its runs")
    if args.datasheet_tflops:
        for name, s in summary.items():
            print(f"{name}: MFU against the {args.datasheet_tflops:g} TFLOP/s datasheet bf16 peak: "
                  f"{100 * s['mfu_vs_datasheet']:.1f}%")


if __name__ == "__main__":
    sys.exit(main())
