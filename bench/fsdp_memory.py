"""FSDP vs DDP (issue 22): 2-process full fine-tuning of gpt2-medium (random weights) on CPU with gloo.

    python bench/fsdp_memory.py --steps 6 --skip 2        # ~355M parameters, fp32, 1 x 256 per process

Each contender is one `torchrun --nproc_per_node 2 finetune_generative.py` run (DDP: plain torchrun; FSDP:
the same command plus --fsdp), alternated --rounds times. Per process it reports the peak RSS (the kernel's
high-water mark, VmHWM, of each worker, polled until it exits: loading, training, the end-of-run checkpoint
and the final model included) and tokens/s over the steps after the first --skip (metrics.jsonl). It also
prints what the weights + gradients + AdamW state take per process by construction (16 B/param for DDP,
16 B/param / 2 for FSDP), the share the peak RSS is expected to lose.
gloo on one host moves every all-gather and reduce-scatter through shared memory: the tokens/s ratio is
overhead, not a goal.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir, count_params, vm_hwm_mib, write_data_dir  # noqa: E402


def run_contender(name: str, model_dir: Path, data_dir: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "finetune_generative.py"), "--model", str(model_dir), "--data-dir", str(data_dir),
           "--output-dir", str(out), "--overwrite", "--block-size", str(args.block_size), "--batch-size",
           str(args.batch_size), "--max-steps", str(args.steps), "--precision", "fp32", "--device", "cpu",
           "--num-workers", "0", "--log-every", "1", "--eval-every", "0", "--eval-batches", "1",
           "--save-every", "0", "--dropout", "0", *(["--fsdp"] if name == "fsdp" else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out.parent / f"{name}.log", "w"), env=env)
    peaks: dict[int, float] = {}
    while launcher.poll() is None:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss = vm_hwm_mib(child.pid) if rank is not None else None
            if rss is not None:
                peaks[int(rank)] = max(peaks.get(int(rank), 0.0), rss)
        time.sleep(0.2)
    if launcher.returncode != 0:
        raise SystemExit(f"{name} failed (exit {launcher.returncode}); see {out.parent / f'{name}.log'}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if r["kind"] == "train" and r["step"] > args.skip]
    return {"peak_rss_mib": [peaks[r] for r in sorted(peaks)], "tokens_per_s": statistics.median(speeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2-medium")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="OMP_NUM_THREADS per process")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-fsdp")
    args = parser.parse_args()

    model_dir = build_model_dir(args.model, args.work_dir)
    data_dir = write_data_dir(args.work_dir / "data", model_dir, train_tokens=200_000)
    n_params, _ = count_params(model_dir)
    results: dict[str, list[dict]] = {"ddp": [], "fsdp": []}
    for round_no in range(1, args.rounds + 1):
        for name in results:
            result = run_contender(name, model_dir, data_dir, args.work_dir / f"out-{name}", args)
            results[name].append(result)
            print(f"- {name} round {round_no}: {result['tokens_per_s']:.0f} tok/s, peak RSS per process "
                  f"{', '.join(f'{m:.0f}' for m in result['peak_rss_mib'])} MiB", flush=True)
    state_mib = {"ddp": 16 * n_params / 2**20, "fsdp": 16 * n_params / 2 / 2**20}
    print(f"\n{args.model}: {n_params / 1e6:.1f}M parameters, 2 processes, fp32, {args.batch_size} x "
          f"{args.block_size} per process, {args.steps} steps, OMP_NUM_THREADS={args.threads}")
    print("engine  peak RSS rank 0  rank 1 MiB  weights+grads+AdamW per process MiB  tokens/s")
    for name, runs in results.items():
        rss = [max(r["peak_rss_mib"][rank] for r in runs) for rank in (0, 1)]
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        print(f"{name:6s}  {rss[0]:15.0f}  {rss[1]:10.0f}  {state_mib[name]:35.0f}  {tps:8.0f}")
    ratio = (statistics.median(r["tokens_per_s"] for r in results["fsdp"])
             / statistics.median(r["tokens_per_s"] for r in results["ddp"]))
    print(f"tokens/s FSDP / DDP: {ratio:.2f}")


if __name__ == "__main__":
    main()
