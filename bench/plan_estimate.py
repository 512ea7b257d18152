"""The plan's time estimate against the run it estimates (issue 31): the Quickstart's run (GPT-2 124M with random
weights, the sample book, every setting at its default) cut to --max-steps, and any other settings given.

    python bench/plan_estimate.py --max-steps 3
    python bench/plan_estimate.py --max-steps 4 --set "--batch-size 2" --set "--block-size 256"

Each --set is one run (flags added to the defaults). The estimate is the plan's `time estimate ~...` (training
and the evaluations the plan lists); the measured time runs from the plan's log line to the last evaluation's
(the weights load and the step-0 evaluation come after the plan line; the final saves and the report card are
left out). Both in whole seconds, as the log prints them.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_model_dir, loadavg, tail  # noqa: E402

UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def seconds_of(duration: str) -> int:
    """format_duration's text back to seconds: 45s, 6m39s, 2h05m, 3d04h."""
    return sum(int(n) * UNITS[unit] for n, unit in re.findall(r"(\d+)([dhms])", duration))


def clock(line: str) -> datetime:
    return datetime.strptime(line[:8], "%H:%M:%S")


def one_run(root: Path, model: Path, data: Path, max_steps: int, extra: list[str]) -> dict:
    out = root / "out"
    log = root / "run.log"
    cmd = [sys.executable, str(REPO / "finetune_generative.py"), "--model", str(model), "--data-dir", str(data),
           "--output-dir", str(out), "--overwrite", "--max-steps", str(max_steps), "--eval-every", "0", *extra]
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=root)
    lines = log.read_text().splitlines()
    estimate = next(re.search(r"time estimate +~(\S+) \((\S+) per step", line) for line in lines
                    if "time estimate" in line)
    planned = next(clock(line) for line in lines if re.match(r"\d\d:\d\d:\d\d plan$", line))
    evaluated = [clock(line) for line in lines if re.match(r"\d\d:\d\d:\d\d step \d+: val loss", line)]
    if not evaluated:
        raise SystemExit(f"no evaluation in the log:\n{tail(log)}")
    return {"estimate_s": seconds_of(estimate[1]), "measured_s": (evaluated[-1] - planned).seconds,
            "probe": re.search(r"did (\S+ GFLOP/s of \w+)", next(line for line in lines if "time estimate" in line))[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="extra flags for one run (repeatable)")
    parser.add_argument("--root", default=os.environ.get("BENCH_ROOT", "/tmp/bench-plan"))
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    model = build_model_dir("gpt2", root)
    data = root / "data"
    if not (data / "meta.json").is_file():
        for step in (["--sample-book"], ["--input", "book.txt", "--tokenizer", str(model), "--output-dir", "data"]):
            subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *step], check=True, cwd=root,
                           stdout=subprocess.DEVNULL)
    for flags in args.set or [""]:
        result = one_run(root, model, data, args.max_steps, shlex.split(flags))
        ratio = result["estimate_s"] / result["measured_s"]
        print(f"defaults{' ' + flags if flags else ''} --max-steps {args.max_steps}: estimate {result['estimate_s']} s, "
              f"measured {result['measured_s']} s, estimate / measured {ratio:.2f} (probe: {result['probe']}; "
              f"load average after it {loadavg():.1f})", flush=True)


if __name__ == "__main__":
    main()
