"""The pieces shared by the benchmarks that run finetune_generative.py against a TRL trainer on the same data
(bench/chat_throughput.py, bench/dpo_throughput.py): the word list their data is made of, our run timed from
its metrics.jsonl, TRL's run in a process of its own, the rounds alternating, and the table.

A run's result: per step, "seconds", "processed_per_step" (tokens computed, padding included) and
"real_per_step" (the examples' own tokens among them); the steady state leaves out the first --skip steps.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the a of to in and river mountain ship captain whale sea wind storm quiet morning evening letter house "
         "garden door window old young small great said walked looked found heard thought remembered carried "
         "opened closed because while under over between after before again never always").split()


def run_checked(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")


def run_ours(args, repo: Path, model_dir: Path, data_dir: Path, out: Path, settings: list[str],
             real_share: float) -> dict:
    """finetune_generative.py, unmodified, for --steps steps of --batch-size x --block-size, each step logged
    (no evaluation, no checkpoint); `settings`: the optimizer's, to match TRL's; `real_share`: the packing's."""
    cmd = [sys.executable, str(repo / "finetune_generative.py"), "--model", str(model_dir), "--data-dir",
           str(data_dir), "--output-dir", str(out), "--overwrite", "--block-size", str(args.block_size),
           "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--precision", args.precision,
           "--device", args.device, "--log-every", "1", "--eval-every", "0", "--save-every", "0",
           "--eval-batches", "1", "--num-workers", "2", *settings]
    run_checked(cmd)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = args.batch_size * args.block_size
    seconds = [tokens_per_step / r["tokens_per_s"] for r in records if r["kind"] == "train"]
    return {"seconds": seconds, "processed_per_step": [tokens_per_step] * len(seconds),
            "real_per_step": [real_share * tokens_per_step] * len(seconds)}


def run_trl(script: str, argv: list[str], out: Path) -> dict:
    """`script --trl-run RESULT` in a process of its own (so neither run inherits the other's threads or memory)."""
    out.mkdir(parents=True, exist_ok=True)
    result = out / "result.json"
    run_checked([sys.executable, script, *argv, "--trl-run", str(result)])
    return json.loads(result.read_text())


def step_stamps():
    """(a TrainerCallback that stamps the end of each optimizer step, the list of stamps)."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    return Stamp(), stamps


def trl_result(trainer, stamps: list[float], processed: list[int], real: list[int], result: Path) -> None:
    """Train with `trainer` (its callback fills `stamps`; its compute_loss `processed` and `real`), then write the
    per-step result."""
    start = time.perf_counter()
    trainer.train()
    seconds = [b - a for a, b in zip([start, *stamps], stamps)]
    result.write_text(json.dumps({"seconds": seconds, "processed_per_step": processed[:len(seconds)],
                                  "real_per_step": real[:len(seconds)]}))


def compare(args, argv: list[str], script: str, ours, root: Path, heading: str) -> None:
    """ours(out), then `script`'s TRL run, for --rounds rounds alternating (a change in the machine's load falls
    on both), then the table."""
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for r in range(args.rounds):
        runs["ours"].append(ours(root / f"ours-{r}"))
        runs["trl"].append(run_trl(script, argv, root / f"trl-{r}"))
    report(runs, args.skip, heading, root)


def summarize(name: str, runs: list[dict], skip: int) -> dict:
    """The contender's best round by real tokens per second, and every round."""
    per_round = []
    for run in runs:
        seconds = run["seconds"][skip:]
        processed, real = sum(run["processed_per_step"][skip:]), sum(run["real_per_step"][skip:])
        per_round.append({"s_per_step": statistics.mean(seconds), "processed_per_s": processed / sum(seconds),
                          "real_per_s": real / sum(seconds), "real_share": real / processed})
    best = max(per_round, key=lambda r: r["real_per_s"])
    return {"name": name, **best, "rounds": per_round}


def report(runs: dict[str, list[dict]], skip: int, heading: str, root: Path) -> None:
    """The table, the ratio, and root/summary.json."""
    rows = [summarize(name, results, skip) for name, results in runs.items()]
    print(heading)
    print(f"{'':6} {'s/step':>8} {'real tok/s':>11} {'processed tok/s':>16} {'real share':>11}")
    for row in rows:
        print(f"{row['name']:6} {row['s_per_step']:8.3f} {row['real_per_s']:11,.0f} {row['processed_per_s']:16,.0f} "
              f"{row['real_share']:11.1%}")
    ours, trl = rows
    print(f"ours / trl, real tokens per second: {ours['real_per_s'] / trl['real_per_s']:.2f}x")
    (root / "summary.json").write_text(json.dumps(rows, indent=2))
